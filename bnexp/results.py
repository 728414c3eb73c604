"""Result files, written atomically (bnexp.readback reads them back for plots and reports).

results/<experiment>/
    environment.json              versions, device, git commit of the latest writer
    summary.csv, summary.md       one row per model of every finished run
    <run_id>/config.yaml          the resolved RunConfig
    <run_id>/metrics.csv          step, model, val_acc, train_acc, train_loss (one row per
                                  evaluation, rewritten at every evaluation while training)
    <run_id>/summary.json         final accuracies, divergence, wall time, device, versions
    <run_id>/curves.png           drawn by bnexp.plots from metrics.csv
"""

from __future__ import annotations

import csv
import fcntl
import functools
import io
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import yaml

import bnexp
from bnexp.config import RunConfig, result_fields_of
from bnexp.engine import ModelResult, RunResult
from bnexp.files import atomic_write
from bnexp.readback import (
    DamagedRun,
    check_run,
    read_config,
    read_summary,
    run_folders,
    with_defaults,
)

SUMMARY_FIELDS = ("run_id", "model", "activation", "lr", "init_scale", "seed", "steps",
                  "final_val_acc", "final_test_acc", "diverged_step")


def environment(device: str) -> dict:
    """Versions, hardware and git commit, recorded next to every result."""
    env = {
        "bnexp": bnexp.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "git_commit": _git_commit(),
    }
    return env


@functools.cache  # the code this process runs: asked once, not once per run written
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _number(x: float) -> float | None:
    return x if math.isfinite(x) else None


def metrics_csv(models: list[ModelResult]) -> str:
    """One row per evaluation and model; p15/p50/p85 where a unit is tracked.

    val_acc is the accuracy on the run's eval_split (validation unless set to test); train_acc
    on the first 5,000 training images; train_loss the mean since the previous row. Empty
    cells: not measured.
    """
    tracked = any(m.unit_percentiles for m in models)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "model", "val_acc", "train_acc", "train_loss"]
                    + (["p15", "p50", "p85"] if tracked else []))
    for model in models:
        for i, (step, acc, fit, loss) in enumerate(zip(model.steps, model.val_acc,
                                                       model.train_acc, model.train_loss)):
            row = [step, model.name, repr(acc), _cell_number(fit), _cell_number(loss)]
            if tracked:
                row += [repr(v) for v in model.unit_percentiles[i]]
            writer.writerow(row)
    return out.getvalue()


def _cell_number(x: float) -> str:
    return "" if math.isnan(x) else repr(x)


def write_metrics(folder: Path, models: list[ModelResult]) -> None:
    """metrics.csv of a run in progress (rows so far), or of a finished one."""
    atomic_write(folder / "metrics.csv", metrics_csv(models))


def summary_record(result: RunResult, run_id: str) -> dict:
    return {
        "run_id": run_id,
        "experiment": result.config.experiment,
        "engine": result.engine,
        "device": result.device,
        "execution": result.execution,
        "wall_time_s": result.wall_time_s,
        "train_time_s": result.train_time_s,
        "eval_time_s": result.eval_time_s,
        "compile_time_s": result.compile_time_s,
        "population_size": result.population_size,
        **({"cpu_shards": result.threads, "cpu_shards_in": result.shards_in}
           if result.device == "cpu" else {}),
        "models": {
            m.name: {
                "final_val_acc": m.final_val_acc,
                "final_test_acc": m.final_test_acc,
                "diverged": m.diverged_step is not None,
                "diverged_step": m.diverged_step,
                "final_train_loss": _number(m.train_loss[-1]),
            }
            for m in result.models
        },
        "environment": environment(result.device),
    }


def run_folder(root: Path, run: RunConfig, device: str) -> Path:
    return root / run.experiment / run.run_id(device)


# libyaml's emitter where PyYAML has it: ~5x faster, the same text for the shipped
# experiments (only odd characters in a description may wrap differently; either reads back
# to the same config)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def write_config(folder: Path, run: RunConfig) -> None:
    atomic_write(folder / "config.yaml", yaml.dump(run.model_dump(mode="json"), Dumper=_DUMPER,
                                                   sort_keys=False))


def write_run(root: Path, result: RunResult, analyses: dict[str, dict] | None = None) -> Path:
    """Write one run's folder but its summary.json (see finish_run): config, metrics and
    analyses, which its figures are drawn from."""
    folder = run_folder(root, result.config, result.device)
    write_config(folder, result.config)
    write_metrics(folder, result.models)
    for name, data in (analyses or {}).items():
        atomic_write(folder / f"{name}.json", json.dumps(data, indent=2))
    return folder


def finish_run(folder: Path, result: RunResult) -> None:
    """summary.json, written last (after the figures too), so its presence means complete."""
    atomic_write(folder / "summary.json",
                 json.dumps(summary_record(result, folder.name), indent=2))
    (folder / "failed.json").unlink(missing_ok=True)


def write_failure(folder: Path, run: RunConfig, error: str, trace: str | None = None) -> None:
    """failed.json: the one-line error, and the traceback where there is one (for a bug
    report; the terminal shows only the line)."""
    write_config(folder, run)
    record = {"error": error, "traceback": trace, "time": time.time()}
    atomic_write(folder / "failed.json", json.dumps(record, indent=2))


def write_checkpoint(folder: Path, checkpoint: dict) -> None:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write(folder / "checkpoint.pt", buffer.getvalue())


def read_checkpoint(folder: Path) -> dict | None:
    """The run's last checkpoint (tensors and plain data only), or None where there is none."""
    path = folder / "checkpoint.pt"
    if not path.is_file():
        return None
    return torch.load(path, weights_only=True, map_location="cpu")


# What a sweep writes into a run folder (while it holds the run's lock) and into an
# experiment folder (while it holds the experiment's lock).
RUN_FILES = ("config.yaml", "metrics.csv", "summary.json", "failed.json", "checkpoint.pt",
             "curves.png", "inference_modes.json")
EXPERIMENT_FILES = ("summary.csv", "summary.md", "environment.json")


def remove_stale_temp_files(folder: Path, names: tuple[str, ...] = RUN_FILES) -> None:
    """Delete temporary files that a killed writer of these names left behind.

    Call only while holding the lock of folder: every writer of these names holds it too, so
    any temporary file of theirs that exists now belongs to a process that died.
    """
    for name in names:
        for tmp in folder.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def run_status(root: Path, run: RunConfig, device: str) -> tuple[str, str | None]:
    """('new' | 'complete' | 'failed' | 'mismatch' | 'damaged', why) for a run's folder.

    'mismatch': the folder holds another configuration; 'damaged': its files do not read back.
    """
    folder = run_folder(root, run, device)
    if folder.exists() and not folder.is_dir():
        return "damaged", "the run's folder is a file"
    if not (folder / "config.yaml").exists():
        return "new", None
    try:
        on_disk = read_config(folder)
    except DamagedRun as exc:
        return "damaged", str(exc)
    if result_fields_of(with_defaults(on_disk)) != run.result_fields():
        return "mismatch", "folder holds another configuration; not reused"
    if (folder / "summary.json").exists():
        try:
            check_run(folder)
        except DamagedRun as exc:
            return "damaged", str(exc)
        return "complete", None
    if (folder / "failed.json").is_file():
        return "failed", None
    return "new", None


# What a file system without locks breaks: two sweeps could train one run at once.
NO_LOCKS = ("sweeps lock each run they train; use a results folder on a file system with "
            "file locks")


def lock_problem(folder: Path) -> str | None:
    """Why a file in folder (which exists) cannot be locked, or None where it can."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".bnexp-lock-test-")
    except OSError as exc:
        return f"cannot create a file there: {exc.strerror or exc}"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)
        os.unlink(name)
    return None


class RunLock:
    """An exclusive lock on one folder (non-blocking unless asked); the OS drops it if the
    process dies."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"
        self._file = None

    def acquire(self, wait: bool = False) -> bool:
        """Whether the lock is ours; OSError (naming the file) where the file system has no
        locks to give (NFS without its lock service: ENOLCK)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            self._file.close()
            self._file = None
            return False
        except OSError as exc:
            self._file.close()
            self._file = None
            raise OSError(exc.errno, f"{exc.strerror} ({NO_LOCKS})", str(self.path)) from None
        return True

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def summary_rows(folders: list[Path]) -> list[dict]:
    rows = []
    for folder in folders:
        summary = read_summary(folder)
        config = read_config(folder)
        for name, model in summary["models"].items():
            rows.append({
                "run_id": folder.name, "model": name, "activation": config["activation"],
                "lr": config["lr"], "init_scale": config["init_scale"], "seed": config["seed"],
                "steps": config["steps"], "final_val_acc": model["final_val_acc"],
                "final_test_acc": model["final_test_acc"],
                "diverged_step": model["diverged_step"],
            })
    return rows


def write_experiment_summary(experiment_dir: Path, device: str) -> None:
    """Rebuild the experiment's summary table and environment record from its run folders
    (nothing, while no run of it has finished intact)."""
    lock = RunLock(experiment_dir)
    lock.acquire(wait=True)  # two sweeps finishing together write one after the other
    try:
        remove_stale_temp_files(experiment_dir, EXPERIMENT_FILES)
        _write_experiment_summary(experiment_dir, device)
    finally:
        lock.release()


def _write_experiment_summary(experiment_dir: Path, device: str) -> None:
    folders = run_folders(experiment_dir)  # read with the lock held: no sweep writes meanwhile
    if not folders:
        return
    rows = summary_rows(folders)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(experiment_dir / "summary.csv", out.getvalue())
    lines = ["| " + " | ".join(SUMMARY_FIELDS) + " |", "|" + "---|" * len(SUMMARY_FIELDS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[k]) for k in SUMMARY_FIELDS) + " |")
    atomic_write(experiment_dir / "summary.md", "\n".join(lines) + "\n")
    atomic_write(experiment_dir / "environment.json", json.dumps(environment(device), indent=2))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if not math.isnan(value) else "nan"
    return str(value)
