"""The report's figures, drawn from the files of an experiment's finished runs."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from bnexp import plots
from bnexp.cells import VARIANT_ORDER, Cell, collect_cells
from bnexp.readback import read_metrics


def draw_figures(experiment_dir: Path, cells: list[Cell] | None = None,
                 on_figure: Callable[[], None] | None = None) -> list[Path]:
    """Every figure file of the experiment under <experiment>/plots/ (see captioned_figures;
    the paper figure's SVG included)."""
    paths = [path for path, _ in captioned_figures(experiment_dir, cells, on_figure)]
    return paths + [p.with_suffix(".svg") for p in paths if p.name == "paper.png"]


def figure_count(cells: list[Cell]) -> int:
    """How many figures captioned_figures draws for cells (for progress bars)."""
    if not cells:
        return 0
    batch = len(_budgets(cells)) if "batch_size" in cells[0].varying else 0
    return 2 + len(cells) + batch


def captioned_figures(experiment_dir: Path, cells: list[Cell] | None = None,
                      on_figure: Callable[[], None] | None = None,
                      ) -> list[tuple[Path, str]]:
    """(figure, caption): the paper figure (PNG, with an SVG beside it), the grid overview,
    seed-band curves per cell and, where batch size varies, accuracy against batch size.
    on_figure is called after each figure is written."""
    on_figure = on_figure or (lambda: None)
    cells = cells if cells is not None else collect_cells(experiment_dir)
    if not cells:
        return []
    out = experiment_dir / "plots"
    seeds, steps = seeds_and_steps(cells)
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
    on_figure()
    variants = sorted({v for c in cells for v in c.variants}, key=VARIANT_ORDER.index)
    values = [[c.stats[v].median_test if v in c.stats else math.nan for v in variants]
              for c in cells]
    overview = plots.plot_overview([c.label for c in cells], variants, values,
                                   out / "overview.png",
                                   f"Median final test accuracy ({steps}, {seeds})")
    figures.append((overview, f"Median final test accuracy of every cell and variant over "
                              f"{seeds} ({steps})."))
    on_figure()
    jobs, captions = [], []
    for cell in cells:
        n = len(cell.folders)
        title = f"{cell.label}\n{_steps_text(cell)}, {n} seed{'s' * (n > 1)}"
        jobs.append((curves[cell.key], title, out / f"curves-{cell.slug}.png",
                     plots.accuracy_label([cell.config])))
        captions.append(f"{cell.label}: {plots.curve_split([cell.config])} accuracy during "
                        f"training ({_steps_text(cell)}, {n} seed{'s' * (n > 1)}). {band}; a "
                        "cross marks the first divergence among the seeds.")
    paths = plots.draw_all(plots.plot_seed_bands, jobs, parallel=True, on_figure=on_figure)
    figures += zip(paths, captions)
    if "batch_size" in cells[0].varying:
        figures += _batch_size_figures(cells, out, on_figure)
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


def seeds_and_steps(cells: list[Cell]) -> tuple[str, str]:
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


def _budgets(cells: list[Cell]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """Median final test accuracies by training budget, variant and batch size."""
    budgets: dict[str, dict[str, dict[int, list[float]]]] = {}
    for cell in cells:
        examples = cell.config.get("examples")
        budget = (f"{examples:,} examples seen" if examples
                  else f"{cell.config['steps']:,} steps")
        for variant, v in cell.stats.items():
            budgets.setdefault(budget, {}).setdefault(variant, {}).setdefault(
                cell.config["batch_size"], []).append(v.median_test)
    return budgets


def _batch_size_figures(cells: list[Cell], out: Path, on_figure: Callable[[], None],
                        ) -> list[tuple[Path, str]]:
    """Median final test accuracy against batch size, one line per normaliser, one figure
    per training budget: runs of different budgets are never drawn together."""
    budgets = _budgets(cells)
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
        on_figure()
    return figures
