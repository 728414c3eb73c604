"""The cells of an experiment: its finished runs grouped by configuration (every seed of one
comparison together), with their statistics over seeds. Read from files only."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bnexp import stats
from bnexp.readback import read_metrics, read_run_config, read_summary, run_folders

CELL_IGNORES = ("seed",)  # runs differing only in these form one comparison (grid cell)
NORMALISED = ("bn", "ln", "gn")  # variant names with a normaliser; "plain" has none
VARIANT_ORDER = ("plain", *NORMALISED)


@dataclass
class Cell:
    """One comparison of the grid: every seed of one configuration."""

    key: tuple
    config: dict
    folders: list[Path] = field(default_factory=list)
    summaries: list[dict] = field(default_factory=list)  # of the folders, in their order
    seeds: list[int] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)
    stats: dict[str, stats.VariantStats] = field(default_factory=dict)
    paired: stats.PairedStats | None = None

    varying: tuple[str, ...] = ()  # settings that differ between the experiment's cells

    @property
    def label(self) -> str:
        c = self.config
        init = f"init={c['init_scale']:g}" if c.get("init", "normal") == "normal" else c["init"]
        label = f"{c['activation']} lr={c['lr']:g} {init}"
        extra = [f"{k}={_short(c[k])}" for k in self.varying if k not in LABEL_BASE]
        return " ".join([label, *extra])

    @property
    def slug(self) -> str:
        text = self.label.replace(" ", "-").replace("=", "")
        return "".join(ch for ch in text if ch.isalnum() or ch in "-_.")


LABEL_BASE = ("activation", "lr", "init_scale", "init")


def _short(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _load_run(folder: Path) -> tuple[dict, dict, dict]:
    return read_run_config(folder), read_summary(folder), read_metrics(folder)


def collect_cells(experiment_dir: Path, failure_threshold: float = stats.FAILURE_THRESHOLD,
                  folders: list[Path] | None = None) -> list[Cell]:
    """Group an experiment's finished runs into cells and compute their statistics; folders:
    run_folders(experiment_dir), where the caller has them."""
    cells: dict[tuple, Cell] = {}
    loaded = {}
    for folder in run_folders(experiment_dir) if folders is None else folders:
        config, summary, curves = _load_run(folder)
        key_items = {k: v for k, v in config.items() if k not in CELL_IGNORES}
        key_items["engine_device"] = (summary["engine"], summary["device"])
        key = tuple(sorted((k, json.dumps(v)) for k, v in key_items.items()))
        cell = cells.setdefault(key, Cell(key, config))
        cell.folders.append(folder)
        cell.summaries.append(summary)
        cell.seeds.append(config["seed"])
        loaded[folder] = (summary, curves)
    configs = [c.config for c in cells.values()]
    varying = tuple(k for k in configs[0] if k not in CELL_IGNORES and k != "examples"
                    and len({json.dumps(c.get(k)) for c in configs}) > 1) if configs else ()
    for cell in cells.values():
        cell.varying = varying
        _fill_stats(cell, loaded, failure_threshold)
    order = ("activation", "lr", "init", "init_scale", *varying)
    return sorted(cells.values(), key=lambda c: [sort_key(c.config.get(k)) for k in order])


def sort_key(value: object) -> tuple:
    """Numbers before text, each in its own order (so 2 < 10 and 'none' < 'value')."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, json.dumps(value))


def _fill_stats(cell: Cell, loaded: dict, failure_threshold: float) -> None:
    per_variant: dict[str, dict[str, list]] = {}
    for folder in sorted(cell.folders):
        summary, curves = loaded[folder]
        for name, model in summary["models"].items():
            acc = per_variant.setdefault(name, {"val": [], "test": [], "reach": {}})
            acc["val"].append(model["final_val_acc"])
            acc["test"].append(model["final_test_acc"])
            for t in stats.THRESHOLDS:
                curve = curves[name]
                acc["reach"].setdefault(t, []).append(
                    stats.steps_to_reach(curve["step"], curve["val_acc"], t))
    cell.variants = list(per_variant)
    cell.stats = {name: stats.variant_stats(v["val"], v["test"], v["reach"], failure_threshold)
                  for name, v in per_variant.items()}
    normed = [v for v in NORMALISED if v in per_variant]
    if "plain" in per_variant and normed:
        p, b = per_variant["plain"], per_variant[normed[0]]
        cell.paired = stats.paired_stats(p["val"], b["val"], p["test"], b["test"])
