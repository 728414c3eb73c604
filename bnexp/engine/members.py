"""The models of a stack one by one: their accuracy, their named state, and moving some of
them into a stack of their own (the dead ones, whose numbers can no longer change)."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from bnexp.engine.stack import Stack

EVAL_ELEMENTS = 1 << 25  # activations per evaluation chunk (128 MiB of fp32)
EVAL_ROWS = 1000  # examples per evaluation product: fixed, so a model's logits never depend on M
PERCENTILES = (0.15, 0.50, 0.85)  # of a tracked unit's input, as in the BN paper's Figure 1


@torch.no_grad()
def correct(stack: Stack, x: torch.Tensor, y: torch.Tensor,
            probe: tuple[int, int] | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inference-mode correct predictions per model of x (N, n_in) shared by all, batched
    over the population; with a probe, also the 15/50/85th percentiles of that unit's
    activation input, (M, 3)."""
    widest = max([x.shape[1]] + [w.shape[1] for w in stack.w])
    per_chunk = max(1, EVAL_ELEMENTS // (EVAL_ROWS * widest))
    counts, percentiles = [], []
    for lo in range(0, stack.m, per_chunk):
        part = _models(stack, lo, min(lo + per_chunk, stack.m))
        hits = torch.zeros(part.m, dtype=torch.long, device=x.device)
        probed: list[torch.Tensor] = []
        for start in range(0, x.shape[0], EVAL_ROWS):
            rows = slice(start, start + EVAL_ROWS)
            logits = part.forward(x[None, rows], train=False, probe=probe, probed=probed)
            hits += (logits.argmax(dim=2) == y[rows]).sum(dim=1)
        counts.append(hits)
        if probed:
            q = torch.tensor(PERCENTILES, device=x.device, dtype=x.dtype)
            percentiles.append(torch.quantile(torch.cat(probed, dim=1), q, dim=1).t())
    return torch.cat(counts), (torch.cat(percentiles) if percentiles else None)


def _models(stack: Stack, lo: int, hi: int) -> Stack:
    """Models lo..hi-1 reading one shared batch, as a stack of their own that shares the
    stack's tensors (for inference)."""
    part = copy.copy(stack)
    part.m = hi - lo
    for name in ("w", "b", "gamma", "beta", "running_mean", "running_var"):
        setattr(part, name, [t[lo:hi] for t in getattr(stack, name)])
    for name in ("norm_mask", "bias_mask"):
        mask = getattr(stack, name)
        setattr(part, name, mask[lo:hi] if isinstance(mask, torch.Tensor) else mask)
    part.slices = [(a, max(s, lo) - lo, min(e, hi) - lo) for a, s, e in stack.slices
                   if s < hi and e > lo]
    part.one_stream = 0
    return part


def model_state(stack: Stack, i: int) -> dict[str, torch.Tensor]:
    """Model i's parameters and BN statistics, named as in models.MLP's state_dict."""
    return {k: v.detach().cpu().clone() for k, v in _named_views(stack, i).items()}


@torch.no_grad()
def load_model_state(stack: Stack, i: int, state: dict[str, torch.Tensor]) -> None:
    """Set model i from a state named as in models.MLP's state_dict (inverse of model_state)."""
    for key, target in _named_views(stack, i).items():
        target.copy_(state[key])


def state_shapes(stack: Stack, i: int) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor model_state names for model i (values not read)."""
    return {k: tuple(v.shape) for k, v in _named_views(stack, i).items()}


def _has(mask, i: int) -> bool:
    return bool(mask[i]) if isinstance(mask, torch.Tensor) else mask


def _named_views(stack: Stack, i: int) -> dict[str, torch.Tensor]:
    views = {f"linears.{l}.weight": w[i] for l, w in enumerate(stack.w)}
    has_bias = [_has(stack.bias_mask, i)] * stack.n_hidden + [True]
    views.update({f"linears.{l}.bias": b[i, 0] for l, b in enumerate(stack.b) if has_bias[l]})
    if not _has(stack.norm_mask, i):
        return views
    for l in range(stack.n_hidden):
        views[f"norms.{l}.weight"] = stack.gamma[l][i, 0]
        views[f"norms.{l}.bias"] = stack.beta[l][i, 0]
        if stack.running_mean:
            views[f"norms.{l}.running_mean"] = stack.running_mean[l][i, 0]
            views[f"norms.{l}.running_var"] = stack.running_var[l][i, 0]
    return views


def dead(stack: Stack) -> list[int]:
    """The models whose numbers can no longer change: diverged, with every output bias NaN.
    Their logits are NaN for any input from now on (NaN plus anything is NaN, and an SGD
    step keeps a NaN bias NaN), so their accuracy stays what it is and their loss NaN; only
    weights that no output depends on still move."""
    nan_out = torch.isnan(stack.b[-1]).flatten(1).all(dim=1) & (stack.diverged_at >= 0)
    return nan_out.nonzero().flatten().tolist()


def select(stack: Stack, rows: list[int]) -> Stack:
    """Models rows (ascending) as a stack of their own, holding copies of their state; their
    numbers go on as they would have in stack (a model's never depend on its stack)."""
    members = [replace(stack.members[i], weights=[w[i] for w in stack.w]) for i in rows]
    part = Stack(members, stack.kind, stack.device, stack.w[0].dtype)
    part.canvas_pad = stack.canvas_pad
    index = torch.tensor(rows, dtype=torch.long, device=stack.device)
    for name in ("b", "gamma", "beta", "running_mean", "running_var"):
        for new, old in zip(getattr(part, name), getattr(stack, name)):
            new.copy_(old.index_select(0, index))
    part.loss_sum.copy_(stack.loss_sum.index_select(0, index))
    part.diverged_at.copy_(stack.diverged_at.index_select(0, index))
    return part
