"""CUDA-graph capture of the population's training step, with an eager fallback."""

from __future__ import annotations

from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued device work, so that host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _capture(step_all: Callable[[], None], device: torch.device):
    """Record one training step as a CUDA graph; None where capture is not possible."""
    if device.type != "cuda":
        return None
    try:
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
    except Exception:  # fall back to eager steps; the result records which path ran
        return None


def capture_step(step_all: Callable[[], None], state: list[torch.Tensor],
                 device: torch.device):
    """Capture step_all as a CUDA graph, undoing the warm-up steps that capture needs.

    state lists every tensor a step changes; each is restored after capture.
    """
    if device.type != "cuda":
        return None
    saved = [t.detach().clone() for t in state]
    graph = _capture(step_all, device)
    for t, v in zip(state, saved):
        t.copy_(v)
    return graph
