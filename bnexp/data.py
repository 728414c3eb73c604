"""MNIST-style data: loading through torchvision, the lesson's split, and the batch stream.

torchvision is imported only where the files must be read through it: importing it imports
torch's compiler (about 1.4 s of every command's start on a 2-core machine), so the decoded
images are kept in a cache that is used while the unpacked files are unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

# torchvision's dataset class of each dataset: also the folder its files are kept in
DATASET_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
RAW_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
VALIDATION_SIZE = 5_000  # the lesson: validation = the first 5,000 training images
ENV_DATA_DIR = "BNEXP_DATA_DIR"
# Where Debian's dataset packages put their files (apt-get install dataset-fashion-mnist).
SYSTEM_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}


class DataError(Exception):
    """Data missing, corrupt or unreadable; the message says where and what to do."""


@dataclass(frozen=True)
class Split:
    """Flattened images in [0, 1] and integer labels, all on one device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def to(self, device: torch.device | str) -> Split:
        return Split(*(t.to(device) for t in self.__dict__.values()))

    def astype(self, dtype: torch.dtype) -> Split:
        """The same split with images in dtype (labels unchanged)."""
        if self.train_x.dtype == dtype:
            return self
        return dataclasses.replace(self, train_x=self.train_x.to(dtype),
                                   val_x=self.val_x.to(dtype), test_x=self.test_x.to(dtype))


def resolve_data_dir(option: Path | None) -> Path:
    """--data-dir, else $BNEXP_DATA_DIR, else ./data."""
    if option is not None:
        return Path(option)
    return Path(os.environ.get(ENV_DATA_DIR) or "data")


def _flat_layout(folder: Path) -> bool:
    """True where the four .gz files lie directly in folder (e.g. Debian's dataset packages)."""
    return all((folder / name).is_file() for name in RAW_FILES)


def _missing(folder: Path) -> list[str]:
    """The dataset files (packed or unpacked) that folder lacks."""
    return [name for name in RAW_FILES if not (folder / name).is_file()
            and not (folder / name.removesuffix(".gz")).is_file()]


def _check_partly_flat(folder: Path, dataset: str) -> None:
    """A flat folder with some of the four files but not all is a mistake to name: read as
    a torchvision root instead, it would only say that nothing was found there."""
    absent = [name for name in RAW_FILES if not (folder / name).is_file()]
    if 0 < len(absent) < len(RAW_FILES):
        raise DataError(f"{folder}: holds {len(RAW_FILES) - len(absent)} of the four "
                        f"{dataset} files; missing {', '.join(absent)}")


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bnexp"


def _stage_flat_files(folder: Path, cls: str) -> Path:
    """Unpack a flat folder's .gz files into a writable torchvision layout; return its root.

    Flat folders are read-only system copies (e.g. /usr/share/datasets/fashion-mnist) whose
    archives Debian recompressed, so their .gz md5s differ from torchvision's list; the
    unpacked idx files are checked by torchvision's parser (magic number and sizes) instead.
    """
    root = _cache_dir() / folder.resolve().as_posix().strip("/").replace("/", "_")
    raw = root / cls / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        target = raw / name.removesuffix(".gz")
        # The unpacked copy is used only while its source is unchanged: a .gz replaced or
        # repaired since is unpacked again.
        stamp = target.with_name(target.name + ".source")
        source = _sha256(folder / name)
        if target.is_file() and stamp.is_file() and stamp.read_text() == source:
            continue
        tmp = target.with_suffix(".tmp")
        try:
            with gzip.open(folder / name, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        except (OSError, EOFError, zlib.error) as exc:
            tmp.unlink(missing_ok=True)
            raise DataError(f"{folder / name}: cannot unpack ({exc})") from None
        os.replace(tmp, target)
        stamp.write_text(source)
    return root


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_archives(raw: Path, cls: str) -> None:
    """An archive torchvision would unpack must be the published file (its md5), else say
    which one is damaged: torchvision would treat it as missing and try to download it."""
    if all((raw / name.removesuffix(".gz")).is_file() for name in RAW_FILES):
        return  # already unpacked: torchvision reads those and never opens the archives
    from torchvision import datasets
    from torchvision.datasets.utils import check_integrity

    for name, md5 in getattr(datasets, cls).resources:
        path = raw / name
        if path.is_file() and not check_integrity(str(path), md5):
            raise DataError(f"{path}: damaged or truncated (its md5 is not the published "
                            "file's); replace it, or delete it to download it again")


def _dataset_root(data_dir: Path, dataset: str, system_dir: Path | None) -> Path:
    cls = DATASET_CLASSES[dataset]
    if _flat_layout(data_dir):
        return _stage_flat_files(data_dir, cls)
    if _flat_layout(data_dir / "raw") and not (data_dir / cls).exists():
        return _stage_flat_files(data_dir / "raw", cls)
    if system_dir and not (data_dir / cls).exists() and _flat_layout(system_dir):
        return _stage_flat_files(system_dir, cls)
    if len(_missing(data_dir / cls / "raw")) == len(RAW_FILES):  # nothing there (yet)
        for folder in (data_dir, data_dir / "raw"):
            _check_partly_flat(folder, dataset)
    return data_dir


def _root(dataset: str, data_dir: Path) -> Path:
    """The root torchvision reads the dataset from (flat folders staged into the cache)."""
    cls = DATASET_CLASSES[dataset]
    try:
        root = _dataset_root(data_dir, dataset, SYSTEM_DIRS.get(dataset))
        _check_archives(root / cls / "raw", cls)
    except OSError as exc:  # an unreadable folder or cache
        where = exc.filename or data_dir
        raise DataError(f"{where}: cannot read {dataset} data ({exc.strerror or exc})") from None
    return root


def _unpacked_stamp(raw: Path) -> str | None:
    """What identifies the unpacked files' current contents (path, inode, size, change
    time: any write or replacement changes it), or None while one is missing."""
    try:
        stats = [(n, os.stat(raw / n.removesuffix(".gz"))) for n in RAW_FILES]
    except OSError:
        return None
    return json.dumps([str(raw.resolve())] + [[n, s.st_ino, s.st_size, s.st_ctime_ns]
                                              for n, s in stats])


def _cache_file(raw: Path) -> Path:
    """One entry per folder of files (a changed file replaces its folder's entry)."""
    name = hashlib.sha256(str(raw.resolve()).encode()).hexdigest()[:32]
    return _cache_dir() / "decoded" / f"{name}.pt"


def _cached(raw: Path) -> dict | None:
    """The decoded tensors of raw's unpacked files, if the cache holds them as they are now."""
    stamp = _unpacked_stamp(raw)
    if stamp is None:
        return None
    try:
        kept = torch.load(_cache_file(raw), weights_only=True)
        if kept["stamp"] == stamp:
            return kept
    except Exception:  # absent, partly written or damaged: read the files again
        pass
    return None


def _keep(raw: Path, parts: dict) -> None:
    """Cache the decoded tensors of raw's unpacked files (skipped where it cannot be written)."""
    stamp = _unpacked_stamp(raw)
    if stamp is None:
        return
    path = _cache_file(raw)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**parts, "stamp": stamp}, tmp)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _load(dataset: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets

    cls = DATASET_CLASSES[dataset]
    try:
        ds = getattr(datasets, cls)(str(root), train=train, download=True)
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, ...
        text = str(exc).strip()
        absent = _missing(root / cls / "raw")
        if absent and len(absent) < len(RAW_FILES):
            reason = f"missing {', '.join(absent)}, and downloading failed"
        elif text.startswith("Error downloading") or "Dataset not found" in text:
            reason = "files not found, and downloading them failed"
        else:
            reason = text.splitlines()[0] if text else type(exc).__name__
        raise DataError(
            f"{dataset}: no usable data in {root / cls / 'raw'} ({reason}). "
            f"Put the four {dataset} .gz files there, or point --data-dir / ${ENV_DATA_DIR} "
            f"at a folder holding them (flat or as <dir>/{cls}/raw/)."
        ) from None
    return ds.data, ds.targets


def _check_contents(dataset: str, data_dir: Path, part: str, images: torch.Tensor,
                    labels: torch.Tensor) -> None:
    """What training relies on: 28x28 images, one label per image, labels 0..9."""
    problem = None
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        problem = f"images of shape {tuple(images.shape[1:])}, not 28x28"
    elif labels.shape != (images.shape[0],):
        problem = f"{labels.numel()} labels for {images.shape[0]} images"
    elif labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
        problem = f"labels from {int(labels.min())} to {int(labels.max())}, not 0..9"
    if problem:
        raise DataError(f"{dataset}: the {part} files under {data_dir} hold {problem} "
                        "(damaged files?)")


def _flatten(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(images.shape[0], -1).to(torch.float32) / 255.0


def load_split(
    dataset: str, data_dir: Path, device: torch.device | str = "cpu",
    validation_size: int = VALIDATION_SIZE,
) -> Split:
    """The lesson's split: validation = first 5,000 training images, train = the rest."""
    root = _root(dataset, data_dir)
    raw = root / DATASET_CLASSES[dataset] / "raw"
    parts = _cached(raw)
    if parts is None:
        parts = {"train": _load(dataset, root, train=True),
                 "test": _load(dataset, root, train=False)}
        _keep(raw, parts)
    (train_images, train_labels), (test_images, test_labels) = parts["train"], parts["test"]
    for part, images, labels in (("training", train_images, train_labels),
                                 ("test", test_images, test_labels)):
        _check_contents(dataset, data_dir, part, images, labels)
    if train_images.shape[0] <= validation_size:
        raise DataError(f"{dataset}: only {train_images.shape[0]} training images in {data_dir}")
    x, y = _flatten(train_images), train_labels.long()
    split = Split(
        train_x=x[validation_size:], train_y=y[validation_size:],
        val_x=x[:validation_size], val_y=y[:validation_size],
        test_x=_flatten(test_images), test_y=test_labels.long(),
    )
    return split.to(device)


class BatchStream:
    """Seeded mini-batch indices: a fresh shuffled pass per epoch, last partial batch dropped.

    Permutations come from a CPU generator so that CPU and CUDA runs see the same batches;
    the gather itself happens on the device. Every model of a population reads one stream.
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int, device: torch.device | str):
        if batch_size > n_examples:
            raise ValueError(f"batch size {batch_size} exceeds the {n_examples} training examples")
        self.n_examples = n_examples
        self.batch_size = batch_size
        self.per_epoch = n_examples // batch_size
        self.device = torch.device(device)
        self._generator = torch.Generator().manual_seed(seed)
        self._pending = torch.empty(0, batch_size, dtype=torch.long)

    def next_indices(self, n_steps: int) -> torch.Tensor:
        """The batch indices of the next n_steps steps, shape (n_steps, batch_size)."""
        parts, have = [self._pending], self._pending.shape[0]
        while have < n_steps:  # whole epochs, joined once (not once per epoch)
            perm = torch.randperm(self.n_examples, generator=self._generator)
            parts.append(perm[: self.per_epoch * self.batch_size].view(self.per_epoch,
                                                                      self.batch_size))
            have += self.per_epoch
        pending = torch.cat(parts) if len(parts) > 1 else self._pending
        out, self._pending = pending[:n_steps], pending[n_steps:]
        return out.to(self.device, non_blocking=True)

    def state(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue the stream exactly (for checkpoints)."""
        return {"generator": self._generator.get_state(), "pending": self._pending.clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self._generator.set_state(state["generator"])
        self._pending = state["pending"].clone()
