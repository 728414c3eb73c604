"""The reference engine: one ordinary nn.Module and torch.optim.SGD per model, in turn.

It is deliberately plain; tests hold the population engine to its numbers.
"""

from __future__ import annotations

import math
import time

import torch
from torch.nn import functional as F

from bnexp.config import RunConfig
from bnexp.data import BatchStream, Split
from bnexp.engine.common import ModelResult, Progress, RunResult, eval_blocks, variant_name
from bnexp.models import MLP, initial_weights


@torch.no_grad()
def accuracy(model: MLP, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = (model(x).argmax(dim=1) == y).sum().item()
    model.train()
    return correct / x.shape[0]


def train_model(run: RunConfig, batch_norm: bool, split: Split, device: torch.device,
                progress: Progress | None = None, keep_state: bool = False) -> ModelResult:
    """Train one network of a comparison from the shared initial weights and batch stream."""
    weights = initial_weights(run.layers, run.init_scale, run.seed)
    model = MLP(weights, run.activation, batch_norm).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr)
    stream = BatchStream(split.train_x.shape[0], run.batch_size, run.seed, device)
    result = ModelResult(variant_name(batch_norm))
    result.record(0, accuracy(model, split.val_x, split.val_y), math.nan)
    done = 0
    train_time = 0.0
    for n_block in eval_blocks(run.steps, run.eval_every):
        tick = time.perf_counter()
        loss_sum = 0.0
        for idx in stream.next_indices(n_block):
            loss = F.cross_entropy(model(split.train_x[idx]), split.train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            value = loss.item()
            loss_sum += value
            if not math.isfinite(value) and result.diverged_step is None:
                result.diverged_step = done
        train_time += time.perf_counter() - tick
        result.record(done, accuracy(model, split.val_x, split.val_y), loss_sum / n_block)
        if progress:
            progress(n_block)
    result.final_val_acc = result.val_acc[-1]
    result.final_test_acc = accuracy(model, split.test_x, split.test_y)
    result.train_time_s = train_time
    if keep_state:
        state = model.state_dict()
        result.state = {k: v.detach().cpu().clone() for k, v in state.items()
                        if not k.endswith("num_batches_tracked")}
    return result


def train_reference(run: RunConfig, split: Split, device: torch.device,
                    progress: Progress | None = None, keep_states: bool = False) -> RunResult:
    """Train the variants of one comparison one after another."""
    start = time.perf_counter()
    models = [train_model(run, bn, split, device, progress, keep_states) for bn in run.batch_norm]
    return RunResult(run, str(device), "reference", models, time.perf_counter() - start, 1,
                     train_time_s=sum(m.train_time_s for m in models))
