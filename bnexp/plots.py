"""Figures drawn from files on disk only, so every figure can be remade without training."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bnexp.readback import read_config, read_metrics, sort_runs  # noqa: E402
from bnexp.results import atomic_write  # noqa: E402

LABELS = {"plain": "Without Batch Norm", "bn": "With Batch Norm", "ln": "With Layer Norm",
          "gn": "With Group Norm"}
SHORT_LABELS = {"plain": "plain", "bn": "BN", "ln": "LN", "gn": "GN"}


def plot_run(folder: Path) -> Path:
    """Accuracy vs training steps for every model of a run, as in the lesson; where a unit was
    tracked, its input's 15/50/85th percentiles beside it (the BN paper's Figure 1)."""
    curves = read_metrics(folder)
    config = read_config(folder)
    tracked = all("p50" in c for c in curves.values())
    fig, axes = plt.subplots(1, 1 + len(curves) * tracked, squeeze=False,
                             figsize=(8 + 4 * len(curves) * tracked, 4.5))
    ax = axes[0][0]
    for name, curve in curves.items():
        ax.plot(curve["step"], curve["val_acc"], label=LABELS.get(name, name))
    split = "Test" if config.get("eval_split") == "test" else "Validation"
    ax.set_ylim(0, 1)
    ax.set_xlabel("Training steps")
    ax.set_ylabel(f"{split} accuracy")
    init = (f"N(0, {config['init_scale']:g}²)" if config.get("init", "normal") == "normal"
            else config["init"])
    ax.set_title(f"{config['activation']}, learning rate {config['lr']:g}, "
                 f"weights {init}, seed {config['seed']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if tracked:
        for panel, (name, curve) in zip(axes[0][1:], curves.items()):
            panel.plot(curve["step"], curve["p50"], color="black", label="50th")
            panel.fill_between(curve["step"], curve["p15"], curve["p85"], alpha=0.3,
                               label="15th to 85th")
            panel.set_xlabel("Training steps")
            panel.set_title(f"{LABELS.get(name, name)}: unit {config['track_unit']} input")
            panel.grid(alpha=0.3)
            panel.legend(loc="best")
    fig.tight_layout()
    return _save(fig, folder / "curves.png")


def plot_tree(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Redraw the figure of every finished run found under root: (figures, damaged runs)."""
    intact, damaged = sort_runs(sorted(p.parent for p in root.rglob("summary.json")))
    return [plot_run(folder) for folder in intact], damaged


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
    return path


def plot_seed_bands(curves: dict[str, list[tuple[list[int], list[float]]]], title: str,
                    path: Path) -> Path:
    """Median validation accuracy over seeds per variant, with the inter-quartile band.

    curves maps a variant to one (steps, accuracies) pair per seed; seeds share steps.
    """
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, per_seed in curves.items():
        steps = per_seed[0][0]
        accs = np.array([acc for _, acc in per_seed])
        line, = ax.plot(steps, np.median(accs, axis=0),
                        label=f"{LABELS.get(name, name)} (median of {len(per_seed)})")
        if len(per_seed) > 1:
            lo, hi = np.percentile(accs, [25, 75], axis=0)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.25, linewidth=0)
    ax.set_ylim(0, 1)
    ax.set_xlabel("Training steps")
    ax.set_ylabel("Validation accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_overview(labels: list[str], variants: list[str], values: list[list[float]],
                  path: Path) -> Path:
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
    ax.set_title("Grid overview")
    fig.tight_layout()
    return _save(fig, path)


def plot_batch_sizes(series: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Final test accuracy against batch size (log scale), one line per normaliser."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        sizes, accs = zip(*points)
        ax.plot(sizes, accs, marker="o", label=LABELS.get(name, name))
    ax.set_xscale("log", base=2)
    ax.set_xticks([b for b, _ in next(iter(series.values()))],
                  [str(b) for b, _ in next(iter(series.values()))])
    ax.set_ylim(0, 1)
    ax.set_xlabel("Batch size (equal numbers of examples seen)")
    ax.set_ylabel("Median final test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)
