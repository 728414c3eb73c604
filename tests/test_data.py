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


def test_missing_files_are_named(tmp_path, monkeypatch):
    """A flat folder short of a file, or a torchvision folder whose file could not be
    downloaded, names the files it lacks (not only that nothing usable was found)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    flat, src = write_flat_gz_mnist(tmp_path)
    (flat / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        load_split("mnist", flat)
    assert str(info.value) == (f"{flat}: holds 3 of the four mnist files; missing "
                               "t10k-labels-idx1-ubyte.gz")
    (flat / "MNIST" / "raw").mkdir(parents=True)  # left by an earlier download attempt
    with pytest.raises(DataError, match="holds 3 of the four"):
        load_split("mnist", flat)
    (src / "train-images-idx3-ubyte").unlink()
    import torchvision.datasets

    class Offline(torchvision.datasets.MNIST):  # as torchvision is where nothing answers
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(DataError, match=r"\(missing train-images-idx3-ubyte.gz, and "
                       r"downloading failed\)"):
        load_split("mnist", src.parent.parent)


def test_corrupt_file_is_a_data_error(tmp_path):
    root = write_tiny_mnist(tmp_path)
    (root / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataError):
        load_split("mnist", root)


def test_decoded_images_are_cached_while_the_files_are_unchanged(tmp_path, monkeypatch):
    """The second load reads the cache, not torchvision; a file written since, or a damaged
    cache entry, sends it back to the files."""
    root = write_tiny_mnist(tmp_path)
    first = load_split("mnist", root)
    read = []
    real = data._load
    monkeypatch.setattr(data, "_load", lambda *a, **k: read.append(a) or real(*a, **k))
    again = load_split("mnist", root)
    assert read == [] and all(torch.equal(a, b) for a, b in
                              zip(first.__dict__.values(), again.__dict__.values()))
    images = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    changed = bytearray(images.read_bytes())
    changed[16] = 255 - changed[16]  # the first pixel of the first test image
    images.write_bytes(bytes(changed))
    now = load_split("mnist", root)
    pixel = (now.test_x[0, 0] * 255).round(), (first.test_x[0, 0] * 255).round()
    assert pixel[0] == 255 - pixel[1] and torch.equal(now.val_x, first.val_x)
    assert len(read) == 2, "both parts read again through torchvision"
    data._cache_file(root / "MNIST" / "raw").write_bytes(b"damaged")
    assert torch.equal(load_split("mnist", root).test_x, now.test_x)
    assert len(read) == 4, "a damaged entry is read past, not an error"
    images.write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataError):
        load_split("mnist", root)


def test_an_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    (tmp_path / "file").write_text("not a folder")
    split = load_split("mnist", write_tiny_mnist(tmp_path / "d"))
    assert split.test_x.shape == (200, 784)


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


def test_a_cached_load_does_not_import_torchvision(tmp_path):
    """torchvision imports torch's compiler (seconds of every command's start)."""
    import subprocess
    import sys

    root = write_tiny_mnist(tmp_path)
    load_split("mnist", root)  # fills the cache (XDG_CACHE_HOME: the session's, inherited)
    code = ("import sys; from pathlib import Path; from bnexp.data import load_split; "
            f"load_split('mnist', Path({str(root)!r})); print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
