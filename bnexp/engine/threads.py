"""CPU threads: the math of every model runs on one thread, models are spread over threads.

Why: a multi-threaded CPU kernel splits its work by the tensor's total size and the thread
count, so a model's rounding would depend on how many models share its tensors and on how
many threads ran them (MKL splits a small batched product across threads; an elementwise
kernel puts different elements in its scalar tail). With every kernel on one thread and each
model's arithmetic independent of its neighbours (engine/stack.py), a run's numbers are the
same bytes alone or in any population, with any thread count, under any load. The cores are
still used: the population is cut into shards of models, one thread each.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

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


@contextmanager
def shard_pool(shards: int) -> Iterator[ThreadPoolExecutor | None]:
    """Worker threads for the shards of a CPU population (None for one shard)."""
    if shards <= 1:
        yield None
        return
    with ThreadPoolExecutor(shards, thread_name_prefix="bnexp-shard",
                            initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield pool
