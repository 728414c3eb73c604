"""The experiment report: the comparison table over seeds, Markdown and self-contained HTML.

Everything here reads the files of finished runs; nothing is retrained.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

from bnexp import stats
from bnexp.cells import NORMALISED, Cell, collect_cells, sort_key
from bnexp.files import atomic_write
from bnexp.readback import run_folders
from bnexp.report_figures import captioned_figures, seeds_and_steps


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


def _environments(cells: list[Cell]) -> list[dict]:
    """Where the reported runs trained, as their summaries record it: one entry per distinct
    environment (versions, platform, device, commit) with its number of runs. (The experiment's
    environment.json names only its latest writer: on a Ray sweep the driver, not the nodes;
    after a resume elsewhere, the last machine.)"""
    found: dict[str, dict] = {}
    for summary in (s for c in cells for s in c.summaries):
        env = summary.get("environment", {})
        entry = found.setdefault(json.dumps(env, sort_keys=True), {"runs": 0, **env})
        entry["runs"] += 1
    return list(found.values())


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
                        key=lambda v: sort_key(json.loads(v)))
        axes[key] = [json.loads(v) for v in values]
    return axes


def left_out(experiment_dir: Path, intact: list[Path]) -> dict[str, int]:
    """The experiment's run folders that its statistics do not cover, counted by status (see
    inventory): every folder with config.yaml but the intact finished ones (run_folders)."""
    from bnexp.inventory import read_row

    covered = set(intact)
    counts = Counter(read_row(p.parent).status for p in experiment_dir.glob("*/config.yaml")
                     if p.parent not in covered)
    return dict(sorted(counts.items()))


def left_out_text(experiment_dir: Path, counts: dict[str, int]) -> str:
    """e.g. '2 run folder(s): 1 failed, 1 partial (`bnexp runs results/g` lists them)'."""
    parts = ", ".join(f"{n} {status}" for status, n in counts.items())
    return (f"{sum(counts.values())} run folder(s): {parts} "
            f"(`bnexp runs {experiment_dir}` lists them)")


def _header(experiment_dir: Path, cells: list[Cell], left: dict[str, int],
            ) -> list[tuple[str, str]]:
    """What a reader needs first: how many runs (and which were left out), seeds and steps,
    where, how long."""
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
    per_cell, steps = seeds_and_steps(cells)
    rows.append(("runs", f"{len(folders)} in {len(cells)} grid cell(s)"))
    if left:  # a statistic over fewer seeds than the grid asked for must say so
        rows.append(("left out", left_out_text(experiment_dir, left)))
    rows += [("seeds", f"{seeds_text}; {per_cell}"),
             ("steps", steps),
             ("device", ", ".join(sorted({f"{s['device']} ({s['engine']} engine, "
                                         f"{s.get('execution', 'eager')})" for s in summaries}))),
             ("training time", f"{wall:,.0f} s of wall time (a population's time shared "
                               "among its networks)")]
    return rows


def write_report(experiment_dir: Path, cells: list[Cell] | None = None,
                 on_figure: Callable[[], None] | None = None,
                 left: dict[str, int] | None = None) -> tuple[Path, Path]:
    """report.md and a self-contained report.html (images embedded, no external resources);
    cells: collect_cells(experiment_dir), where the caller has them; on_figure is called as
    each figure is written; left: left_out(experiment_dir, ...), where the caller has it."""
    intact = run_folders(experiment_dir) if cells is None or left is None else []
    cells = collect_cells(experiment_dir, folders=intact) if cells is None else cells
    if left is None:
        left = left_out(experiment_dir, intact)
    if not cells:
        raise FileNotFoundError(f"{experiment_dir}: no finished runs to report on" + (
            f" ({left_out_text(experiment_dir, left)})" if left else ""))
    figures = captioned_figures(experiment_dir, cells, on_figure)
    rows = table_rows(cells)
    header = _header(experiment_dir, cells, left)
    axes = yaml.safe_dump(_grid_axes(cells), sort_keys=False, default_flow_style=None).strip()
    shared = yaml.safe_dump(_shared_config(cells), sort_keys=False).strip()
    env = _environments(cells)
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
    md += ["## Environment", "", ENVIRONMENT_NOTE, "", "```json", json.dumps(env, indent=2),
           "```", ""]
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


ENVIRONMENT_NOTE = ("Where the runs trained, as each run's summary.json records it: one entry "
                    "per distinct environment, with its number of runs.")


def _html(name: str, header: list[tuple[str, str]], axes: str, shared: str,
          rows: list[list[str]], figures: list[tuple[Path, str]], env: list[dict]) -> str:
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
            f"</table><h2>Figures</h2>{images}<h2>Environment</h2><p>{e(ENVIRONMENT_NOTE)}</p>"
            f"<pre>{e(json.dumps(env, indent=2))}</pre></body></html>\n")
