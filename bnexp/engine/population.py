"""The population engine: many MLPs trained at once as stacked tensors on one batch stream.

The math of a stack of models lives in engine/stack.py; this module builds the stacks of a
population, runs the training loop over the shared mini-batch stream, evaluates, and
checkpoints. Nothing in the loop reads a value back to the host: losses, the divergence step
and the running loss sum stay on the device and are read at evaluation time only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bnexp.config import RunConfig
from bnexp.data import BatchStream, Split
from bnexp.engine.capture import capture_step, sync
from bnexp.engine.checkpoint import make_checkpoints, remaining_blocks, restore
from bnexp.engine.common import (
    DTYPES,
    TRAIN_EVAL_EXAMPLES,
    ModelResult,
    OnEvaluate,
    Progress,
    RunResult,
    run_variant,
    tracked_unit,
    variant_name,
)
from bnexp.engine.stack import Stack, StackKind
from bnexp.engine.threads import shard_pool, single_threaded_kernels
from bnexp.models import initial_weights


def population_can_train(run: RunConfig) -> bool:
    """What the stacked engine expresses; the rest trains on the reference engine."""
    return (run.arch == "mlp" and run.norm == "batch" and run.bn_position == "before"
            and run.dropout == 0 and run.bn_impl == "torch")


def _kind(run: RunConfig, batch_norm: bool) -> StackKind:
    return StackKind(run.activation, batch_norm, run.bn_scale, run.clip, run.clip_threshold)


def _build_stacks(runs: list[RunConfig], device: torch.device, shards: int = 1):
    """Stacks by shard and StackKind, and each model's (stack, index) by (run index, batch_norm).

    The models, ordered by kind, are dealt into shards of nearly equal size; a shard holds one
    stack per kind among its models. A model's numbers do not depend on its shard or stack.
    """
    by_kind: dict[StackKind, list[tuple[int, RunConfig]]] = {}
    for r, run in enumerate(runs):
        for bn in run.batch_norm:
            by_kind.setdefault(_kind(run, bn), []).append((r, run))
    models = [(kind, r, run) for kind, group in by_kind.items() for r, run in group]
    shards = max(1, min(shards, len(models)))
    bounds = [len(models) * s // shards for s in range(shards + 1)]
    dtype = DTYPES[runs[0].dtype]
    groups, where = [], {}
    for lo, hi in zip(bounds, bounds[1:]):
        members: dict[StackKind, list[tuple[int, RunConfig]]] = {}
        for kind, r, run in models[lo:hi]:
            members.setdefault(kind, []).append((r, run))
        group = []
        for kind, part in members.items():
            weights = [initial_weights(run.layers, run.init_scale, run.seed, run.init)
                       for _, run in part]
            stack = Stack(weights, [run.lr for _, run in part], kind, device,
                          [run.bn_decay for _, run in part], dtype)
            for i, (r, _) in enumerate(part):
                where[(r, kind.batch_norm)] = (stack, i)
            group.append(stack)
        groups.append(group)
    return groups, where


class _Shard:
    """Stacks trained by one thread (CPU) or one captured graph (CUDA), with their own counters.

    step_all runs one training step of every stack, reading batch k of the block of batch
    indices; k and step live on the device, so a captured step replays unchanged.
    """

    def __init__(self, stacks: list[Stack], split: Split, block: torch.Tensor,
                 device: torch.device, cuda_graph: bool):
        self.stacks = stacks
        self.k = torch.zeros(1, dtype=torch.long, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self._split, self._block = split, block
        state = [t for stack in stacks for t in stack.state_tensors()] + [self.k, self.step]
        self.graph = capture_step(self.step_all, state, device) if cuda_graph else None

    def step_all(self) -> None:
        batch_idx = self._block.index_select(0, self.k).view(-1)
        x = self._split.train_x.index_select(0, batch_idx)
        y = self._split.train_y.index_select(0, batch_idx)
        self.k.add_(1)
        self.step.add_(1)
        for stack in self.stacks:
            stack.train_step(x, y, self.step)

    def train_block(self, n_steps: int) -> None:
        self.k.zero_()
        for _ in range(n_steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step_all()


def train_population(runs: list[RunConfig], split: Split, device: torch.device,
                     progress: Progress | None = None, keep_states: bool = False,
                     cuda_graph: bool = True, resume: list[dict] | None = None,
                     on_checkpoint: Callable[[int, dict], None] | None = None,
                     on_evaluate: OnEvaluate | None = None) -> list[RunResult]:
    """Train every model of runs (which share a population key) together.

    resume holds one checkpoint per run, all taken at the same step; on_checkpoint(r, data)
    receives run r's checkpoint at the first evaluation after every checkpoint_every steps
    and at the end; on_evaluate(r, models) follows every evaluation (and a resume).
    On the CPU the models are spread over torch.get_num_threads() threads.
    A run's numbers are the same alone, in any population, resumed or not, with any threads.
    """
    with single_threaded_kernels(device) as threads:
        n_models = sum(len(run.batch_norm) for run in runs)
        shards = min(threads, n_models) if device.type == "cpu" else 1
        with shard_pool(shards) as pool:
            return _train(runs, split.astype(DTYPES[runs[0].dtype]), device, shards, pool,
                          progress, keep_states, cuda_graph, resume, on_checkpoint,
                          on_evaluate or (lambda r, models: None))


def _train(runs, split: Split, device: torch.device, n_shards: int, pool, progress,
           keep_states: bool, cuda_graph: bool, resume, on_checkpoint,
           on_evaluate: OnEvaluate) -> list[RunResult]:
    first = runs[0]
    start = time.perf_counter()
    groups, where = _build_stacks(runs, device, n_shards)
    stacks = [stack for group in groups for stack in group]
    n_models = sum(s.m for s in stacks)
    stream = BatchStream(split.train_x.shape[0], first.batch_size, first.seed, device)
    block = torch.zeros(min(first.eval_every, first.steps), first.batch_size, dtype=torch.long,
                        device=device)
    shards = [_Shard(group, split, block, device, cuda_graph) for group in groups]
    each = pool.map if pool else map
    results = [[ModelResult(variant_name(bn)) for bn in run.batch_norm] for run in runs]

    on_test = first.eval_split == "test"
    eval_x, eval_y = (split.test_x, split.test_y) if on_test else (split.val_x, split.val_y)
    probe = tracked_unit(first)
    train_x, train_y = (split.train_x[:TRAIN_EVAL_EXAMPLES], split.train_y[:TRAIN_EVAL_EXAMPLES])

    def evaluate(done: int, n_block: int) -> None:
        # Both accuracies in one pass over the shards (each shard's thread evaluates its own).
        outs = list(each(lambda s: (*s.correct(eval_x, eval_y, probe),
                                    s.correct(train_x, train_y)[0]), stacks))
        accs = [[n / eval_x.shape[0] for n in c.tolist()] for c, _, _ in outs]
        fits = [[n / train_x.shape[0] for n in c.tolist()] for _, _, c in outs]
        percentiles = [None if p is None else p.tolist() for _, p, _ in outs]
        losses = [(s.loss_sum / max(n_block, 1)).tolist() for s in stacks]
        for s in stacks:
            s.loss_sum.zero_()
        for (r, bn), (stack, i) in where.items():
            j = stacks.index(stack)
            loss = losses[j][i] if n_block else float("nan")
            unit = percentiles[j][i] if percentiles[j] is not None else None
            results[r][run_variant(runs[r], bn)].record(done, accs[j][i], loss, unit,
                                                        train_acc=fits[j][i])
        for r in range(len(runs)):
            on_evaluate(r, results[r])

    done, train_time = 0, 0.0
    if resume:
        done, train_time = restore(resume, runs, stacks, where, results, stream)
        for shard in shards:
            shard.step.fill_(done)
        for r in range(len(runs)):  # the live metrics go back to the checkpoint's step
            on_evaluate(r, results[r])
    else:
        evaluate(0, 0)
    next_checkpoint = done + first.checkpoint_every
    for n_block in remaining_blocks(first, done):
        block[:n_block].copy_(stream.next_indices(n_block))
        tick = time.perf_counter()
        list(each(lambda shard, n=n_block: shard.train_block(n), shards))
        sync(device)
        train_time += time.perf_counter() - tick
        done += n_block
        evaluate(done, n_block)
        if on_checkpoint and (done >= next_checkpoint or done == first.steps):
            for r, data in enumerate(make_checkpoints(runs, stacks, where, results, stream,
                                                      done, train_time)):
                on_checkpoint(r, data)
            next_checkpoint = done + first.checkpoint_every
        if progress:
            progress(n_block * n_models)
    _finish(runs, stacks, where, results, split, keep_states)
    wall = time.perf_counter() - start
    execution = "cuda-graph" if shards[0].graph is not None else "eager"
    return [RunResult(run, str(device), "population", results[r], wall, n_models, execution,
                      train_time_s=train_time)
            for r, run in enumerate(runs)]


def _accuracies(stack: Stack, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    return [c / x.shape[0] for c in stack.correct(x, y)[0].tolist()]


def _finish(runs, stacks, where, results, split: Split, keep_states: bool) -> None:
    tests = [_accuracies(s, split.test_x, split.test_y) for s in stacks]
    vals = (None if runs[0].eval_split == "validation"
            else [_accuracies(s, split.val_x, split.val_y) for s in stacks])
    diverged = [s.diverged_at.tolist() for s in stacks]
    for (r, bn), (stack, i) in where.items():
        k = stacks.index(stack)
        model = results[r][run_variant(runs[r], bn)]
        model.final_val_acc = model.val_acc[-1] if vals is None else vals[k][i]
        model.final_test_acc = tests[k][i]
        model.diverged_step = diverged[k][i] if diverged[k][i] >= 0 else None
        if keep_states:
            model.state = stack.model_state(i)
