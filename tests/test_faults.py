"""A hostile disk and damaged files: clean errors, nothing lost, nothing written outside --out."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_flat_gz_mnist, write_tiny_mnist
from pydantic import ValidationError
from typer.testing import CliRunner

from bnexp import plots, readback, results
from bnexp.cli import app
from bnexp.config import RunConfig

GRID = "name: f\nsteps: 40\neval_every: 20\ndevice: cpu\ngrid:\n  lr: [0.05, 0.5]\n"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def no_traceback(result) -> None:
    assert "Traceback" not in result.output + result.stderr


@pytest.fixture
def grid(tiny_mnist, monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("BNEXP_DATA_DIR", str(tiny_mnist))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "f.yaml"
    path.write_text(GRID)
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name not in ("summary.csv", "summary.md", "environment.json")}


def retype(summary: bytes, key: str, value) -> bytes:
    """summary.json, still JSON, with key of every model set to value."""
    data = json.loads(summary)
    for model in data["models"].values():
        model[key] = value
    return json.dumps(data).encode()


DAMAGE = {
    "summary.json not JSON": ("summary.json", lambda b: b[: len(b) // 2]),
    "summary.json without models": ("summary.json", lambda b: b'{"run_id": "x"}'),
    "config.yaml garbage": ("config.yaml", lambda b: b"\xff\xfe: [unclosed"),
    "summary.json accuracy a string": ("summary.json", lambda b: retype(b, "final_test_acc",
                                                                        "abc")),
    "summary.json accuracy NaN": ("summary.json", lambda b: retype(b, "final_val_acc",
                                                                   float("nan"))),
    "summary.json diverged_step a list": ("summary.json", lambda b: retype(b, "diverged_step",
                                                                           [])),
    "metrics.csv truncated": ("metrics.csv", lambda b: b[:30]),
    "metrics.csv empty": ("metrics.csv", lambda b: b""),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_run_is_reported_and_set_aside(case, grid, tmp_path):
    out = tmp_path / "out"
    assert invoke("sweep", grid, "--out", out).exit_code == 0
    name, damage = DAMAGE[case]
    victim = sorted((out / "f").glob("*/summary.json"))[0].parent
    (victim / name).write_bytes(damage((victim / name).read_bytes()))
    before = files(out)

    again = invoke("sweep", grid, "--out", out)
    no_traceback(again)
    assert again.exit_code == 1 and "damaged" in again.stdout and "--force" in again.stdout
    assert "1 skipped" in again.stdout and "1 damaged" in again.stdout
    assert files(out) == before, "nothing retrained or overwritten"
    summary = (out / "f" / "summary.csv").read_text()
    assert victim.name not in summary, "the summary table leaves the damaged run out"

    for command in (["report", out / "f"], ["plot", out]):
        result = invoke(*command)
        no_traceback(result)
        assert result.exit_code == 0 and "damaged" in result.stderr, result.output

    forced = invoke("sweep", grid, "--out", out, "--force")
    assert forced.exit_code == 0 and "2 done" in forced.stdout
    assert invoke("sweep", grid, "--out", out).exit_code == 0


@pytest.mark.parametrize("edit, problem", [
    (lambda text: text.replace("\nlr: 0.05\n", "\nlr: fast\n"),
     "lr: Input should be a valid number"),
    (lambda text: text + "1: 2\n", "1: Keys should be strings"),
], ids=["lr: fast", "a number as key"])
def test_a_config_edited_to_no_runs_values_is_left_out_by_the_readers(grid, tmp_path, edit,
                                                                      problem):
    """config.yaml that still parses but holds what no run can have: report and plot leave
    the run out as damaged, as they do unreadable files, and runs lists it as a mismatch,
    instead of crashing."""
    out = tmp_path / "out"
    assert invoke("sweep", grid, "--out", out).exit_code == 0
    victim = sorted((out / "f").glob("*/summary.json"))[0].parent
    text = (victim / "config.yaml").read_text()
    (victim / "config.yaml").write_text(edit(text))
    assert (victim / "config.yaml").read_text() != text
    for command in (["report", out / "f"], ["plot", out]):
        result = invoke(*command)
        no_traceback(result)
        assert result.exit_code == 0, result.output
        assert (f"damaged {victim}: config.yaml is no run's configuration ({problem})"
                in " ".join(result.stderr.split()))
    listed = invoke("runs", out, "--csv")
    assert listed.exit_code == 0 and f"{victim.name},mismatch" in listed.stdout
    table = invoke("runs", out)
    no_traceback(table)
    assert table.exit_code == 0 and "mismatch" in table.stdout


def test_a_config_without_a_key_it_had_by_default_reads_as_that_default(grid, tmp_path):
    """A run written by a bnexp from before dtype existed has no such key in config.yaml,
    beside runs that have it; any key at its default can also be taken out by hand (the
    folder's name, a hash of the resolved config, still holds the run). report, plot, runs
    and a second sweep read it with the default (report and plot raised KeyError on a
    cell's label, and sweep took the hand-edited folder for another configuration)."""
    whole = tmp_path / "whole"
    assert invoke("sweep", grid, "--out", whole).exit_code == 0
    for key in ("dtype", "eval_split", "layers", "track_unit"):
        out = tmp_path / key
        shutil.copytree(whole, out)
        victim = sorted((out / "f").glob("*/summary.json"))[-1].parent  # not the first cell
        config = yaml.safe_load((victim / "config.yaml").read_text())
        del config[key]
        (victim / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        for command in (["report", out / "f"], ["plot", out], ["runs", out]):
            result = invoke(*command)
            no_traceback(result)
            assert result.exit_code == 0 and not result.stderr.strip(), (key, result.output)
        report = (out / "f" / "report.md").read_text()
        assert "relu lr=0.05 init=0.05 |" in report and f"{key}=" not in report, key
        assert "0 done, 2 skipped" in invoke("sweep", grid, "--out", out).stdout, key


def test_an_experiment_file_that_is_a_folder_is_found_before_training(grid, tmp_path):
    out = tmp_path / "out"
    (out / "f" / "summary.csv").mkdir(parents=True)
    result = invoke("sweep", grid, "--out", out)
    no_traceback(result)
    assert result.exit_code == 2 and result.stderr == (
        f"error: {out / 'f' / 'summary.csv'}: is a folder where a file is written; move it "
        "away\n")
    assert [p.name for p in (out / "f").iterdir()] == ["summary.csv"], "nothing trained"


def test_an_experiment_folder_that_is_a_file_is_an_error(grid, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "f").write_text("not a folder")
    result = invoke("sweep", grid, "--out", out)
    no_traceback(result)
    assert result.exit_code == 2 and "is a file, not a folder" in result.stderr
    assert (out / "f").read_text() == "not a folder"


@pytest.mark.parametrize("where", ["everywhere", "run locks"])
def test_a_file_system_without_locks_is_a_clear_error(where, grid, tmp_path, monkeypatch):
    """Sweeps lock each run they train, so that two never train one run at once: a results
    folder whose file system gives no locks (NFS without its lock service: ENOLCK) is an
    error before training, or, where only a run's lock fails, a clean stop naming it."""
    import fcntl

    real = fcntl.flock

    def flock(f, operation):
        name = getattr(f, "name", "")
        if where == "everywhere" or str(name).endswith(".lock"):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return real(f, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    out = tmp_path / "out"
    result = invoke("sweep", grid, "--out", out)
    no_traceback(result)
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    reason = "sweeps lock each run they train; use a results folder on a file system"
    if where == "everywhere":
        assert line.startswith(f"error: {out}: files cannot be locked there (No locks "
                               f"available); {reason}")
        assert not out.exists() and not list(tmp_path.glob(".bnexp-*")), "nothing left"
    else:
        assert line.startswith(f"error: {out / 'f'}/") and line.endswith(
            f"/.lock: No locks available ({reason} with file locks); finished runs are kept")
        assert not list(out.rglob("summary.json"))


@pytest.mark.parametrize("target, code", [("curves.png", errno.ENOSPC),
                                          ("checkpoint.pt", errno.EROFS),
                                          ("summary.csv", errno.ENOSPC)])
def test_a_full_or_read_only_disk_stops_cleanly_and_resumes(target, code, grid, tmp_path,
                                                           monkeypatch):
    whole = tmp_path / "whole"
    assert invoke("sweep", grid, "--out", whole).exit_code == 0
    real = results.atomic_write

    def refuse(path: Path, data) -> None:
        if path.name == target:
            raise OSError(code, os.strerror(code), str(path))
        real(path, data)

    out = tmp_path / "out"
    monkeypatch.setattr(results, "atomic_write", refuse)
    monkeypatch.setattr(plots, "atomic_write", refuse)
    failed = invoke("sweep", grid, "--out", out)
    no_traceback(failed)
    assert failed.exit_code == 2, failed.output
    (line,) = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert target in line and "resumes" in line
    if target != "summary.csv":
        assert not list(out.rglob("summary.json")), "no run is complete without all its files"
    monkeypatch.setattr(results, "atomic_write", real)
    monkeypatch.setattr(plots, "atomic_write", real)
    assert invoke("sweep", grid, "--out", out).exit_code == 0
    assert {k: v for k, v in files(out).items() if k.endswith("metrics.csv")} == {
        k: v for k, v in files(whole).items() if k.endswith("metrics.csv")}


def test_a_data_error_creates_no_results_folder(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("name: ok\nsteps: 10\ndevice: cpu\n")
    out = tmp_path / "new" / "results"
    result = invoke("run", path, "--out", out, "--data-dir", tmp_path / "nothing")
    assert result.exit_code == 2 and not (tmp_path / "new").exists()


def corrupt_labels(root: Path) -> Path:
    write_tiny_mnist(root)
    labels = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[8 + 140] = 200  # a label of 200, same file size
    labels.write_bytes(bytes(data))
    return root


def truncated_archive(root: Path) -> Path:
    """torchvision's layout, archives only; the tiny files stand in for the published ones."""
    import hashlib

    from torchvision.datasets import MNIST

    flat, _ = write_flat_gz_mnist(root)
    raw = root / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in flat.iterdir():
        raw.joinpath(f.name).write_bytes(f.read_bytes())
    published = [(name, hashlib.md5((raw / name).read_bytes()).hexdigest())
                 for name, _ in MNIST.resources]
    MNIST.resources = published  # the test's monkeypatch puts the published list back
    labels = raw / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:40])
    return root / "tv"


@pytest.mark.parametrize("make, needles", [
    (corrupt_labels, ["labels from", "0..9"]),
    (truncated_archive, ["train-labels-idx1-ubyte.gz", "damaged or truncated"]),
])
def test_damaged_data_is_named_before_anything_is_written(make, needles, tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(MNIST, "resources", MNIST.resources)  # restored after the test
    data = make(tmp_path / "d")
    path = tmp_path / "ok.yaml"
    path.write_text("name: ok\nsteps: 10\ndevice: cpu\n")
    result = invoke("run", path, "--out", tmp_path / "out", "--data-dir", data)
    no_traceback(result)
    assert result.exit_code == 2 and all(n in result.stderr for n in needles), result.stderr
    assert not (tmp_path / "out").exists()


def test_a_repaired_archive_is_unpacked_again(tmp_path, monkeypatch):
    """The unpacked cache follows its source: a .gz replaced since is not read stale."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    flat, src = write_flat_gz_mnist(tmp_path / "d")
    path = tmp_path / "ok.yaml"
    path.write_text("name: ok\nsteps: 10\neval_every: 10\ndevice: cpu\n")
    assert invoke("run", path, "--out", tmp_path / "a", "--data-dir", flat).exit_code == 0
    labels = bytearray((src / "train-labels-idx1-ubyte").read_bytes())
    labels[8 + 140] = 200
    with gzip.open(flat / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes(labels))
    broken = invoke("run", path, "--out", tmp_path / "b", "--data-dir", flat)
    assert broken.exit_code == 2 and "labels from" in broken.stderr


def test_an_unreadable_data_folder_is_a_clean_error(tmp_path, monkeypatch):
    from bnexp import data

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "locked"))

    monkeypatch.setattr(data, "_dataset_root", refuse)
    path = tmp_path / "ok.yaml"
    path.write_text("name: ok\nsteps: 10\ndevice: cpu\n")
    result = invoke("run", path, "--out", tmp_path / "out", "--data-dir", tmp_path / "locked")
    no_traceback(result)
    assert result.exit_code == 2 and "Permission denied" in result.stderr


def test_a_batch_larger_than_the_training_images_found_is_refused(grid, tmp_path):
    result = invoke("run", grid, "--set", "batch_size=20000", "--out", tmp_path / "out")
    no_traceback(result)
    assert result.exit_code == 2 and "more than the 200 training images" in result.stderr


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/abs", "x" * 101, ""])
def test_run_folders_cannot_leave_the_results_folder(name):
    with pytest.raises(ValidationError):
        RunConfig(experiment=name)


def test_summary_reads_back_only_intact_runs(grid, tmp_path):
    out = tmp_path / "out"
    assert invoke("sweep", grid, "--out", out).exit_code == 0
    folders = readback.run_folders(out / "f")
    assert readback.sort_runs(readback.finished(out / "f")) == (folders, [])
    assert len(folders) == 2
    (folders[0] / "summary.json").write_text(json.dumps({"models": {"plain": {}}}))
    assert readback.run_folders(out / "f") == folders[1:]
    intact, damaged = readback.sort_runs(readback.finished(out / "f"))
    assert intact == folders[1:] and [f for f, _ in damaged] == [folders[0]]


def test_a_run_folder_that_is_a_file_is_set_aside(grid, tmp_path):
    out = tmp_path / "out"
    assert invoke("sweep", grid, "--out", out).exit_code == 0
    victim = sorted((out / "f").glob("*/summary.json"))[0].parent
    for f in victim.iterdir():
        f.unlink()
    victim.rmdir()
    victim.write_text("in the way")
    result = invoke("sweep", grid, "--out", out)
    no_traceback(result)
    assert result.exit_code == 1 and "1 damaged" in result.stdout
    assert victim.read_text() == "in the way"


def test_the_same_file_twice_plans_each_run_once(grid, tmp_path):
    result = invoke("sweep", grid, grid, "--out", tmp_path / "out")
    assert result.exit_code == 0 and "2 done" in result.stdout and "locked" not in result.stdout


@pytest.mark.parametrize("error", [
    "cuda", "cpu allocator", "worker killed"])
def test_a_population_out_of_memory_trains_again_in_halves(error, grid, tmp_path, monkeypatch):
    """Halves, down to runs alone, with the numbers of one population; a run that runs out of
    memory alone is recorded as failed, and the others train."""
    from conftest import results_of

    from bnexp import sweep
    from bnexp.engine.processes import WorkerFailed

    assert invoke("sweep", grid, "--seeds", "2", "--out", tmp_path / "whole").exit_code == 0
    raised = {"cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
              "cpu allocator": RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. "
                                            "DefaultCPUAllocator: can't allocate memory"),
              "worker killed": WorkerFailed("the worker process training shard 0 was killed "
                                            "by SIGKILL (signal 9): out of memory, or killed "
                                            "by another process",
                                            exit_code=-signal.SIGKILL)}[error]
    real, sizes = sweep.train_population, []

    def small_memory(runs, *args, **kwargs):
        sizes.append(len(runs))
        if len(runs) > 1 or runs[0].lr == 0.5 and runs[0].seed == 1:
            raise raised
        return real(runs, *args, **kwargs)

    monkeypatch.setattr(sweep, "train_population", small_memory)
    result = invoke("sweep", grid, "--seeds", "2", "--out", tmp_path / "cut")
    assert result.exit_code == 1, result.output
    assert sizes == [4, 2, 1, 1, 2, 1, 1]
    text = " ".join(result.stderr.split())
    assert "a population of 8 networks ran out of memory (" in text
    assert "its 4 runs train again as two populations" in text
    assert "3 done, 0 skipped, 1 failed" in result.stdout
    no_traceback(result)
    cut, whole = results_of(tmp_path / "cut"), results_of(tmp_path / "whole")
    assert len(cut) == 3 and all(cut[run] == whole[run] for run in cut)
    failed = [p.parent.name for p in (tmp_path / "cut").rglob("failed.json")]
    assert len(failed) == 1 and failed[0].startswith("relu-lr0.5-init0.05-seed1-")


def test_a_population_that_fails_otherwise_is_not_trained_again(grid, tmp_path, monkeypatch):
    from bnexp import sweep

    sizes = []

    def broken(runs, *args, **kwargs):
        sizes.append(len(runs))
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(sweep, "train_population", broken)
    result = invoke("sweep", grid, "--seeds", "2", "--out", tmp_path / "r")
    assert result.exit_code == 1 and sizes == [4]
    assert "0 done, 0 skipped, 4 failed" in result.stdout


def test_the_progress_of_a_population_out_of_memory_is_taken_back(grid, tmp_path, monkeypatch):
    """The bar counts each network-step once: what a population did before it ran out of
    memory is taken back when its halves train."""
    from bnexp import config, experiment_file, sweep

    real = sweep.train_population

    def small_memory(runs, split, device, progress=None, **kwargs):
        if len(runs) > 1:
            progress(20 * 2 * len(runs))  # half its steps, then out of memory
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(runs, split, device, progress, **kwargs)

    monkeypatch.setattr(sweep, "train_population", small_memory)
    runs = config.expand_grid(experiment_file.load_spec(grid, [], seeds=2))
    planned = sweep.plan(runs, tmp_path / "r")
    counted, notices = [], []
    outcomes = sweep.execute(planned, tmp_path / "r", Path(os.environ["BNEXP_DATA_DIR"]),
                             progress=counted.append, on_notice=notices.append)
    assert [o.status for o in outcomes] == ["done"] * 4
    assert sum(counted) == sweep.network_steps(planned) == 4 * 2 * 40
    assert min(counted) < 0 and len(notices) == 3
