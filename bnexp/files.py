"""Writing files so that a reader never sees half of one (no torch here: the figure and report
commands import it without paying for torch)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once, at import: os.umask can only be read by setting it


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside path, then rename it into place (with the permissions
    a plain open() would give: 0666 less the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def files_named(root: Path, name: str) -> list[Path]:
    """Every file called name at or under root, in no particular order. A folder that
    vanishes while it is listed (a running sweep makes and removes a write-test folder in
    its results folder) is passed over, where Path.rglob would raise."""
    return [Path(folder) / name for folder, _, files in os.walk(root) if name in files]
