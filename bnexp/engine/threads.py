"""CPU threads: the math of every model runs on one thread, models are spread over threads.

Why: a multi-threaded CPU kernel splits its work by the tensor's total size and the thread
count, so a model's rounding would depend on how many models share its tensors and on how
many threads ran them (MKL splits a small batched product across threads; an elementwise
kernel puts different elements in its scalar tail). With every kernel on one thread and each
model's arithmetic independent of its neighbours (engine/stack.py), a run's numbers are the
same bytes alone or in any population, with any thread count, under any load. The cores are
still used: the population is cut into shards of models, one thread each (or one worker
process each, engine/processes.py, where the GIL would keep threads waiting).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from math import isqrt

import torch


@contextmanager
def single_threaded_kernels(device: torch.device) -> Iterator[int]:
    """Run CPU kernels on one thread inside; yields the thread count that was set before."""
    before = torch.get_num_threads()
    if device.type != "cpu":
        yield before
        return
    torch.set_num_threads(1)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def cpu_shards(threads: int, n_models: int, compiled: bool = False) -> int:
    """How many shards (threads) train a CPU population of n_models networks.

    A shard's thread holds Python's GIL while it dispatches its step's operators (83 for a
    stack of plain networks, 140 for BN; 0.5-0.9 ms besides the products), so k shards
    serialise about k times that per step, while a network's own products take about 0.6 ms
    per step: shards pay only where each has enough networks, about
    sqrt(n_models) shards. On 2 threads (lesson MLP, ms per step, serial vs 2 shards): 2
    networks 2.55 vs 3.01 (two threads are slower), 4: 4.0 vs 3.7, 8: 7.6 vs 5.6, 24: 21 vs 12.
    A compiled step is a few calls per step, so there every network may have a thread.
    """
    return max(1, min(threads, n_models if compiled else isqrt(n_models)))


class ShardPool:
    """Worker threads, one per shard (none for one shard: map then runs in the caller's
    thread), and a flag their step loops read between steps: set when the caller stops
    waiting for them (an exception, such as a second Ctrl-C), so that leaving the pool takes
    a step rather than the rest of a block."""

    def __init__(self, executor: ThreadPoolExecutor | None):
        self._executor = executor
        self.abandoned = threading.Event()

    def map(self, fn, *iterables):
        return (self._executor.map if self._executor else map)(fn, *iterables)


@contextmanager
def shard_pool(shards: int) -> Iterator[ShardPool]:
    """Worker threads for the shards of a CPU population (none for one shard). Leaving it
    waits until its threads have ended for the system too (threads_gone)."""
    if shards <= 1:
        yield ShardPool(None)
        return
    ids: list[int] = []

    def start() -> None:
        ids.append(threading.get_native_id())
        torch.set_num_threads(1)

    try:
        with ThreadPoolExecutor(shards, thread_name_prefix="bnexp-shard",
                                initializer=start) as executor:
            pool = ShardPool(executor)
            try:
                yield pool
            except BaseException:
                pool.abandoned.set()  # the executor's exit then waits a step, not a block
                raise
    finally:
        threads_gone(ids)


# How long leaving a pool waits for its threads' last native code; they take microseconds
# unless the machine is loaded.
THREAD_EXIT_WAIT_S = 5.0


def threads_gone(native_ids: list[int], timeout: float = THREAD_EXIT_WAIT_S) -> bool:
    """Wait until the threads with these ids have ended for the system, not only for Python
    (whether they have, on Linux; elsewhere True at once).

    Joining a thread returns before its native exit: MKL then still frees the thread's
    buffers under a lock of its own, and a process forked in that moment (a worker,
    engine/processes.py) inherits the lock held and spins on its first matrix product
    forever. Measured with two processes on 2 cores, each repeating a population stopped
    and resumed in worker processes: one hung within 4 minutes.
    """
    deadline, left = time.monotonic() + timeout, native_ids
    while left := [i for i in left if os.path.exists(f"/proc/self/task/{i}")]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True
