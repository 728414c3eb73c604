"""The reference engine: one ordinary nn.Module and torch.optim.SGD per model, in turn.

It is deliberately plain; tests hold the population engine to its numbers. It also trains
what the population engine does not express (the hand-written BN layer, the ConvNet).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from bnexp.config import RunConfig
from bnexp.data import BatchStream, Split
from bnexp.engine.common import (
    DTYPES,
    TRAIN_EVAL_EXAMPLES,
    Interrupted,
    ModelResult,
    OnEvaluate,
    Progress,
    RunResult,
    eval_blocks,
    tracked_unit,
    variant_name,
)
from bnexp.engine.members import PERCENTILES
from bnexp.engine.precision import cuda_precision
from bnexp.engine.threads import single_threaded_kernels
from bnexp.models import MLP, ConvNet, initial_conv_weights, initial_weights


def build_model(run: RunConfig, batch_norm: bool) -> MLP | ConvNet:
    """The run's network for one variant, from the comparison's shared initial weights."""
    if run.arch == "convnet":
        weights = initial_conv_weights(run.conv_channels, run.init_scale, run.seed, run.init)
        return ConvNet(weights, run.activation, batch_norm, run.bn_decay, run.bn_scale,
                       run.norm, run.group_norm_groups)
    weights = initial_weights(run.layers, run.init_scale, run.seed, run.init)
    return MLP(weights, run.activation, batch_norm, run.bn_impl, run.bn_decay, run.bn_scale,
               run.bn_position, run.dropout, run.norm, run.group_norm_groups, run.seed)


@torch.no_grad()
def evaluate(model: MLP, x: torch.Tensor, y: torch.Tensor,
             probe: tuple[int, int] | None = None) -> tuple[float, list[float] | None]:
    """Inference-mode accuracy, and the tracked unit's input percentiles where probed."""
    model.eval()
    probed: list[torch.Tensor] = []
    correct = (model(x, probe, probed).argmax(dim=1) == y).sum().item()
    model.train()
    if not probed:
        return correct / x.shape[0], None
    q = torch.tensor(PERCENTILES, device=x.device, dtype=x.dtype)
    return correct / x.shape[0], torch.quantile(probed[0], q).tolist()


def _clip(model: MLP, run: RunConfig) -> None:
    if run.clip == "value":
        torch.nn.utils.clip_grad_value_(model.parameters(), run.clip_threshold)
    elif run.clip == "norm":
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.clip_threshold)


def train_model(run: RunConfig, batch_norm: bool, split: Split, device: torch.device,
                progress: Progress | None = None, keep_state: bool = False,
                on_record: Callable[[ModelResult], None] | None = None,
                stop: threading.Event | None = None) -> ModelResult:
    """Train one network of a comparison from the shared initial weights and batch stream;
    on_record(result) follows every evaluation; Interrupted at the evaluation after stop is
    set (the reference engine keeps no checkpoints: such a run starts over)."""
    model = build_model(run, batch_norm).to(device, DTYPES[run.dtype])
    dropout = getattr(model, "dropout", None)  # its masks follow the step (MLP only)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=run.lr)
    stream = BatchStream(split.train_x.shape[0], run.batch_size, run.seed, device)
    on_test = run.eval_split == "test"
    eval_x, eval_y = (split.test_x, split.test_y) if on_test else (split.val_x, split.val_y)
    probe = tracked_unit(run)
    fit_x, fit_y = split.train_x[:TRAIN_EVAL_EXAMPLES], split.train_y[:TRAIN_EVAL_EXAMPLES]
    result = ModelResult(variant_name(batch_norm, run.norm))

    def record(step: int, loss: float) -> None:
        tick = time.perf_counter()
        acc, percentiles = evaluate(model, eval_x, eval_y, probe)
        result.record(step, acc, loss, percentiles, train_acc=evaluate(model, fit_x, fit_y)[0])
        if on_record:
            on_record(result)
        result.eval_time_s += time.perf_counter() - tick

    record(0, math.nan)
    done, train_time = 0, 0.0
    for n_block in eval_blocks(run.steps, run.eval_every):
        tick = time.perf_counter()
        loss_sum = 0.0
        for idx in stream.next_indices(n_block):
            if dropout is not None:
                dropout.step = done + 1
            loss = F.cross_entropy(model(split.train_x[idx]), split.train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            _clip(model, run)
            optimizer.step()
            done += 1
            value = loss.item()
            loss_sum += value
            if not math.isfinite(value) and result.diverged_step is None:
                result.diverged_step = done
        train_time += time.perf_counter() - tick
        record(done, loss_sum / n_block)
        if progress:
            progress(n_block)
        if stop is not None and stop.is_set() and done < run.steps:
            raise Interrupted(done, checkpointed=False)
    tick = time.perf_counter()  # the final accuracies count as evaluation, as on stacks
    result.final_val_acc = (evaluate(model, split.val_x, split.val_y)[0] if on_test
                            else result.val_acc[-1])
    result.final_test_acc = evaluate(model, split.test_x, split.test_y)[0]
    result.eval_time_s += time.perf_counter() - tick
    result.train_time_s = train_time
    if keep_state:
        state = model.state_dict()
        result.state = {k: v.detach().cpu().clone() for k, v in state.items()
                        if not k.endswith("num_batches_tracked")}
    return result


def _live(on_evaluate: OnEvaluate | None, finished: list[ModelResult]):
    """on_record for the next model: the run's rows so far are the finished models' and its."""
    if on_evaluate is None:
        return None
    return lambda model: on_evaluate(0, finished + [model])


def train_reference(run: RunConfig, split: Split, device: torch.device,
                    progress: Progress | None = None, keep_states: bool = False,
                    on_evaluate: OnEvaluate | None = None,
                    stop: threading.Event | None = None) -> RunResult:
    """Train the variants of one comparison one after another (CPU kernels on one thread,
    so that the numbers do not depend on the thread count or the machine's load)."""
    start = time.perf_counter()
    models = []
    split = split.astype(DTYPES[run.dtype])
    for bn in run.batch_norm:  # dropout masks follow the seed and step (CounterDropout)
        with single_threaded_kernels(device), cuda_precision(run.dtype, device):
            models.append(train_model(run, bn, split, device, progress, keep_states,
                                      _live(on_evaluate, list(models)), stop))
    return RunResult(run, str(device), "reference", models, time.perf_counter() - start, 1,
                     train_time_s=sum(m.train_time_s for m in models),
                     eval_time_s=sum(m.eval_time_s for m in models))
