"""The population's training step compiled with torch.compile (Inductor) where asked: on CUDA
then captured as one CUDA graph, with fallbacks to the uncompiled graph and to eager steps; on
the CPU each shard's step through Inductor's C++ backend, with a fallback to eager steps."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def _copy_back(state: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """Put back the values of the training state that warm-up steps changed."""
    for t, v in zip(state, saved):
        t.copy_(v)


def sync(device: torch.device) -> None:
    """Wait for queued device work, so that host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _capture(step_all: Callable[[], None], device: torch.device):
    """Record one training step as a CUDA graph (after warm-up steps, which compile it)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            step_all()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_all()
    return graph


# Inductor settings for the step: no kernel chosen by timing where that changes numerics
# (deterministic), and kernels that do not change with the population's size where the
# installed torch offers that (batch_invariant). Settings a torch version lacks are skipped.
INDUCTOR_OPTIONS: dict[str, object] = {"deterministic": True, "batch_invariant": True}
# Retried without loop reordering: torch 2.11's scheduler asserts on layer norm's kernels there.
FALLBACK_OPTIONS: dict[str, object] = {"loop_ordering_after_fusion": False}


def compiled(step_all: Callable[[], None], options: dict[str, object] | None = None,
             fresh: bool = True) -> Callable[[], None]:
    """step_all through Inductor as one graph (no graph breaks), compiled afresh for each
    population (fresh: earlier entries dropped; its shapes are fixed, so earlier populations'
    entries would only be guards)."""
    import torch._inductor.config as inductor

    wanted = INDUCTOR_OPTIONS if options is None else options
    known = {k: v for k, v in wanted.items() if hasattr(inductor, k)}
    if fresh:
        torch.compiler.reset()
    return torch.compile(step_all, fullgraph=True, dynamic=False, options=known)


def compile_cpu_steps(steps: list[Callable[[], None]], state: list[torch.Tensor],
                      ) -> tuple[list[Callable[[], None]], str, float]:
    """(steps to run, execution, seconds spent compiling) for the CPU shards' steps.

    Each is compiled here, in the calling thread, by one warm-up call (the shards' threads
    then only run the compiled code); state lists every tensor a step changes and is restored
    afterwards. Where compiling fails, the steps run eagerly (execution "eager").
    """
    saved = [t.detach().clone() for t in state]
    start = time.perf_counter()  # importing the compiler counts too (about a second)
    import torch._dynamo.config as dynamo

    torch.compiler.reset()
    try:
        # one compiled graph per shard of the same code: room for all of them
        with dynamo.patch(recompile_limit=max(8, 2 * len(steps))):
            fast = [compiled(step, fresh=False) for step in steps]
            for step in fast:
                step()
        execution = "compiled"
    except Exception as exc:  # the result records the path that ran
        log.warning("training step: compiling failed (%s: %s); running it uncompiled",
                    type(exc).__name__, exc)
        fast, execution = steps, "eager"
    seconds = time.perf_counter() - start
    _copy_back(state, saved)
    return fast, execution, seconds


def capture_step(step_all: Callable[[], None], state: list[torch.Tensor],
                 device: torch.device, compile_step: bool = False,
                 ) -> tuple[torch.cuda.CUDAGraph | None, str, float]:
    """(graph, execution, seconds spent compiling and capturing) for step_all on CUDA.

    state lists every tensor a step changes; each is restored after the warm-up steps that
    compiling and capture need. Where compiling fails the uncompiled step is captured, and
    where capture fails the steps run eagerly; execution names the path that runs.
    """
    saved = [t.detach().clone() for t in state]
    start = time.perf_counter()
    # each attempt's step is made only if the ones before it failed (compiling resets dynamo)
    attempts = ([(lambda: compiled(step_all), "compiled+cuda-graph"),
                 (lambda: compiled(step_all, {**INDUCTOR_OPTIONS, **FALLBACK_OPTIONS}),
                  "compiled+cuda-graph")] if compile_step else []) + [
        (lambda: step_all, "cuda-graph")]
    graph, execution = None, "eager"
    for make, name in attempts:
        try:
            graph, execution = _capture(make(), device), name
            break
        except Exception as exc:  # the result records the path that ran
            log.warning("training step: %s failed (%s: %s); falling back", name,
                        type(exc).__name__, exc)
            _copy_back(state, saved)
    sync(device)
    seconds = time.perf_counter() - start
    _copy_back(state, saved)
    return graph, execution, seconds
