"""The memory a population of the population engine needs, and the memory a device has.

Populations are cut to fit a share of their device's memory (a run's numbers do not depend on
which runs share its population, so a cut changes no number), and a run that could not train
even alone is refused before anything trains. The estimate is of the tensors the engine
holds (see estimate_bytes); Python, torch itself and the loaded data come on top, which is
what the rest of the memory is left for.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from bnexp.config import RunConfig
from bnexp.engine.members import EVAL_ELEMENTS, EVAL_ROWS
from bnexp.engine.processes import WorkerFailed

# One population may take this share of its device's memory: the data, torch's own memory,
# worker processes and whatever else the machine runs share the rest.
POPULATION_SHARE = 0.5
# cgroup v2's and v1's memory limit files, under their mounts: a container's limit is the
# file at the mount's root (a cgroup namespace) or in the folder of the process's own cgroup
# (/proc/self/cgroup); "max" or a huge number means none.
CGROUP_MOUNTS = ((Path("/sys/fs/cgroup"), "", "memory.max"),
                 (Path("/sys/fs/cgroup/memory"), "memory", "memory.limit_in_bytes"))
PROC_CGROUP = Path("/proc/self/cgroup")


def element_bytes(run: RunConfig) -> int:
    return 8 if run.dtype == "float64" else 4  # tf32 keeps float32 tensors


def network_bytes(run: RunConfig) -> int:
    """Bytes one of the run's networks holds while it trains: its parameters twice (with
    their gradients in a step, or a checkpoint's copy of them) and the step's activations:
    the batch as it read it, what each hidden layer saves for the backward pass (a plain
    layer its output, a normalised one two tensors, dropout its mask, its draws and the
    masked output), the gradients flowing back through the widest layer, and the logits."""
    widths = run.layers
    hidden, widest = sum(widths[1:-1]), max(widths[1:-1], default=0)
    parameters = (sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
                  + 4 * hidden)  # gamma, beta and the running mean and variance
    size = element_bytes(run)
    saved = run.batch_size * (widths[0] + 2 * hidden + 3 * widest + 3 * widths[-1]) * size
    dropout = run.batch_size * hidden * (size + 1 + 8) if run.dropout else 0
    return 2 * parameters * size + saved + dropout


def evaluation_bytes(run: RunConfig, networks: int, device: torch.device) -> int:
    """Bytes of the activations of a population of networks of the run's shape while it is
    evaluated (engine/members.correct): a chunk of networks at a time takes EVAL_ROWS
    examples through each layer (a layer's output and the next one's), a chunk on each
    CPU thread at once."""
    at_once = max(1, EVAL_ELEMENTS // (EVAL_ROWS * max(run.layers)))
    chunks = torch.get_num_threads() if device.type == "cpu" else 1
    per_network = 2 * EVAL_ROWS * max(run.layers[1:]) * element_bytes(run)
    return min(networks, chunks * at_once) * per_network


def estimate_bytes(runs: list[RunConfig], device: torch.device) -> int:
    """Bytes a population of runs (of one population key) holds on the device while it
    trains."""
    networks = sum(len(run.batch_norm) for run in runs)
    trained = sum(len(run.batch_norm) * network_bytes(run) for run in runs)
    return trained + evaluation_bytes(runs[0], networks, device)


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory the device has: a GPU's total, or the CPU's physical memory or the
    container's limit where that is less; None where it cannot be known here (a GPU this
    process does not see, such as a Ray cluster's)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    sizes = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    for path in _cgroup_limit_files():
        try:
            sizes.append(int(path.read_text().strip()))
        except (OSError, ValueError):  # unreadable, or "max"
            continue
    return min(sizes)


def _cgroup_limit_files() -> list[Path]:
    """The memory limit files that may hold this process's limit: each mount's root and the
    folder of the process's cgroup below it (the longest tail of the cgroup's path found
    there, since a mount may start below the root of the paths /proc/self/cgroup gives)."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        lines = []
    own = {}  # controller ("" for v2) -> the process's cgroup path
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        for controller in controllers.split(","):
            own[controller] = path.strip("/").split("/") if path.strip("/") else []
    files = []
    for mount, controller, name in CGROUP_MOUNTS:
        files.append(mount / name)
        parts = own.get(controller, [])
        for start in range(len(parts)):
            if (mount.joinpath(*parts[start:]) / name).is_file():
                files.append(mount.joinpath(*parts[start:]) / name)
                break
    return files


def population_budget(device: torch.device) -> int | None:
    """The most bytes one population on the device is given (POPULATION_SHARE of its
    memory), or None where its memory is not known."""
    memory = device_memory(device)
    return None if memory is None else int(memory * POPULATION_SHARE)


def too_large(run: RunConfig, device: torch.device, memory: int | None) -> str | None:
    """Why the run cannot train on the device even alone (its estimate is more than the
    device's memory, device_memory's figure), or None."""
    need = estimate_bytes([run], device)
    if memory is None or need <= memory:
        return None
    return (f"layers {list(run.layers)} with batch_size {run.batch_size} need about "
            f"{bytes_text(need)} to train the run's {len(run.batch_norm)} network(s) in "
            f"{run.dtype}, more than the {bytes_text(memory)} of memory {device.type} has here; "
            "use a smaller batch_size or narrower layers")


def out_of_memory(exc: BaseException) -> bool:
    """Whether training failed for want of memory: torch's allocators (a GPU's, the CPU's),
    or a worker process killed by SIGKILL, what the kernel's out-of-memory killer sends."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, WorkerFailed):
        return exc.exit_code == -signal.SIGKILL
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def bytes_text(n: int) -> str:
    """A byte count for people: MiB below a GiB, else GiB."""
    if n < 2**30:
        return f"{max(1, round(n / 2**20)):,} MiB"
    return f"{n / 2**30:,.1f} GiB"
