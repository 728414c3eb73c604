"""Figures drawn from files on disk only, so every figure can be remade without training."""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bnexp.files import atomic_write  # noqa: E402
from bnexp.lifeline import die_with_parent  # noqa: E402
from bnexp.readback import read_metrics, read_run_config  # noqa: E402

LABELS = {"plain": "Without Batch Norm", "bn": "With Batch Norm", "ln": "With Layer Norm",
          "gn": "With Group Norm"}
SHORT_LABELS = {"plain": "plain", "bn": "BN", "ln": "LN", "gn": "GN"}


def plot_run(folder: Path) -> Path:
    """Accuracy vs training steps for every model of a run, as in the lesson; where a unit was
    tracked, its input's 15/50/85th percentiles beside it (the BN paper's Figure 1)."""
    curves = read_metrics(folder)
    config = read_run_config(folder)
    tracked = all("p50" in c for c in curves.values())
    fig, axes = plt.subplots(1, 1 + len(curves) * tracked, squeeze=False,
                             figsize=(9 + 4 * len(curves) * tracked, 4.5))
    ax = axes[0][0]
    for name, curve in curves.items():
        _curve(ax, curve["step"], curve["val_acc"], LABELS.get(name, name),
               diverged_at(curve))
    ax.set_ylim(0, 1)
    ax.set_xlabel("Training steps")
    ax.set_ylabel(accuracy_label([config]))
    init = (f"N(0, {config['init_scale']:g}²)" if config.get("init", "normal") == "normal"
            else config["init"])
    ax.set_title(f"{config['activation']}, learning rate {config['lr']:g}, "
                 f"weights {init}\nseed {config['seed']}, {config['steps']:,} steps")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    if tracked:
        panels = axes[0][1:]
        for panel, (name, curve) in zip(panels, curves.items()):
            panel.plot(curve["step"], curve["p50"], color="black", label="50th")
            panel.fill_between(curve["step"], curve["p15"], curve["p85"], alpha=0.3,
                               label="15th to 85th")
            panel.set_xlabel("Training steps")
            panel.set_title(f"{LABELS.get(name, name)}: unit {config['track_unit']} input")
            panel.grid(alpha=0.3)
            _legend_outside(panel)
        panels[0].set_ylabel("input to the activation (percentiles)")
        _share_y(panels)
    fig.tight_layout()
    return _save(fig, folder / "curves.png")


def curve_split(configs: list[dict]) -> str:
    """What the runs' accuracy curves measure: their eval_split (validation unless a file
    sets test, as paper_fig1.yaml does)."""
    splits = sorted({config.get("eval_split", "validation") for config in configs})
    return " or ".join(splits)


def accuracy_label(configs: list[dict]) -> str:
    """The y-axis label of the runs' accuracy curves, e.g. 'Test accuracy'."""
    return f"{curve_split(configs).capitalize()} accuracy"


def diverged_at(curve: dict) -> int | None:
    """The first evaluation step whose mean loss since the last one is not finite."""
    for step, loss in zip(curve["step"], curve["train_loss"]):
        if step > 0 and not math.isfinite(loss):
            return step
    return None


def _curve(ax, steps, values, label: str, diverged: int | None = None, **kw):
    """A curve with a marker at every evaluation (none beyond 60 points, where they would
    merge) and a cross where the model diverged."""
    line, = ax.plot(steps, values, label=label, marker="o" if len(steps) <= 60 else None,
                    markersize=3, **kw)
    if diverged is not None:
        _cross(ax, steps, values, diverged, line.get_color(),
               f"{label}: diverged by step {diverged:,}")
    return line


def _cross(ax, steps, values, step: int, color, label: str) -> None:
    """A cross on the curve (steps, values) at step, on the axis where the value is lost."""
    y = values[steps.index(step)] if step in steps else 0.0
    ax.plot([step], [y if math.isfinite(y) else 0.0], marker="x", markersize=10,
            markeredgewidth=2, color=color, linestyle="none", label=label)


def _legend_outside(ax) -> None:
    """The legend beside the axes, where it cannot cover a curve."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)


def _share_y(panels) -> None:
    """One y-range for panels meant to be compared."""
    lows, highs = zip(*(p.get_ylim() for p in panels))
    for p in panels:
        p.set_ylim(min(lows), max(highs))


# A run's figure takes ~0.2 s to draw on one core, a worker process ~1 s to start (it imports
# matplotlib and pydantic): a worker per this many figures, and figures for fewer than two
# workers (16), or on one core, are drawn here.
FIGURES_PER_WORKER = 8
CHUNK = 4  # figures a worker draws per task
WAKE_S = 0.2  # the longest the parent waits for figures without reading Python's signal flag


def plot_runs(folders: list[Path], parallel: bool = False,
              on_figure: Callable[[], None] | None = None) -> list[Path]:
    """plot_run for every folder, in order (see draw_all)."""
    return draw_all(plot_run, [(folder,) for folder in folders], parallel, on_figure)


def draw_calls(calls: list[tuple[Callable[..., Path], tuple]], parallel: bool = False,
               on_figure: Callable[[], None] | None = None) -> list[Path]:
    """draw(*args) for every (draw, args) of calls, figures of any kind (see draw_all)."""
    return draw_all(_call, calls, parallel, on_figure)


def _call(draw: Callable[..., Path], args: tuple) -> Path:
    return draw(*args)


def draw_all(draw: Callable[..., Path], jobs: list[tuple], parallel: bool = False,
             on_figure: Callable[[], None] | None = None) -> list[Path]:
    """draw(*job) for every job, in order; with parallel, in worker processes (one per core,
    at most one per 8 figures) where there are enough figures to pay for starting them. The
    figures are the same bytes either way. draw must be a module-level function."""
    workers = min(_cores(), len(jobs) // FIGURES_PER_WORKER)
    if not parallel or workers < 2 or not _spawn_can_start():
        return [_advance(draw(*job), on_figure) for job in jobs]
    # spawn: the parent may hold threads (torch's); the workers ignore Ctrl-C and SIGTERM,
    # which the parent handles (it lets the figures of a finished population complete)
    context = multiprocessing.get_context("spawn")
    paths: list[Path] = []
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_stops,
                               initargs=(os.getpid(),))
    try:
        # the workers start (all of them, as every chunk is submitted) with both signals
        # blocked, so that one sent to the whole process group (a terminal's Ctrl-C) while
        # they import cannot kill them with a traceback before _ignore_stops runs; here
        # one that arrives meanwhile is delivered once they are started
        with _stops_blocked():
            chunks = [pool.submit(_draw_chunk, draw, jobs[i:i + CHUNK])
                      for i in range(0, len(jobs), CHUNK)]
        for chunk in chunks:
            for path in _result(chunk):
                paths.append(_advance(path, on_figure))
    except BrokenProcessPool:  # a worker died (killed, out of memory): draw the rest here
        paths += [_advance(draw(*job), on_figure) for job in jobs[len(paths):]]
    except BaseException:  # Ctrl-C or SIGTERM in this process: the workers go at once
        _stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return paths


def _draw_chunk(draw: Callable[..., Path], jobs: list[tuple]) -> list[Path]:
    return [draw(*job) for job in jobs]


def _result(future: Future) -> list[Path]:
    """future's result, waited for in slices of WAKE_S. The kernel may hand a Ctrl-C or
    SIGTERM to another thread of this process (numpy's and torch's threads do not block
    them), where Python's handler only sets a flag that the main thread reads when it runs:
    waiting in one piece, the parent would act on it only once the next figures came."""
    while True:
        try:
            return future.result(timeout=WAKE_S)
        except FutureTimeout:
            continue


_STOPS = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def _stops_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM held back from this thread (and from the processes it starts)
    inside; delivered, if they came, on the way out (where they were not blocked before)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are the main thread's
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Kill a pool's worker processes: shutting it down would wait for the figures they draw
    and, interrupted inside its queues, could wait for ever (1 hang in 30 Ctrl-Cs of `bnexp
    plot`, README)."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()


def _cores() -> int:
    """The cores this process may run on (a container's or a job's share, where set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on this platform
        return os.cpu_count() or 1


def _spawn_can_start() -> bool:
    """Whether a spawned worker can set itself up: it imports the parent's main script, which
    must be a file (not so for a script read from stdin)."""
    main = sys.modules["__main__"]
    path = getattr(main, "__file__", None)
    return getattr(main, "__spec__", None) is not None or path is None or os.path.isfile(path)


def _advance(path: Path, on_figure: Callable[[], None] | None) -> Path:
    if on_figure:
        on_figure()
    return path


def _ignore_stops(parent: int) -> None:
    """A figure worker's set-up: Ctrl-C and SIGTERM are its parent's to handle, and it goes
    when its parent does (a `kill` of `bnexp plot` alone left its workers waiting for ever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent)


def _save(fig, path: Path, close: bool = True) -> Path:
    # tight_layout leaves a placeholder layout engine behind, for which savefig lays the
    # figure out once more before drawing it; without it the PNG is the same bytes and a run's
    # figure takes ~175 instead of ~200 ms (measured on a 2-core machine).
    fig.set_layout_engine(None)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    if close:
        plt.close(fig)
    atomic_write(path, buffer.getvalue())
    return path


def plot_seed_bands(curves: dict[str, list[tuple[list[int], list[float]]]], title: str,
                    path: Path, ylabel: str) -> Path:
    """Median accuracy over seeds per variant (on the runs' eval_split, named by ylabel),
    with the inter-quartile band.

    curves maps a variant to one (steps, accuracies[, diverged step or None]) per seed;
    seeds share steps. A cross marks the first divergence among the seeds.
    """
    fig, ax = plt.subplots(figsize=(9, 4.5))
    _bands(ax, curves)
    ax.set_ylim(0, 1)
    ax.set_xlabel("Training steps")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    fig.tight_layout()
    return _save(fig, path)


def _bands(ax, curves: dict[str, list[tuple[list[int], list[float]]]]) -> None:
    import numpy as np

    for name, per_seed in curves.items():
        steps = per_seed[0][0]
        accs = np.array([seed[1] for seed in per_seed])
        label = LABELS.get(name, name) + (" (median)" if len(per_seed) > 1 else "")
        median = list(np.median(accs, axis=0))
        line = _curve(ax, steps, median, label)
        diverged = [seed[2] for seed in per_seed if len(seed) > 2 and seed[2] is not None]
        if diverged:
            first = min(diverged)
            _cross(ax, steps, median, first, line.get_color(),
                   f"{SHORT_LABELS.get(name, name)}: diverged in {len(diverged)} of "
                   f"{len(per_seed)} seed(s), first by step {first:,}")
        if len(per_seed) > 1:
            lo, hi = np.percentile(accs, [25, 75], axis=0)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.25, linewidth=0,
                            label=(f"{SHORT_LABELS.get(name, name)}: middle 50% of "
                                   f"{len(per_seed)} seeds"))


def plot_small_multiples(panels: list[tuple[str, dict]], columns: int, title: str,
                         stem: Path, ylabel: str) -> list[Path]:
    """The paper figure: one panel per grid cell (its title) with every variant's median
    curve and inter-quartile band over seeds, a shared y-axis and one legend; PNG and SVG."""
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, squeeze=False, sharex=True, sharey=True,
                             figsize=(3.2 * columns, 2.5 * rows + 0.9))
    for ax, (label, curves) in zip(axes.flat, panels):
        _bands(ax, curves)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    for ax in axes[-1]:
        ax.set_xlabel("Training steps")
    # one legend for all panels: the curves and bands (alike in every panel), and what a
    # cross means (each panel's own divergence labels would be another panel's story)
    pairs = [(h, lab) for h, lab in zip(*axes.flat[0].get_legend_handles_labels())
             if "diverged" not in lab]
    if any("diverged" in lab for ax in axes.flat for lab in ax.get_legend_handles_labels()[1]):
        cross = plt.Line2D([], [], marker="x", markeredgewidth=2, color="gray",
                           linestyle="none")
        pairs.append((cross, "first divergence among the seeds"))
    handles, labels = zip(*pairs)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8,
               frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07 + 0.02 * (len(labels) > 4), 1, 1))
    paths = [_save(fig, stem.with_suffix(".png"), close=False)]
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    atomic_write(stem.with_suffix(".svg"), buffer.getvalue())
    return [*paths, stem.with_suffix(".svg")]


def plot_overview(labels: list[str], variants: list[str], values: list[list[float]],
                  path: Path, title: str = "Grid overview") -> Path:
    """Heatmap of median final test accuracy: one row per grid cell, one column per variant."""
    import numpy as np

    data = np.array(values, dtype=float)
    # Room for the longest row label (about 0.075 inch a character) and the colour bar.
    width = 3.0 + 1.2 * len(variants) + 0.075 * max(len(label) for label in labels)
    fig, ax = plt.subplots(figsize=(width, 1.4 + 0.42 * len(labels)))
    image = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(variants)), [SHORT_LABELS.get(v, v) for v in variants])
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), value in np.ndenumerate(data):
        ax.text(j, i, "nan" if np.isnan(value) else f"{value:.3f}", ha="center", va="center",
                color="white" if np.isnan(value) or value < 0.6 else "black", fontsize=9)
    fig.colorbar(image, ax=ax, label="median final test accuracy")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_batch_sizes(series: dict[str, list[tuple[int, float]]], path: Path,
                     budget: str) -> Path:
    """Final test accuracy against batch size (log2 scale), one line per normaliser; every
    point of the figure trained on the same budget (examples seen), named in the title."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    sizes = sorted({b for points in series.values() for b, _ in points})
    for name, points in series.items():
        xs, accs = zip(*points)
        ax.plot(xs, accs, marker="o", label=LABELS.get(name, name))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_ylim(0, 1)
    ax.set_xlabel("Batch size (log2 scale)")
    ax.set_ylabel("Median final test accuracy")
    ax.set_title(f"Final accuracy against batch size, {budget}")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    fig.tight_layout()
    return _save(fig, path)
