import pytest
import torch
from conftest import write_flat_gz_mnist, write_tiny_mnist

from bnexp import data
from bnexp.data import BatchStream, DataError, load_split, resolve_data_dir


def test_split_is_the_lessons(tiny_mnist):
    split = load_split("mnist", tiny_mnist)
    assert split.val_x.shape == (5000, 784) and split.train_x.shape == (200, 784)
    assert split.test_x.shape == (200, 784)
    assert split.train_x.dtype == torch.float32
    assert 0.0 <= split.train_x.min() and split.train_x.max() <= 1.0
    assert split.train_y.dtype == torch.long
    # validation is the *first* 5,000 training images
    from torchvision.datasets import MNIST
    raw = MNIST(str(tiny_mnist), train=True)
    assert torch.equal(split.val_x[0], raw.data[0].flatten().float() / 255)
    assert torch.equal(split.train_x[0], raw.data[5000].flatten().float() / 255)


def test_flat_gz_folder_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    flat, src = write_flat_gz_mnist(tmp_path)
    split = load_split("mnist", flat)
    assert split.val_x.shape == (5000, 784) and split.test_x.shape == (200, 784)
    assert torch.equal(split.test_x, load_split("mnist", src.parent.parent).test_x)
    (flat / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache2"))
    with pytest.raises(DataError, match="cannot unpack"):
        load_split("mnist", flat)


def test_missing_data_says_where_and_how(tmp_path):
    with pytest.raises(DataError) as info:
        load_split("mnist", tmp_path / "empty")
    message = str(info.value)
    assert str(tmp_path / "empty") in message and "--data-dir" in message
    assert "BNEXP_DATA_DIR" in message and "\n" not in message


def test_corrupt_file_is_a_data_error(tmp_path):
    root = write_tiny_mnist(tmp_path)
    (root / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataError):
        load_split("mnist", root)


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv(data.ENV_DATA_DIR)
    assert str(resolve_data_dir(None)) == "data"


def test_batch_stream_is_seeded_and_covers_each_epoch():
    a = BatchStream(100, 30, seed=5, device="cpu")
    b = BatchStream(100, 30, seed=5, device="cpu")
    first = a.next_indices(2)
    assert torch.equal(torch.cat([first, a.next_indices(5)]), b.next_indices(7))
    epoch = BatchStream(100, 30, seed=5, device="cpu").next_indices(3).flatten()
    assert len(set(epoch.tolist())) == 90, "one epoch draws each example at most once"
    assert not torch.equal(BatchStream(100, 30, 6, "cpu").next_indices(2), first)


def test_batch_larger_than_data_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        BatchStream(10, 60, 0, "cpu")
