"""Reading a run folder back: what plots, reports, tables and sweeps may trust.

A finished run (one with summary.json) is intact when its config.yaml, summary.json and
metrics.csv all read back with what the readers need; otherwise it is damaged, and every
reader leaves it out and says so rather than crash on it.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, ValidationError

from bnexp import safe_yaml
from bnexp.config import RunConfig, format_loc


class DamagedRun(Exception):
    """A run folder whose files cannot be read back; the message says which and why."""


def read_config(folder: Path) -> dict:
    """A run's config.yaml as a mapping (bounded, plain values); DamagedRun otherwise."""
    try:
        config = safe_yaml.parse(safe_yaml.read_text(folder / "config.yaml"), written=True)
    except safe_yaml.YamlError as exc:
        raise DamagedRun(f"config.yaml {exc}") from None
    if not isinstance(config, dict):
        raise DamagedRun("config.yaml does not hold a configuration")
    return config


def with_defaults(config: dict) -> dict:
    """A run's config with RunConfig's defaults for any key it lacks (written by a bnexp from
    before that key, or taken out by hand: the folder's name, a hash of the resolved config,
    still holds it); the config as it is where it is no run's configuration."""
    try:
        resolved = RunConfig.model_validate(config).model_dump(mode="json")
    except ValidationError:
        return config
    return {**resolved, **config}


def read_run_config(folder: Path) -> dict:
    """read_config with the defaults of keys the file lacks (with_defaults)."""
    return with_defaults(read_config(folder))


class _Model(BaseModel):
    """What the readers take from one model's entry of summary.json."""
    final_val_acc: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, strict=True)]
    final_test_acc: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, strict=True)]
    diverged_step: Annotated[int, Field(ge=0, strict=True)] | None


class _Summary(BaseModel):
    """What the readers take from summary.json (other entries are not checked)."""
    models: dict[str, _Model]
    engine: str
    device: str
    wall_time_s: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
    population_size: Annotated[int, Field(ge=1, strict=True)] = 1
    environment: dict = {}


def _first_problem(exc: ValidationError) -> str:
    first = exc.errors()[0]
    return f"{format_loc(first['loc'])}: {first['msg']}"


def read_summary(folder: Path) -> dict:
    """A run's summary.json, checked for what the tables need; DamagedRun otherwise."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
        _Summary.model_validate(summary)
    except ValidationError as exc:
        raise DamagedRun(f"summary.json cannot be read ({_first_problem(exc)})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DamagedRun(f"summary.json cannot be read ({type(exc).__name__})") from None
    return summary


def check_run(folder: Path) -> None:
    """Raise DamagedRun unless a finished run's config, summary and metrics all read back."""
    config = read_config(folder)
    summary = read_summary(folder)
    for key in ("activation", "lr", "init_scale", "seed", "steps"):
        if key not in config:
            raise DamagedRun(f"config.yaml has no {key}")
    try:
        run = RunConfig.model_validate(config)
    except ValidationError as exc:
        raise DamagedRun(f"config.yaml is no run's configuration ({_first_problem(exc)})"
                         ) from None
    if not names_its_folder(run, folder.name):
        raise DamagedRun(NOT_ITS_FOLDER)
    curves = read_metrics(folder)
    missing = set(summary["models"]) - set(curves)
    if missing:
        raise DamagedRun(f"metrics.csv has no rows for {', '.join(sorted(missing))}")


# A finished run whose config.yaml was edited: its numbers belong to another configuration.
NOT_ITS_FOLDER = "config.yaml does not give this folder's name (edited after the run?)"


def names_its_folder(run: RunConfig, name: str) -> bool:
    """Whether name is the folder a run of this configuration trains in (on either device)."""
    return name in {run.run_id(device) for device in ("cpu", "cuda")}


def read_metrics(folder: Path) -> dict[str, dict[str, list[float]]]:
    """metrics.csv -> {model: {"step": [...], "val_acc": [...], "train_loss": [...]}}, plus
    "p15", "p50", "p85" where a unit was tracked; DamagedRun where it does not read back."""
    try:
        return _read_metrics(folder)
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, KeyError, TypeError) as exc:
        raise DamagedRun(f"metrics.csv cannot be read ({type(exc).__name__})") from None


def _read_metrics(folder: Path) -> dict[str, dict[str, list[float]]]:
    curves: dict[str, dict[str, list[float]]] = {}
    with open(folder / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        extra = [c for c in ("train_acc", "p15", "p50", "p85") if c in (reader.fieldnames or [])]
        for row in reader:
            curve = curves.setdefault(row["model"], {k: [] for k in
                                                     ["step", "val_acc", "train_loss", *extra]})
            curve["step"].append(int(row["step"]))
            curve["val_acc"].append(float(row["val_acc"]))
            for column in ("train_loss", *extra):
                curve[column].append(float(row[column]) if row[column] else math.nan)
    if not curves:
        raise ValueError("no rows")
    return curves


def sort_runs(folders: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Finished run folders split into the intact ones and the damaged ones, with why."""
    intact, damaged = [], []
    for folder in folders:
        try:
            check_run(folder)
        except DamagedRun as exc:
            damaged.append((folder, str(exc)))
        else:
            intact.append(folder)
    return intact, damaged


def run_folders(experiment_dir: Path) -> list[Path]:
    """Finished, intact run folders of one experiment, sorted by name (the others:
    sort_runs(finished(experiment_dir)))."""
    return sort_runs(finished(experiment_dir))[0]


def finished(experiment_dir: Path) -> list[Path]:
    """An experiment's run folders holding summary.json (intact or not), sorted by name."""
    return sorted(p.parent for p in experiment_dir.glob("*/summary.json"))
