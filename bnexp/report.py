"""Per-cell statistics over seeds and the experiment report (Markdown and self-contained HTML).

Everything here reads the files of finished runs; nothing is retrained.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bnexp import plots, stats
from bnexp.readback import read_config, read_metrics, read_summary, run_folders
from bnexp.results import atomic_write

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
    return read_config(folder), read_summary(folder), read_metrics(folder)


def collect_cells(experiment_dir: Path, failure_threshold: float = stats.FAILURE_THRESHOLD,
                  ) -> list[Cell]:
    """Group an experiment's finished runs into cells and compute their statistics."""
    cells: dict[tuple, Cell] = {}
    loaded = {}
    for folder in run_folders(experiment_dir):
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
    return sorted(cells.values(), key=lambda c: [_sort_key(c.config.get(k)) for k in order])


def _sort_key(value: object) -> tuple:
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


def draw_figures(experiment_dir: Path, cells: list[Cell] | None = None) -> list[Path]:
    """Every figure file of the experiment under <experiment>/plots/ (see captioned_figures;
    the paper figure's SVG included)."""
    paths = [path for path, _ in captioned_figures(experiment_dir, cells)]
    return paths + [p.with_suffix(".svg") for p in paths if p.name == "paper.png"]


def captioned_figures(experiment_dir: Path, cells: list[Cell] | None = None,
                      ) -> list[tuple[Path, str]]:
    """(figure, caption): the paper figure (PNG, with an SVG beside it), the grid overview,
    seed-band curves per cell and, where batch size varies, accuracy against batch size."""
    cells = cells if cells is not None else collect_cells(experiment_dir)
    if not cells:
        return []
    out = experiment_dir / "plots"
    seeds, steps = _seeds_and_steps(cells)
    band = ("Lines: median over seeds; bands: the middle 50% of seeds (inter-quartile range)"
            if max(len(c.folders) for c in cells) > 1 else "One seed per cell: no band")
    curves = {c.key: _cell_curves(c) for c in cells}
    split = plots.curve_split([c.config for c in cells])
    paper = plots.plot_small_multiples(
        [(c.label, curves[c.key]) for c in cells], _columns(cells),
        f"{experiment_dir.name}: {split} accuracy, {steps}, {seeds}", out / "paper",
        plots.accuracy_label([c.config for c in cells]))
    figures = [(paper[0], f"{split.capitalize()} accuracy during training, one panel per grid cell "
                          f"({steps}, {seeds}; the same y-scale in every panel). {band}; "
                          "crosses mark the first divergence among a cell's seeds. "
                          f"Also as {paper[1].name} (vector).")]
    variants = sorted({v for c in cells for v in c.variants}, key=VARIANT_ORDER.index)
    values = [[c.stats[v].median_test if v in c.stats else math.nan for v in variants]
              for c in cells]
    overview = plots.plot_overview([c.label for c in cells], variants, values,
                                   out / "overview.png",
                                   f"Median final test accuracy ({steps}, {seeds})")
    figures.append((overview, f"Median final test accuracy of every cell and variant over "
                              f"{seeds} ({steps})."))
    for cell in cells:
        n = len(cell.folders)
        title = f"{cell.label}\n{_steps_text(cell)}, {n} seed{'s' * (n > 1)}"
        split = plots.curve_split([cell.config])
        path = plots.plot_seed_bands(curves[cell.key], title, out / f"curves-{cell.slug}.png",
                                     plots.accuracy_label([cell.config]))
        figures.append((path, f"{cell.label}: {split} accuracy during training "
                              f"({_steps_text(cell)}, {n} seed{'s' * (n > 1)}). {band}; a "
                              "cross marks the first divergence among the seeds."))
    if "batch_size" in cells[0].varying:
        figures += _batch_size_figures(cells, out)
    return figures


def _cell_curves(cell: Cell) -> dict[str, list]:
    curves: dict[str, list] = {}
    for folder in sorted(cell.folders):
        for name, curve in read_metrics(folder).items():
            curves.setdefault(name, []).append((curve["step"], curve["val_acc"],
                                                plots.diverged_at(curve)))
    return curves


def _steps_text(cell: Cell) -> str:
    examples = cell.config.get("examples")
    text = f"{cell.config['steps']:,} steps"
    return text + (f" ({examples:,} examples)" if examples else "")


def _seeds_and_steps(cells: list[Cell]) -> tuple[str, str]:
    counts = sorted({len(c.folders) for c in cells})
    seeds = (f"{counts[0]} seed{'s' * (counts[0] > 1)} per cell" if len(counts) == 1
             else f"{counts[0]}–{counts[-1]} seeds per cell")
    steps = sorted({c.config["steps"] for c in cells})
    steps_text = (f"{steps[0]:,} steps" if len(steps) == 1
                  else f"{steps[0]:,}–{steps[-1]:,} steps")
    return seeds, steps_text


def _columns(cells: list[Cell]) -> int:
    """Panels per row: one per learning rate where the grid varies it (the lesson's layout),
    else about a square."""
    lrs = {c.config["lr"] for c in cells}
    if 1 < len(lrs) <= 6 and len(cells) % len(lrs) == 0:
        return len(lrs)
    return max(1, math.ceil(math.sqrt(len(cells))))


def _batch_size_figures(cells: list[Cell], out: Path) -> list[tuple[Path, str]]:
    """Median final test accuracy against batch size, one line per normaliser, one figure
    per training budget: runs of different budgets are never drawn together."""
    budgets: dict[str, dict[str, dict[int, list[float]]]] = {}
    for cell in cells:
        examples = cell.config.get("examples")
        budget = (f"{examples:,} examples seen" if examples
                  else f"{cell.config['steps']:,} steps")
        for variant, v in cell.stats.items():
            budgets.setdefault(budget, {}).setdefault(variant, {}).setdefault(
                cell.config["batch_size"], []).append(v.median_test)
    figures = []
    for i, (budget, points) in enumerate(sorted(budgets.items())):
        # plain appears once per normaliser cell; the copies are the same runs' numbers.
        series = {v: sorted((b, sum(a) / len(a)) for b, a in by_size.items())
                  for v, by_size in sorted(points.items(),
                                           key=lambda item: VARIANT_ORDER.index(item[0]))}
        name = "batch_size.png" if len(budgets) == 1 else f"batch_size-{i + 1}.png"
        path = plots.plot_batch_sizes(series, out / name, budget)
        figures.append((path, f"Median final test accuracy against batch size ({budget} "
                              "for every point; log2 axis)."))
    return figures


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _steps(v: stats.VariantStats, threshold: float) -> str:
    med = v.median_steps_to[threshold]
    never = v.never_reached[threshold]
    text = "never" if med is None else f"{med:,.0f}"
    return text + (f" ({never}/{v.n} never)" if never and med is not None else "")


# "BN" columns hold the run's normalised variant: batch norm, or layer/group norm where the
# cell's norm setting says so.
TABLE_HEADER = ["cell", "seeds", "plain median test % [IQR]", "BN median test % [IQR]",
                "BN − plain (pts) [95% CI]", "plain fail", "BN fail", "plain steps→90%",
                "BN steps→90%"]


ONE_SEED = "n/a (1 seed)"  # a spread or interval of one value would look like a finding


def _variant_cells(v: stats.VariantStats | None) -> tuple[str, str, str]:
    """(median test % [IQR], failure rate, steps to 90%) of one variant, '-' where absent."""
    if v is None:
        return "-", "-", "-"
    spread = (f"{_pct(v.median_test)} [{ONE_SEED}]" if v.n == 1 else
              f"{_pct(v.median_test)} [{_pct(v.iqr_test[0])}, {_pct(v.iqr_test[1])}]")
    return spread, f"{_pct(v.failure_rate)}%", _steps(v, 0.90)


def table_rows(cells: list[Cell]) -> list[list[str]]:
    rows = []
    for c in cells:
        plain = _variant_cells(c.stats.get("plain"))
        normed = [v for v in NORMALISED if v in c.stats]
        bn = _variant_cells(c.stats.get(normed[0]) if normed else None)
        diff = "-"
        if c.paired and len(c.folders) == 1:
            diff = f"{100 * c.paired.mean_diff_test:+.1f} [{ONE_SEED}]"
        elif c.paired:
            lo, hi = c.paired.ci_test
            diff = f"{100 * c.paired.mean_diff_test:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        rows.append([c.label, str(len(c.folders)), plain[0], bn[0], diff, plain[1], bn[1],
                     plain[2], bn[2]])
    return rows


def _environment(experiment_dir: Path) -> dict:
    path = experiment_dir / "environment.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# Settings a reader of the configuration block does not need: bookkeeping, or settings that
# do not apply to the runs shown (ConvNet channels for MLPs, MLP layers for ConvNets).
NOT_SHOWN = ("experiment", "description", "seed", "device", "checkpoint_every")


def _shared_config(cells: list[Cell]) -> dict:
    """Settings equal in every cell that apply to its runs (what the grid does not vary)."""
    configs = [{k: v for k, v in c.config.items() if not k.startswith("_")} for c in cells]
    shared = {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs)
              and k not in NOT_SHOWN and v is not None}
    arch = shared.get("arch", "mlp")
    shared.pop("conv_channels" if arch == "mlp" else "layers", None)
    if shared.get("track_unit") is None:
        shared.pop("track_layer", None)
    if shared.get("clip", "none") == "none":
        shared.pop("clip_threshold", None)
    if shared.get("norm", "batch") != "group":
        shared.pop("group_norm_groups", None)
    return shared


def _grid_axes(cells: list[Cell]) -> dict:
    """The settings the grid varies, each with its values in order."""
    axes = {}
    for key in cells[0].varying:
        values = sorted({json.dumps(c.config.get(key)) for c in cells},
                        key=lambda v: _sort_key(json.loads(v)))
        axes[key] = [json.loads(v) for v in values]
    return axes


def _header(experiment_dir: Path, cells: list[Cell]) -> list[tuple[str, str]]:
    """What a reader needs first: how many runs, seeds and steps, where, how long."""
    folders = [f for c in cells for f in c.folders]
    summaries = [s for c in cells for s in c.summaries]
    seeds = sorted({seed for c in cells for seed in c.seeds})
    seeds_text = (f"{len(seeds)} ({seeds[0]}–{seeds[-1]})" if len(seeds) > 1
                  else f"1 (seed {seeds[0]})")
    # networks of a population share its wall time: each run's share is its networks' part
    wall = sum(s["wall_time_s"] * len(s["models"]) / max(s.get("population_size", 1),
                                                         len(s["models"]))
               for s in summaries)
    rows = [("experiment", experiment_dir.name)]
    description = cells[0].config.get("description")
    if description:
        rows.append(("description", description))
    per_cell, steps = _seeds_and_steps(cells)
    rows += [("runs", f"{len(folders)} in {len(cells)} grid cell(s)"),
             ("seeds", f"{seeds_text}; {per_cell}"),
             ("steps", steps),
             ("device", ", ".join(sorted({f"{s['device']} ({s['engine']} engine, "
                                         f"{s.get('execution', 'eager')})" for s in summaries}))),
             ("training time", f"{wall:,.0f} s of wall time (a population's time shared "
                               "among its networks)")]
    return rows


def write_report(experiment_dir: Path) -> tuple[Path, Path]:
    """report.md and a self-contained report.html (images embedded, no external resources)."""
    cells = collect_cells(experiment_dir)
    if not cells:
        raise FileNotFoundError(f"{experiment_dir}: no finished runs to report on")
    figures = captioned_figures(experiment_dir, cells)
    rows = table_rows(cells)
    header = _header(experiment_dir, cells)
    axes = yaml.safe_dump(_grid_axes(cells), sort_keys=False, default_flow_style=None).strip()
    shared = yaml.safe_dump(_shared_config(cells), sort_keys=False).strip()
    env = _environment(experiment_dir)
    name = experiment_dir.name
    md = [f"# {name}", ""] + [f"- **{k}**: {v}" for k, v in header] + [
          "", "## Configuration", "", "Grid axes:", "", "```yaml",
          axes if _grid_axes(cells) else "# none: one cell", "```", "",
          "Settings shared by every run:", "", "```yaml", shared, "```", "",
          "## Comparison", "", COMPARISON_NOTE, "",
          "| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "## Figures", ""]
    for path, caption in figures:
        md += [f"![{caption}](plots/{path.name})", "", f"*{caption}*", ""]
    md += ["## Environment", "", "```json", json.dumps(env, indent=2), "```", ""]
    md_path = experiment_dir / "report.md"
    atomic_write(md_path, "\n".join(md))
    html_path = experiment_dir / "report.html"
    atomic_write(html_path, _html(name, header, axes, shared, rows, figures, env))
    return md_path, html_path


COMPARISON_NOTE = (
    "Medians over seeds; BN − plain is the mean paired difference of final test accuracy "
    f"with its 95% confidence interval (Student's t over the seeds' differences; {ONE_SEED} "
    f"where a cell has one seed); a failure is a final validation accuracy below "
    f"{stats.FAILURE_THRESHOLD:.0%}.")


def _html(name: str, header: list[tuple[str, str]], axes: str, shared: str,
          rows: list[list[str]], figures: list[tuple[Path, str]], env: dict) -> str:
    e = html.escape
    facts = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in header)
    head = "".join(f"<th>{e(h)}</th>" for h in TABLE_HEADER)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
    images = "".join(
        f'<figure><img alt="{e(caption)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{e(caption)}</figcaption>'
        "</figure>" for p, caption in figures)
    style = ("body{font-family:sans-serif;margin:2em;max-width:75em}table{border-collapse:"
             "collapse}td,th{border:1px solid #bbb;padding:.3em .6em;text-align:right}"
             "td:first-child{text-align:left}.facts th,.facts td{text-align:left}"
             "img{max-width:100%}pre{background:#f4f4f4;padding:1em}figure{margin:2em 0}"
             "figcaption{font-style:italic;margin-top:.4em}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(name)} report</title><style>{style}</style></head><body>"
            f"<h1>{e(name)}</h1><table class=\"facts\">{facts}</table>"
            f"<h2>Configuration</h2><p>Grid axes:</p><pre>{e(axes)}</pre>"
            f"<p>Settings shared by every run:</p><pre>{e(shared)}</pre>"
            f"<h2>Comparison</h2><p>{e(COMPARISON_NOTE)}</p>"
            f"<table id=\"comparison\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            f"</table><h2>Figures</h2>{images}<h2>Environment</h2>"
            f"<pre>{e(json.dumps(env, indent=2))}</pre></body></html>\n")
