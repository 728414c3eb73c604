"""kill -9 at every write of a sweep: each resumes to the bytes of an uninterrupted sweep.

A child process (forked from this one, so that no trial pays for importing torch again) runs
a sweep whose N-th atomic write leaves a half-written temporary file and then kills its own
process with SIGKILL, before the rename. That is every point at which a real crash can leave
the results folder: between two runs' writes, between a checkpoint and summary.json, between
the checkpoints of two runs of one population, between config.yaml and the first checkpoint.
A second sweep then finishes the work, and every run's metrics.csv and accuracies must equal
those of a sweep that was never interrupted, with no temporary file left behind.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import results_of
from typer.testing import CliRunner

from bnexp import plots, results
from bnexp.cli import app

# Two populations (batch sizes) of two runs each, three checkpoints per run.
GRID = ("name: k\nsteps: 150\neval_every: 50\ncheckpoint_every: 50\ndevice: cpu\n"
        "grid:\n  lr: [0.05, 0.5]\n  batch_size: [50, 60]\n")


def sweep(path: Path, out: Path):
    return CliRunner().invoke(app, ["sweep", str(path), "--out", str(out)])


def counting_writes(monkeypatch) -> list[Path]:
    written: list[Path] = []
    real = results.atomic_write

    def count(path: Path, data) -> None:
        written.append(path)
        real(path, data)

    monkeypatch.setattr(results, "atomic_write", count)
    monkeypatch.setattr(plots, "atomic_write", count)
    return written


def _die_at_write(n: int, path: Path, out: Path) -> None:
    """Child process: sweep until the n-th write, then leave half a temp file and SIGKILL."""
    torch.set_num_threads(1)  # no OpenMP pool in a forked child
    real, count = results.atomic_write, [0]

    def write(target: Path, data) -> None:
        count[0] += 1
        if count[0] == n:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, _ = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            payload = data.encode() if isinstance(data, str) else data
            os.write(fd, payload[: len(payload) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real(target, data)

    results.atomic_write = plots.atomic_write = write
    sweep(path, out)
    os._exit(0)  # not killed: n was past the last write


@pytest.fixture(scope="module")
def uninterrupted(tiny_mnist, tmp_path_factory):
    """The grid file, the writes of an uninterrupted sweep, and its results."""
    folder = tmp_path_factory.mktemp("kill")
    path = folder / "k.yaml"
    path.write_text(GRID)
    mp = pytest.MonkeyPatch()
    mp.setenv("BNEXP_DATA_DIR", str(tiny_mnist))
    written = counting_writes(mp)
    assert sweep(path, folder / "whole").exit_code == 0
    mp.undo()
    expected = results_of(folder / "whole")
    assert len(expected) == 4
    return path, [p.relative_to(folder / "whole") for p in written], expected


def kill_points(writes: list[Path]) -> list[int]:
    """A spread of write numbers (1-based) that includes every kind of boundary."""
    names = [p.name for p in writes]
    chosen = {1, len(writes)}
    for i, name in enumerate(names):
        if name == "summary.json":
            chosen.update({i, i + 1, i + 2})  # before it (after metrics), it, after it
        if name == "checkpoint.pt" and i + 1 < len(names) and names[i + 1] == "checkpoint.pt":
            chosen.add(i + 2)  # between the checkpoints of two runs of one population
    first_checkpoint = names.index("checkpoint.pt")
    chosen.update({first_checkpoint, first_checkpoint + 1})
    return sorted(n for n in chosen if 1 <= n <= len(writes))


def trial(n: int, uninterrupted, tiny_mnist, out: Path, monkeypatch) -> None:
    path, _, expected = uninterrupted
    monkeypatch.setenv("BNEXP_DATA_DIR", str(tiny_mnist))
    child = multiprocessing.get_context("fork").Process(target=_die_at_write, args=(n, path, out))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL, f"write {n}: the child was not killed"
    resumed = sweep(path, out)
    assert resumed.exit_code == 0, resumed.output
    assert results_of(out) == expected, f"killed at write {n}: results differ"
    assert not list(out.rglob("*.tmp")), f"killed at write {n}: temporary files left"
    for checkpoint in out.rglob("checkpoint.pt"):
        assert torch.load(checkpoint, weights_only=True)["step"] == 150


def test_kill_points_cover_every_kind_of_boundary(uninterrupted):
    _, writes, _ = uninterrupted
    names = [p.name for p in writes]
    assert names.count("summary.json") == 4 and names.count("checkpoint.pt") == 12
    assert len(kill_points(writes)) >= 10


@pytest.mark.parametrize("point", range(12))
def test_kill_at_a_boundary_resumes_to_identical_bytes(point, uninterrupted, tiny_mnist,
                                                      tmp_path, monkeypatch):
    points = kill_points(uninterrupted[1])
    if point >= len(points):
        pytest.skip("fewer boundaries in this layout")
    trial(points[point], uninterrupted, tiny_mnist, tmp_path / "out", monkeypatch)


@pytest.mark.slow
def test_kill_at_every_write_resumes_to_identical_bytes(uninterrupted, tiny_mnist, tmp_path,
                                                        monkeypatch):
    for n in range(1, len(uninterrupted[1]) + 1):
        trial(n, uninterrupted, tiny_mnist, tmp_path / f"out{n}", monkeypatch)
