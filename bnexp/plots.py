"""Figures drawn from files on disk only, so every figure can be remade without training."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from bnexp.results import atomic_write, read_metrics  # noqa: E402

LABELS = {"plain": "Without Batch Norm", "bn": "With Batch Norm"}


def plot_run(folder: Path) -> Path:
    """Validation accuracy vs training steps for every model of a run, as in the lesson."""
    curves = read_metrics(folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, curve in curves.items():
        ax.plot(curve["step"], curve["val_acc"], label=LABELS.get(name, name))
    ax.set_ylim(0, 1)
    ax.set_xlabel("Training steps")
    ax.set_ylabel("Validation accuracy")
    ax.set_title(f"{config['activation']}, learning rate {config['lr']:g}, "
                 f"weights N(0, {config['init_scale']:g}²), seed {config['seed']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    path = folder / "curves.png"
    atomic_write(path, buffer.getvalue())
    return path


def plot_tree(root: Path) -> list[Path]:
    """Redraw the figure of every finished run found under root."""
    return [plot_run(summary.parent) for summary in sorted(root.rglob("summary.json"))
            if (summary.parent / "metrics.csv").is_file()]
