"""The reference engine: one ordinary nn.Module and torch.optim.SGD per model.

It is deliberately plain; tests hold the population engine to its numbers. It also trains
what the population engine does not express (the hand-written BN layer, the ConvNet).
"""

from __future__ import annotations

import math
import threading
import time
import uuid

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
from bnexp.engine.threads import shard_pool, single_threaded_kernels
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


# Examples per forward pass when evaluating. The ConvNet's first layer holds 368 MB of
# activations for 10,000 images at once; in passes of 500 an evaluation took half the time
# (single-threaded, 0.47 against 1.0 s; the MLP's 0.016 s either way; the same logits).
EVAL_ROWS = 500


@torch.no_grad()
def evaluate(model: MLP | ConvNet, x: torch.Tensor, y: torch.Tensor,
             probe: tuple[int, int] | None = None) -> tuple[float, list[float] | None]:
    """Inference-mode accuracy, and the tracked unit's input percentiles where probed."""
    model.eval()
    probed: list[torch.Tensor] = []
    hits = torch.zeros((), dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], EVAL_ROWS):
        rows = slice(start, start + EVAL_ROWS)
        hits += (model(x[rows], probe, probed).argmax(dim=1) == y[rows]).sum()
    model.train()
    accuracy = hits.item() / x.shape[0]
    if not probed:
        return accuracy, None
    q = torch.tensor(PERCENTILES, device=x.device, dtype=x.dtype)
    return accuracy, torch.quantile(torch.cat(probed), q).tolist()


def _clip(model: MLP | ConvNet, run: RunConfig) -> None:
    if run.clip == "value":
        torch.nn.utils.clip_grad_value_(model.parameters(), run.clip_threshold)
    elif run.clip == "norm":
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.clip_threshold)


class _Network:
    """One network of a comparison in training: its module and optimiser, its own batch
    stream (the comparison's seed, so the same batches as its twin) and its record."""

    def __init__(self, run: RunConfig, batch_norm: bool, split: Split, device: torch.device):
        self.run, self.split = run, split
        self.model = build_model(run, batch_norm).to(device, DTYPES[run.dtype])
        self.dropout = getattr(self.model, "dropout", None)  # masks follow the step (MLP)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=run.lr)
        self.stream = BatchStream(split.train_x.shape[0], run.batch_size, run.seed, device)
        self.result = ModelResult(variant_name(batch_norm, run.norm))
        self.done = 0
        self.loss_sum = 0.0

    def train(self, n_steps: int, abandoned: threading.Event) -> None:
        """n_steps SGD steps; the mean loss goes into the next row. Stops early once
        abandoned is set (the caller has given up on this run)."""
        split, result = self.split, self.result
        for idx in self.stream.next_indices(n_steps):
            if abandoned.is_set():
                return
            if self.dropout is not None:
                self.dropout.step = self.done + 1
            loss = F.cross_entropy(self.model(split.train_x[idx]), split.train_y[idx])
            self.optimizer.zero_grad()
            loss.backward()
            _clip(self.model, self.run)
            self.optimizer.step()
            self.done += 1
            value = loss.item()
            self.loss_sum += value
            if not math.isfinite(value) and result.diverged_step is None:
                result.diverged_step = self.done

    def record(self, n_steps: int) -> None:
        """A row of the record at this step: accuracies, and the mean loss of the n_steps
        steps since the last row (NaN for none)."""
        split, run = self.split, self.run
        on_test = run.eval_split == "test"
        eval_x, eval_y = (split.test_x, split.test_y) if on_test else (split.val_x, split.val_y)
        acc, percentiles = evaluate(self.model, eval_x, eval_y, tracked_unit(run))
        fit = evaluate(self.model, split.train_x[:TRAIN_EVAL_EXAMPLES],
                       split.train_y[:TRAIN_EVAL_EXAMPLES])[0]
        loss = self.loss_sum / n_steps if n_steps else math.nan
        self.result.record(self.done, acc, loss, percentiles, train_acc=fit)
        self.loss_sum = 0.0

    def finish(self, keep_state: bool) -> ModelResult:
        """The final accuracies (and the weights, where kept) into the record."""
        split, result = self.split, self.result
        result.final_val_acc = (evaluate(self.model, split.val_x, split.val_y)[0]
                                if self.run.eval_split == "test" else result.val_acc[-1])
        result.final_test_acc = evaluate(self.model, split.test_x, split.test_y)[0]
        if keep_state:
            state = self.model.state_dict()
            result.state = {k: v.detach().cpu().clone() for k, v in state.items()
                            if not k.endswith("num_batches_tracked")}
        return result


def train_reference(run: RunConfig, split: Split, device: torch.device,
                    progress: Progress | None = None, keep_states: bool = False,
                    on_evaluate: OnEvaluate | None = None,
                    stop: threading.Event | None = None,
                    threads: int | None = None) -> RunResult:
    """Train the networks of one comparison (plain and normalised); see train_references."""
    return train_references([run], split, device, progress, keep_states, on_evaluate, stop,
                            threads)[0]


def together_key(run: RunConfig, device: torch.device) -> tuple:
    """Runs of the reference engine with the same key can train in one train_references call:
    the same data, dtype (on CUDA TF32 is a process-wide switch) and evaluation steps."""
    return str(device), run.dataset, run.dtype, run.steps, run.eval_every


def train_references(runs: list[RunConfig], split: Split, device: torch.device,
                     progress: Progress | None = None, keep_states: bool = False,
                     on_evaluate: OnEvaluate | None = None,
                     stop: threading.Event | None = None,
                     threads: int | None = None) -> list[RunResult]:
    """Train the networks of some comparisons (plain and normalised), each an nn.Module of its
    own, in lock-step blocks between evaluations; on_evaluate(r, models) follows every
    evaluation of runs[r]; Interrupted at the evaluation after stop is set (the reference
    engine keeps no checkpoints: such runs start over). The runs share together_key.

    On the CPU the networks train side by side, a thread each (up to threads, by default
    torch's thread count). Every network's kernels run on one thread either way, so its
    numbers are the same bytes with any thread count, under any load, and alone or beside
    other runs' networks.
    """
    if len({together_key(run, device) for run in runs}) != 1:
        raise ValueError("runs trained together need the same data, dtype, steps and "
                         "evaluation steps")
    start = time.perf_counter()
    first = runs[0]
    split = split.astype(DTYPES[first.dtype])
    n_networks = sum(len(run.batch_norm) for run in runs)
    with single_threaded_kernels(device) as available, cuda_precision(first.dtype, device):
        workers = min(threads or available, n_networks) if device.type == "cpu" else 1
        with shard_pool(workers) as pool:
            each = pool.map
            by_run = [[_Network(run, bn, split, device) for bn in run.batch_norm]
                      for run in runs]
            networks = [network for mine in by_run for network in mine]
            train_time = eval_time = 0.0

            def evaluate_all(n_steps: int) -> None:
                nonlocal eval_time
                tick = time.perf_counter()
                list(each(lambda network: network.record(n_steps), networks))
                if on_evaluate:
                    for r, mine in enumerate(by_run):
                        on_evaluate(r, [network.result for network in mine])
                eval_time += time.perf_counter() - tick

            evaluate_all(0)
            done = 0
            for n_block in eval_blocks(first.steps, first.eval_every):
                tick = time.perf_counter()
                list(each(lambda network, n=n_block: network.train(n, pool.abandoned), networks))
                train_time += time.perf_counter() - tick
                done += n_block
                evaluate_all(n_block)
                if progress:
                    progress(n_block * n_networks)
                if stop is not None and stop.is_set() and done < first.steps:
                    raise Interrupted(done, checkpointed=False)
            tick = time.perf_counter()  # the final accuracies count as evaluation, as on stacks
            list(each(lambda network: network.finish(keep_states), networks))
            eval_time += time.perf_counter() - tick
    wall, together = time.perf_counter() - start, uuid.uuid4().hex
    return [RunResult(run, str(device), "reference", [network.result for network in mine],
                      wall, n_networks, train_time_s=train_time, eval_time_s=eval_time,
                      threads=workers, population_id=together)
            for run, mine in zip(runs, by_run, strict=True)]
