"""Real MNIST, end to end. Runs where the data is available (BNEXP_DATA_DIR or ./data)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnexp.cli import app
from bnexp.data import DataError, load_split, resolve_data_dir

EXPERIMENTS = Path(__file__).parent.parent / "experiments"


def _mnist_dir() -> Path | None:
    folder = resolve_data_dir(None).resolve()
    try:
        load_split("mnist", folder)
    except DataError:
        return None
    return folder


MNIST_DIR = _mnist_dir()
pytestmark = [pytest.mark.data,
              pytest.mark.skipif(MNIST_DIR is None, reason="real MNIST not found")]


def test_real_split_sizes():
    split = load_split("mnist", MNIST_DIR)
    assert split.train_x.shape == (55_000, 784)
    assert split.val_x.shape == (5_000, 784) and split.test_x.shape == (10_000, 784)
    assert split.val_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # MNIST's first labels


# Measured with `bnexp run experiments/relu_lr0.01_2000.yaml --device cpu` (both engines).
GOLDEN = {"plain": 0.8416, "bn": 0.9564}


@pytest.mark.parametrize("engine", ["population", "reference"])
def test_lesson_relu_2000_steps(tmp_path, engine):
    result = CliRunner().invoke(app, [
        "run", str(EXPERIMENTS / "relu_lr0.01_2000.yaml"), "--device", "cpu",
        "--engine", engine, "--out", str(tmp_path), "--data-dir", str(MNIST_DIR)])
    assert result.exit_code == 0, result.output
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    accs = {name: m["final_val_acc"] for name, m in summary["models"].items()}
    for name, golden in GOLDEN.items():
        assert abs(accs[name] - golden) < 0.01, accs
    assert accs["bn"] > accs["plain"] + 0.05
