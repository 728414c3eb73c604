"""The report's figures, drawn from the files of an experiment's finished runs."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from bnexp import plots
from bnexp.cells import VARIANT_ORDER, Cell, collect_cells
from bnexp.files import files_named
from bnexp.readback import read_metrics, sort_runs

# (draw, args, caption): a figure drawn by draw(*args), which returns its file; draw is a
# module-level function, so the figure can be drawn in a worker process (plots.draw_calls).
Job = tuple[Callable[..., Path], tuple, str]


def with_svgs(paths: list[Path]) -> list[Path]:
    """paths and, after them, the SVG drawn beside each paper figure."""
    return paths + [p.with_suffix(".svg") for p in paths if p.name == "paper.png"]


def tree_figures(root: Path) -> tuple[list[tuple[Callable[..., Path], tuple]],
                                      list[tuple[Path, str]]]:
    """What `bnexp plot` draws under root, as (draw, args) calls for plots.draw_calls: the
    figures of every experiment folder root holds (not where root is one of its runs), then
    every finished run's; and the damaged runs left out (see readback.sort_runs)."""
    summaries = files_named(root, "summary.json")
    intact, damaged = sort_runs(sorted(p.parent for p in summaries))
    experiments = sorted({p.parent.parent for p in summaries
                          if (p.parent / "config.yaml").is_file() and p.parent != root})
    calls = [(draw, args) for experiment in experiments
             for draw, args, _ in figure_jobs(experiment)]
    return calls + [(plots.plot_run, (folder,)) for folder in intact], damaged


def figure_count(cells: list[Cell]) -> int:
    """How many figures captioned_figures draws for cells (for progress bars)."""
    if not cells:
        return 0
    batch = len(_budgets(cells)) if "batch_size" in cells[0].varying else 0
    return 2 + len(cells) + batch


def captioned_figures(experiment_dir: Path, cells: list[Cell] | None = None,
                      on_figure: Callable[[], None] | None = None,
                      ) -> list[tuple[Path, str]]:
    """(figure, caption) for each of figure_jobs, drawn in worker processes where there are
    enough of them (plots.draw_all); on_figure is called after each figure is written."""
    jobs = figure_jobs(experiment_dir, cells)
    paths = plots.draw_calls([(draw, args) for draw, args, _ in jobs], parallel=True,
                             on_figure=on_figure)
    return [(path, caption) for path, (*_, caption) in zip(paths, jobs)]


def figure_jobs(experiment_dir: Path, cells: list[Cell] | None = None) -> list[Job]:
    """The experiment's figures under <experiment>/plots/, to be drawn: the paper figure (PNG,
    with an SVG beside it), the grid overview, seed-band curves per cell and, where batch size
    varies, accuracy against batch size. Reads the runs' files now; draws nothing."""
    cells = cells if cells is not None else collect_cells(experiment_dir)
    if not cells:
        return []
    out = experiment_dir / "plots"
    seeds, steps = seeds_and_steps(cells)
    band = ("Lines: median over seeds; bands: the middle 50% of seeds (inter-quartile range)"
            if max(len(c.folders) for c in cells) > 1 else "One seed per cell: no band")
    curves = {c.key: _cell_curves(c) for c in cells}
    split = plots.curve_split([c.config for c in cells])
    jobs: list[Job] = [(
        _paper, ([(c.label, curves[c.key]) for c in cells], _columns(cells),
                 f"{experiment_dir.name}: {split} accuracy, {steps}, {seeds}", out / "paper",
                 plots.accuracy_label([c.config for c in cells])),
        f"{split.capitalize()} accuracy during training, one panel per grid cell "
        f"({steps}, {seeds}; the same y-scale in every panel). {band}; "
        "crosses mark the first divergence among a cell's seeds. Also as paper.svg (vector).")]
    variants = sorted({v for c in cells for v in c.variants}, key=VARIANT_ORDER.index)
    values = [[c.stats[v].median_test if v in c.stats else math.nan for v in variants]
              for c in cells]
    jobs.append((plots.plot_overview,
                 ([c.label for c in cells], variants, values, out / "overview.png",
                  f"Median final test accuracy ({steps}, {seeds})"),
                 f"Median final test accuracy of every cell and variant over {seeds} "
                 f"({steps})."))
    for cell in cells:
        n = len(cell.folders)
        title = f"{cell.label}\n{_steps_text(cell)}, {n} seed{'s' * (n > 1)}"
        jobs.append((plots.plot_seed_bands,
                     (curves[cell.key], title, out / f"curves-{cell.slug}.png",
                      plots.accuracy_label([cell.config])),
                     f"{cell.label}: {plots.curve_split([cell.config])} accuracy during "
                     f"training ({_steps_text(cell)}, {n} seed{'s' * (n > 1)}). {band}; a "
                     "cross marks the first divergence among the seeds."))
    if "batch_size" in cells[0].varying:
        jobs += _batch_size_jobs(cells, out)
    return jobs


def _paper(panels: list[tuple[str, dict]], columns: int, title: str, stem: Path,
           ylabel: str) -> Path:
    """The paper figure's PNG (its SVG is written beside it)."""
    return plots.plot_small_multiples(panels, columns, title, stem, ylabel)[0]


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


def _batch_size_jobs(cells: list[Cell], out: Path) -> list[Job]:
    """Median final test accuracy against batch size, one line per normaliser, one figure
    per training budget: runs of different budgets are never drawn together."""
    budgets = _budgets(cells)
    jobs: list[Job] = []
    for i, (budget, points) in enumerate(sorted(budgets.items())):
        # plain appears once per normaliser cell; the copies are the same runs' numbers.
        series = {v: sorted((b, sum(a) / len(a)) for b, a in by_size.items())
                  for v, by_size in sorted(points.items(),
                                           key=lambda item: VARIANT_ORDER.index(item[0]))}
        name = "batch_size.png" if len(budgets) == 1 else f"batch_size-{i + 1}.png"
        jobs.append((plots.plot_batch_sizes, (series, out / name, budget),
                     f"Median final test accuracy against batch size ({budget} for every "
                     "point; log2 axis)."))
    return jobs
