"""Result files: written atomically, read back by plots, sweeps and reports.

results/<experiment>/
    environment.json              versions, device, git commit of the latest writer
    summary.csv, summary.md       one row per model of every finished run
    <run_id>/config.yaml          the resolved RunConfig
    <run_id>/metrics.csv          step, model, val_acc, train_loss (one row per evaluation)
    <run_id>/summary.json         final accuracies, divergence, wall time, device, versions
    <run_id>/curves.png           drawn by bnexp.plots from metrics.csv
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
import yaml

import bnexp
from bnexp.config import RunConfig
from bnexp.engine import RunResult

SUMMARY_FIELDS = ("run_id", "model", "activation", "lr", "init_scale", "seed", "steps",
                  "final_val_acc", "final_test_acc", "diverged_step")


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside path, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _number(x: float) -> float | None:
    return x if math.isfinite(x) else None


def metrics_csv(result: RunResult) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "model", "val_acc", "train_loss"])
    for model in result.models:
        for step, acc, loss in zip(model.steps, model.val_acc, model.train_loss):
            writer.writerow([step, model.name, repr(acc), "" if math.isnan(loss) else repr(loss)])
    return out.getvalue()


def summary_record(result: RunResult, run_id: str) -> dict:
    return {
        "run_id": run_id,
        "experiment": result.config.experiment,
        "engine": result.engine,
        "device": result.device,
        "execution": result.execution,
        "wall_time_s": result.wall_time_s,
        "population_size": result.population_size,
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


def write_run(root: Path, result: RunResult) -> Path:
    """Write one run's folder; summary.json goes last, so its presence means complete."""
    run_id = result.config.run_id(result.device)
    folder = root / result.config.experiment / run_id
    config = result.config.model_dump(mode="json")
    atomic_write(folder / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    atomic_write(folder / "metrics.csv", metrics_csv(result))
    atomic_write(folder / "summary.json", json.dumps(summary_record(result, run_id), indent=2))
    return folder


def is_complete(root: Path, run: RunConfig, device: str) -> bool:
    """True where a finished run with exactly this resolved config is on disk."""
    folder = root / run.experiment / run.run_id(device)
    try:
        on_disk = yaml.safe_load((folder / "config.yaml").read_text())
        json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return on_disk == run.model_dump(mode="json")


def read_metrics(folder: Path) -> dict[str, dict[str, list[float]]]:
    """metrics.csv -> {model: {"step": [...], "val_acc": [...], "train_loss": [...]}}."""
    curves: dict[str, dict[str, list[float]]] = {}
    with open(folder / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            curve = curves.setdefault(row["model"], {"step": [], "val_acc": [], "train_loss": []})
            curve["step"].append(int(row["step"]))
            curve["val_acc"].append(float(row["val_acc"]))
            curve["train_loss"].append(float(row["train_loss"]) if row["train_loss"] else math.nan)
    return curves


def run_folders(experiment_dir: Path) -> list[Path]:
    """Finished run folders of one experiment, sorted by name."""
    return sorted(p.parent for p in experiment_dir.glob("*/summary.json"))


def summary_rows(experiment_dir: Path) -> list[dict]:
    rows = []
    for folder in run_folders(experiment_dir):
        summary = json.loads((folder / "summary.json").read_text())
        config = yaml.safe_load((folder / "config.yaml").read_text())
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
    """Rebuild the experiment's summary table and environment record from its run folders."""
    rows = summary_rows(experiment_dir)
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
