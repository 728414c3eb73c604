"""`bnexp runs`: what is on disk under a results folder, read from files only.

Every run folder (one holding config.yaml) gets a status: done (summary.json reads back),
partial (evaluated up to some step; a sweep resumes it from its last checkpoint), failed
(failed.json), damaged (its files do not read back), mismatch (its config.yaml no longer
gives its folder's name: edited by hand), or started (nothing evaluated yet).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from bnexp.config import NON_RESULT_FIELDS, RunConfig
from bnexp.readback import (
    NOT_ITS_FOLDER,
    DamagedRun,
    check_run,
    names_its_folder,
    read_metrics,
    read_run_config,
    read_summary,
)

STATUSES = ("done", "partial", "failed", "damaged", "mismatch", "started")

# Settings never shown as "varied": they name or describe a run rather than configure it.
HIDDEN = {"experiment", "description"} | set(NON_RESULT_FIELDS)


@dataclass
class RunRow:
    """One run folder as found on disk."""

    folder: Path
    experiment: str
    run_id: str
    status: str  # done | partial | failed | damaged | mismatch | started
    step: int | None = None  # partial: the last evaluated step
    detail: str = ""
    config: dict = field(default_factory=dict)
    accuracies: dict[str, tuple[float, float]] = field(default_factory=dict)  # model: val, test

    @property
    def status_text(self) -> str:
        return f"partial at step {self.step:,}" if self.status == "partial" else self.status


def find_runs(root: Path) -> list[RunRow]:
    """Every run folder under root (an experiment folder or a folder of them), sorted."""
    folders = sorted({p.parent for p in root.glob("config.yaml")}
                     | {p.parent for p in root.glob("*/config.yaml")}
                     | {p.parent for p in root.glob("*/*/config.yaml")})
    return [read_row(folder) for folder in folders]


def read_row(folder: Path) -> RunRow:
    row = RunRow(folder, folder.parent.name, folder.name, "started")
    try:
        row.config = read_run_config(folder)
        row.experiment = str(row.config.get("experiment", row.experiment))
    except DamagedRun as exc:
        row.status, row.detail = "damaged", str(exc)
        return row
    if not _names_its_folder(row.config, folder.name):
        row.status, row.detail = "mismatch", NOT_ITS_FOLDER
    elif (folder / "summary.json").exists():
        _read_finished(row)
    elif (folder / "failed.json").is_file():
        row.status, row.detail = "failed", _failure(folder / "failed.json")
    elif (folder / "metrics.csv").is_file():
        _read_partial(row)
    return row


def _names_its_folder(config: dict, name: str) -> bool:
    try:
        run = RunConfig(**config)
    except Exception:  # a config no run can have: not this folder's
        return False
    return names_its_folder(run, name)


def _failure(path: Path) -> str:
    """The error line failed.json records (its traceback stays in the file)."""
    try:
        error = json.loads(path.read_text(encoding="utf-8"))["error"]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return f"failed.json does not read back ({type(exc).__name__})"
    return str(error)


def _read_finished(row: RunRow) -> None:
    try:
        check_run(row.folder)
        models = read_summary(row.folder)["models"]
    except DamagedRun as exc:
        row.status, row.detail = "damaged", str(exc)
        return
    row.status = "done"
    row.accuracies = {name: (m["final_val_acc"], m["final_test_acc"])
                      for name, m in models.items()}


def _read_partial(row: RunRow) -> None:
    try:
        curves = read_metrics(row.folder)
    except DamagedRun:
        return  # a metrics file being written or cut back: nothing to show yet
    row.status = "partial"
    row.step = max(curve["step"][-1] for curve in curves.values())
    row.accuracies = {name: (curve["val_acc"][-1], math.nan) for name, curve in curves.items()}


def varied_settings(rows: list[RunRow]) -> list[str]:
    """The settings whose values differ between the rows, in config order (a key that is no
    setting, in a damaged or foreign config.yaml, is not a column)."""
    return varied_keys([row.config for row in rows if row.config])


def varied_keys(configs: list[dict]) -> list[str]:
    """The settings whose values differ between the configs (mappings), in config order."""
    keys: dict[str, None] = {}
    for config in configs:
        keys.update(dict.fromkeys(k for k in config
                                  if k in RunConfig.model_fields and k not in HIDDEN))
    return [k for k in keys if len({repr(config.get(k)) for config in configs}) > 1]


# Left out of what tells runs apart: what run names show (RunConfig.run_id), and examples
# (they follow from steps).
NAMED_SETTINGS = ("activation", "lr", "init", "init_scale", "arch", "norm", "batch_size", "seed",
                  "examples")


def apart(runs: list[tuple[str, dict]]) -> list[str]:
    """For each (experiment, config) pair, the settings in which the configs of its
    experiment differ beyond what run names show (activation, learning rate, initial weights,
    architecture, normaliser, batch size, seed), as "bn_impl=manual dropout=0.5"; "" where
    they do not, and for an empty config (a damaged run's, whose settings are unknown)."""
    by_experiment: dict[str, list[int]] = {}
    for i, (experiment, config) in enumerate(runs):
        if config:
            by_experiment.setdefault(experiment, []).append(i)
    texts = [""] * len(runs)
    for members in by_experiment.values():
        configs = [runs[i][1] for i in members]
        differ = [k for k in varied_keys(configs) if k not in NAMED_SETTINGS]
        for i, config in zip(members, configs, strict=True):
            texts[i] = " ".join(f"{k}={setting_text(config.get(k))}" for k in differ)
    return texts


def matches(row: RunRow, where: list[tuple[str, object]]) -> bool:
    """Whether every key=value of where holds for the row (status is a key too)."""
    for key, value in where:
        have = row.status if key == "status" else row.config.get(key)
        if isinstance(have, list):
            have = tuple(have)
        if isinstance(value, list):
            value = tuple(value)
        if have != value and str(have) != str(value):
            return False
    return True


def model_names(rows: list[RunRow]) -> list[str]:
    return list(dict.fromkeys(name for row in rows for name in row.accuracies))


def as_csv(rows: list[RunRow]) -> str:
    """One line per run: status, varied settings, final accuracies, folder, and why a run
    failed, is damaged or is a mismatch (detail)."""
    varied, models = varied_settings(rows), model_names(rows)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["experiment", "run_id", "status", "step", *varied,
                     *[f"{m}_{k}" for m in models for k in ("val_acc", "test_acc")], "folder",
                     "detail"])
    for row in rows:
        accs = [_number(row.accuracies.get(m, (math.nan, math.nan))[i])
                for m in models for i in (0, 1)]
        writer.writerow([row.experiment, row.run_id, row.status,
                         "" if row.step is None else row.step,
                         *[setting_text(row.config.get(k)) for k in varied], *accs, row.folder,
                         row.detail])
    return out.getvalue()


def _number(x: float) -> str:
    return "" if x is None or math.isnan(x) else f"{x:.4f}"


def setting_text(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return "" if value is None else str(value)
