"""Shared fixtures: a small learnable synthetic split and tiny MNIST-format files on disk."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from bnexp.data import Split


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, share the cores among the workers instead of oversubscribing them
    (results do not depend on the thread count; only the wall time does)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory: pytest.TempPathFactory):
    """The data caches (decoded images, staged flat folders) of this session, not the user's
    ~/.cache; subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


def synthetic_split(n_train: int = 3000, n_val: int = 500, n_test: int = 500,
                    seed: int = 0) -> Split:
    """Ten noisy prototypes in [0, 1]^784: learnable in a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(10, 784, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        x = (prototypes[y] + 0.8 * torch.rand(n, 784, generator=g)).clamp(0, 1)
        return x, y

    return Split(*draw(n_train), *draw(n_val), *draw(n_test))


def assert_states_close(a: dict, b: dict, rel: float) -> None:
    """Every tensor of a within rel of b, relative to the largest magnitude in b's tensor.

    The engines sum in different orders, so even float64 trajectories part by a few ulps per
    step; scaling by the tensor's largest entry keeps the check meaningful for weights in the
    thousands (bad init) and near zero alike. NaNs must match.
    """
    assert a.keys() == b.keys()
    for key in a:
        scale = b[key].nan_to_num().abs().max().clamp_min(1.0).item()
        torch.testing.assert_close(a[key], b[key], rtol=rel, atol=rel * scale, equal_nan=True,
                                   msg=lambda m, k=key: f"{k}: {m}")


def results_of(out: Path) -> dict[str, tuple[str, dict]]:
    """Every finished run under out: its metrics.csv text and summary.json's model records
    (everything a rerun must reproduce; the wall times and environment may differ)."""
    found = {}
    for summary in out.rglob("summary.json"):
        models = json.loads(summary.read_text())["models"]
        found[summary.parent.name] = ((summary.parent / "metrics.csv").read_text(), models)
    return found


@pytest.fixture(scope="session")
def split() -> Split:
    return synthetic_split()


def _idx_images(images: torch.Tensor) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">IIII", 0x803, n, rows, cols) + images.to(torch.uint8).numpy().tobytes()


def _idx_labels(labels: torch.Tensor) -> bytes:
    return struct.pack(">II", 0x801, labels.shape[0]) + labels.to(torch.uint8).numpy().tobytes()


def write_tiny_mnist(root: Path, n_train: int = 5200, n_test: int = 200,
                     folder: str = "MNIST") -> Path:
    """Uncompressed idx files in torchvision's layout (<root>/MNIST/raw/); returns root."""
    g = torch.Generator().manual_seed(1)
    prototypes = torch.randint(0, 256, (10, 28, 28), generator=g)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 10, (n,), generator=g)
        noise = torch.randint(0, 64, (n, 28, 28), generator=g)
        images = (prototypes[labels] * 3 // 4 + noise).clamp(0, 255)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx_images(images))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_labels(labels))
    return root


def write_flat_gz_mnist(root: Path) -> tuple[Path, Path]:
    """Tiny MNIST as four .gz files side by side (Debian's layout): (flat folder, idx source)."""
    src = write_tiny_mnist(root / "src") / "MNIST" / "raw"
    flat = root / "flat"
    flat.mkdir()
    for f in src.iterdir():
        with open(f, "rb") as fin, gzip.open(flat / f"{f.name}.gz", "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return flat, src


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mnist(tmp_path_factory.mktemp("data"))


def holds(condition) -> bool:
    """condition(), or False where a folder vanished while it was being listed (a running
    sweep makes and removes a write-test folder beside the runs): a poll reads again."""
    try:
        return condition()
    except FileNotFoundError:
        return False
