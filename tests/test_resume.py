"""Checkpoints, kill -9 and resume, locks, retries and mismatches, through real sweeps."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import holds, results_of
from typer.testing import CliRunner

from bnexp.cli import app

GRID = ("name: g\nlr: 0.1\nsteps: 2000\neval_every: 100\ncheckpoint_every: 400\n"
        "device: cpu\ngrid:\n  batch_size: [50, 60]\n")  # two populations


@pytest.fixture
def grid(tiny_mnist, monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("BNEXP_DATA_DIR", str(tiny_mnist))
    path = tmp_path / "g.yaml"
    path.write_text(GRID)
    return path


def sweep_in_process(path: Path, out: Path, *args: str):
    return CliRunner().invoke(app, ["sweep", str(path), "--out", str(out), *args])


def start_sweep(path: Path, out: Path, *args: str, capture: bool = False) -> subprocess.Popen:
    # Two threads whatever the machine: bounded on a 16-core GPU machine too (device: cpu).
    return subprocess.Popen([sys.executable, "-m", "bnexp", "sweep", str(path), "--out", str(out),
                             *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE if capture else subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"})


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll until condition() holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if holds(condition):
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(0.02)
    raise TimeoutError("sweep made no progress")


def checkpoint_steps(out: Path) -> list[int]:
    steps = []
    for path in out.rglob("checkpoint.pt"):
        try:
            steps.append(torch.load(path, weights_only=True)["step"])
        except Exception:  # being replaced right now; atomic rename means never half-written
            pass
    return steps


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_sweep_resumes_bit_identically(grid, tmp_path):
    uninterrupted = tmp_path / "a"
    assert sweep_in_process(grid, uninterrupted).exit_code == 0
    expected = results_of(uninterrupted)
    assert len(expected) == 2

    out = tmp_path / "b"
    kill_points = [
        lambda: bool(checkpoint_steps(out)),                          # first checkpoint
        lambda: max(checkpoint_steps(out), default=0) >= 1200,         # mid-run, later
        lambda: bool(list(out.rglob("summary.json"))),                  # one run finished
    ]
    kills = 0
    for point in kill_points:
        proc = start_sweep(grid, out)
        if wait_for(point, proc):
            kill(proc)
            kills += 1
        else:
            proc.wait()
    assert kills >= 2, "the sweep finished before it could be interrupted"
    proc = start_sweep(grid, out)
    assert proc.wait(timeout=300) == 0
    assert results_of(out) == expected, "resumed metrics differ from an uninterrupted sweep"
    assert not list(out.rglob("*.tmp")), "no half-written files"
    for path in out.rglob("checkpoint.pt"):
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["step"] == 2000 and set(checkpoint["models"]) == {"plain", "bn"}


def test_two_sweeps_share_a_results_folder(grid, tmp_path):
    out = tmp_path / "shared"
    first = start_sweep(grid, out)
    try:
        wait_for(lambda: bool(list(out.rglob(".lock"))) and bool(checkpoint_steps(out)), first)
        second = sweep_in_process(grid, out)
        assert "locked" in second.stdout
        assert second.exit_code == 1, "runs it could not train: not a success"
    finally:
        assert first.wait(timeout=300) == 0
    third = sweep_in_process(grid, out)
    assert "0 done, 2 skipped, 0 failed" in third.stdout
    assert len(results_of(out)) == 2


def test_retry_failed_trains_only_failed_runs(grid, tmp_path, monkeypatch):
    from bnexp import sweep

    real = sweep.train_population

    def flaky(runs, *args, **kwargs):
        if runs[0].batch_size == 60:
            raise RuntimeError("simulated crash")
        return real(runs, *args, **kwargs)

    out = tmp_path / "r"
    fast = ["--set", "steps=200"]
    monkeypatch.setattr(sweep, "train_population", flaky)
    first = sweep_in_process(grid, out, *fast)
    assert first.exit_code == 1
    assert "failed.json" in first.stderr and "Traceback" not in first.output, "one line"
    failed = list(out.rglob("failed.json"))
    assert len(failed) == 1
    record = json.loads(failed[0].read_text())
    assert record["error"] == "RuntimeError: simulated crash"
    assert "in flaky" in record["traceback"], "where it raised, for a bug report"
    listed = CliRunner().invoke(app, ["runs", str(out), "--csv"])
    by_status = {r["status"]: r for r in csv.DictReader(listed.stdout.splitlines())}
    assert by_status["failed"]["detail"] == "RuntimeError: simulated crash"
    assert by_status["done"]["detail"] == ""
    table = CliRunner().invoke(app, ["runs", str(out)])
    (why,) = [line for line in table.stdout.splitlines() if line.startswith("failed ")]
    folder = failed[0].parent  # below the table, whole at any width (not folded in a column)
    assert why == f"failed {folder.parent.name}/{folder.name}: RuntimeError: simulated crash"
    monkeypatch.setattr(sweep, "train_population", real)
    dry = sweep_in_process(grid, out, *fast, "--retry-failed", "--dry-run")
    assert dry.stdout.count("would train") == 1
    retry = sweep_in_process(grid, out, *fast, "--retry-failed")
    assert "1 done, 1 skipped, 0 failed" in retry.stdout
    assert not list(out.rglob("failed.json"))


def test_edited_run_folder_is_reported_not_reused(grid, tmp_path):
    out = tmp_path / "m"
    fast = ["--set", "steps=200"]
    assert sweep_in_process(grid, out, *fast).exit_code == 0
    config_path = next(out.rglob("config.yaml"))
    config = yaml.safe_load(config_path.read_text())
    config["lr"] = 0.5
    config_path.write_text(yaml.safe_dump(config))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = sweep_in_process(grid, out, *fast)
    assert "mismatch" in result.stdout and "1 skipped" in result.stdout
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in
             ("summary.csv", "summary.md", "environment.json")}
    assert all(before[p] == data for p, data in after.items())


def test_a_sweep_planned_before_another_finished_skips_what_it_finished(grid, tmp_path):
    """Planned, then paused while another sweep trains everything: nothing is trained twice."""
    from bnexp import config, experiment_file, sweep

    out = tmp_path / "paused"
    runs = config.expand_grid(experiment_file.load_spec(grid, ["steps=200"]))
    late = sweep.plan(runs, out)  # this sweep stops here (think SIGSTOP) ...
    assert sweep_in_process(grid, out, "--set", "steps=200").exit_code == 0  # ... another runs
    before = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    outcomes = sweep.execute(late, out, Path(os.environ["BNEXP_DATA_DIR"]))
    assert [o.status for o in outcomes] == ["skipped", "skipped"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")} == before


def test_sweeps_starting_together_never_report_a_false_write_error(grid, tmp_path):
    out = tmp_path / "together"
    procs = [start_sweep(grid, out, "--set", "steps=300", capture=True) for _ in range(3)]
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    # 1: a sweep found runs locked by another (it did not train them); never 2 or a crash
    assert all(p.returncode in (0, 1) for p in procs), errors
    assert not any("not writable" in e or "Traceback" in e for e in errors)
    assert len(results_of(out)) == 2
    assert not list(out.rglob("*.tmp"))


FAST = ["--set", "steps=300", "--set", "grid.batch_size=[50]", "--set", "checkpoint_every=100"]


def watch_metrics(monkeypatch) -> tuple[list[int], list[int]]:
    """(the last step of every metrics.csv written, steps to stop at): a sweep in this
    process raises KeyboardInterrupt (Ctrl-C) right after writing the metrics of a step put
    in the second list, before that step's checkpoint, once."""
    from bnexp import results

    rows: list[int] = []
    stop_at: list[int] = []
    real = results.write_metrics

    def watch(folder, models):
        real(folder, models)
        rows.append(max(s for m in models for s in m.steps))
        if rows[-1] in stop_at:
            stop_at.clear()
            raise KeyboardInterrupt

    monkeypatch.setattr(results, "write_metrics", watch)
    return rows, stop_at


def test_metrics_grow_at_every_evaluation_and_are_cut_back_on_resume(grid, tmp_path,
                                                                      monkeypatch):
    rows, stop_at = watch_metrics(monkeypatch)
    whole = tmp_path / "whole"
    assert sweep_in_process(grid, whole, *FAST).exit_code == 0
    assert rows == [0, 100, 200, 300, 300], "a write per evaluation, then the finished run's"
    header = next(whole.rglob("metrics.csv")).read_text().splitlines()[0]
    assert header == "step,model,val_acc,train_acc,train_loss"

    out = tmp_path / "cut"
    rows.clear()
    stop_at.append(200)
    interrupted = sweep_in_process(grid, out, *FAST)
    assert interrupted.exit_code == 130  # Ctrl-C
    metrics = next(out.rglob("metrics.csv")).read_text()
    assert "\n200,plain," in metrics, "rows up to the last evaluation are on disk"
    kept = torch.load(next(out.rglob("checkpoint.pt")), weights_only=True)
    assert kept["step"] == 100 and kept["eval_time_s"] > 0, "evaluated at steps 0 and 100"
    rows.clear()
    assert sweep_in_process(grid, out, *FAST).exit_code == 0
    assert rows[0] == 100, "resuming first cuts metrics.csv back to the checkpoint's step"
    assert results_of(out) == results_of(whole)
    summary = json.loads(next(out.rglob("summary.json")).read_text())
    assert summary["eval_time_s"] > kept["eval_time_s"], "the time before the resume counts"


def _other_pickle(path: Path) -> None:
    torch.save({"step": "x", "models": 3}, path)


def _edited(path: Path, edit) -> None:
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)


DAMAGED_CHECKPOINTS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:5000]), "cannot be read"),
    "another pickle": (_other_pickle, "(is not a checkpoint of this bnexp (format))"),
    "a weight's shape": (lambda p: _edited(p, lambda c: c["models"]["bn"]["state"].update(
        {"linears.0.weight": torch.zeros(3, 3)})), "(models.bn: state linears.0.weight is"),
    "a step off the schedule": (lambda p: _edited(p, lambda c: c.update(step=150)),
                                "(step 150 is not one of the run's evaluation steps)"),
    "batches beyond the data": (lambda p: _edited(p, lambda c: c["stream"].update(
        pending=torch.full((1, 50), 10**6))),
        "(stream: pending batches point outside the training images)"),
}


def test_a_checkpoint_that_cannot_resume_the_run_is_named_and_the_run_starts_over(
        grid, tmp_path, monkeypatch):
    """A checkpoint.pt that does not load, or loads but does not fit the run (other keys,
    shapes, a step off its evaluation schedule, batch indices beyond the training images),
    is named in one line and the run trains from step 0 to the bytes of an uninterrupted
    run, instead of the sweep crashing on it (TypeError) or the run failing in training."""
    rows, stop_at = watch_metrics(monkeypatch)
    whole = tmp_path / "whole"
    assert sweep_in_process(grid, whole, *FAST).exit_code == 0
    cut = tmp_path / "cut"
    stop_at.append(200)  # the checkpoint of step 100 is on disk
    assert sweep_in_process(grid, cut, *FAST).exit_code == 130
    for case, (damage, why) in DAMAGED_CHECKPOINTS.items():
        out = tmp_path / case
        shutil.copytree(cut, out)
        path = next(out.rglob("checkpoint.pt"))
        damage(path)
        rows.clear()
        again = sweep_in_process(grid, out, *FAST)
        assert again.exit_code == 0 and "Traceback" not in again.output, (case, again.output)
        said = " ".join(again.stderr.split())
        assert f"{path.parent.name}: checkpoint.pt " in said and why in said, (case, said)
        assert "the run starts over" in said and "resuming" not in said, case
        assert rows[0] == 0, f"{case}: trained from the start"
        assert results_of(out) == results_of(whole), case


def metrics_steps(out: Path) -> list[int]:
    steps = []
    for path in out.rglob("metrics.csv"):
        try:
            rows = path.read_text().splitlines()[1:]
            steps.append(max(int(row.split(",")[0]) for row in rows))
        except (OSError, ValueError):  # not written yet
            pass
    return steps


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_checkpoints_the_current_step_and_the_rerun_resumes_from_it(grid, tmp_path,
                                                                           signum):
    """No regular checkpoint before the end: what Ctrl-C (or SIGTERM, as kill, timeout and
    batch schedulers send) saves is all a resume can use."""
    args = ["--set", "checkpoint_every=100000", "--set", "grid.batch_size=[50]"]
    whole = tmp_path / "whole"
    assert sweep_in_process(grid, whole, *args).exit_code == 0
    out = tmp_path / "stopped"
    proc = start_sweep(grid, out, *args, capture=True)
    assert wait_for(lambda: max(metrics_steps(out), default=0) >= 200, proc)
    proc.send_signal(signum)
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 128 + signum, stderr
    (step,) = set(checkpoint_steps(out))
    assert 200 <= step < 2000 and step % 100 == 0
    assert f"interrupted at step {step:,}: its checkpoint is written" in " ".join(stderr.split())
    again = start_sweep(grid, out, *args, capture=True)
    stderr = again.communicate(timeout=300)[1].decode()
    assert again.returncode == 0
    assert f"from step {step:,} of 2,000" in " ".join(stderr.split())
    assert results_of(out) == results_of(whole), "resumed bytes equal an uninterrupted run"
