"""The population engine: many MLPs trained at once as stacked tensors on one batch stream.

The math of a stack of models lives in engine/stack.py; this module builds the stacks of a
population, runs the training loop over the shared mini-batch stream, evaluates, and
checkpoints. Nothing in the loop reads a value back to the host: losses, the divergence step
and the running loss sum stay on the device and are read at evaluation time only.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import torch

from bnexp.config import RunConfig
from bnexp.data import BatchStream, Split
from bnexp.engine.capture import capture_step, compile_cpu_steps, sync
from bnexp.engine.checkpoint import make_checkpoints, remaining_blocks, restore
from bnexp.engine.common import (
    DTYPES,
    TRAIN_EVAL_EXAMPLES,
    Interrupted,
    ModelResult,
    OnEvaluate,
    Progress,
    RunResult,
    run_variant,
    tracked_unit,
    variant_name,
)
from bnexp.engine.members import correct, dead, model_state, select
from bnexp.engine.precision import cuda_precision
from bnexp.engine.stack import Member, Stack, StackKind
from bnexp.engine.threads import cpu_shards, shard_pool, single_threaded_kernels
from bnexp.models import initial_weights


def population_can_train(run: RunConfig) -> bool:
    """What the stacked engine expresses; the rest trains on the reference engine."""
    return run.arch == "mlp" and run.bn_impl == "torch"


def _kind(run: RunConfig) -> StackKind:
    return StackKind(run.norm, run.bn_position, run.group_norm_groups, run.bn_scale, run.clip,
                     run.clip_threshold)


def stream_seeds(runs: list[RunConfig]) -> list[int]:
    """The population's batch streams: one per seed, in order of first appearance."""
    return list(dict.fromkeys(run.seed for run in runs))


def _build_stacks(runs: list[RunConfig], device: torch.device, shards: int = 1):
    """Stacks by shard and StackKind, and each model's (stack, index) by (run index, batch_norm).

    The models, ordered by kind and activation, are dealt into shards of nearly equal size; a
    shard holds one stack per kind among its models (on the CPU, per kind and BN flag). A
    model's numbers do not depend on its shard, its stack or its neighbours.
    """
    slot = {seed: i for i, seed in enumerate(stream_seeds(runs))}
    weights = [initial_weights(run.layers, run.init_scale, run.seed, run.init) for run in runs]
    # On the CPU, plain and normalised networks get stacks of their own: computing both
    # branches for every network costs more there than a second stack does (a network's
    # numbers are the same either way). On CUDA one stack means fewer kernels per step.
    split_plain = device.type == "cpu"
    models = sorted(((_kind(run), bn if split_plain else None, run.activation, r, bn)
                     for r, run in enumerate(runs) for bn in run.batch_norm),
                    key=lambda m: (repr(m[0]), repr(m[1]), m[2]))
    shards = max(1, min(shards, len(models)))
    bounds = [len(models) * s // shards for s in range(shards + 1)]
    dtype = DTYPES[runs[0].dtype]
    groups, where = [], {}
    for lo, hi in zip(bounds, bounds[1:]):
        members: dict[tuple, list[tuple[int, bool]]] = {}
        for kind, apart, _, r, bn in models[lo:hi]:
            members.setdefault((kind, apart), []).append((r, bn))
        group = []
        for (kind, _), part in members.items():
            stack = Stack([Member(runs[r].activation, bn, runs[r].lr, weights[r],
                                  slot[runs[r].seed], runs[r].bn_decay, runs[r].dropout,
                                  runs[r].seed) for r, bn in part],
                          kind, device, dtype)
            for i, (r, bn) in enumerate(part):
                where[(r, bn)] = (stack, i)
            group.append(stack)
        groups.append(group)
    return groups, where


class _Shard:
    """Stacks trained by one thread (CPU) or one captured graph (CUDA), with their own counters.

    step_all runs one training step of every stack, reading batch k of the block of batch
    indices (one batch per stream); k and step live on the device, so a captured step replays
    unchanged.
    """

    def __init__(self, stacks: list[Stack], split: Split, block: torch.Tensor, n_streams: int,
                 device: torch.device, cuda_graph: bool, compile_step: bool):
        self.stacks = stacks
        self.k = torch.zeros(1, dtype=torch.long, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self._split, self._block, self._n_streams = split, block, n_streams
        state = [t for stack in stacks for t in stack.state_tensors()] + [self.k, self.step]
        self.state = state
        self.graph, self.execution, self.compile_s = None, "eager", 0.0
        self.run_step = self.step_all  # on the CPU, compiled where asked (compile_cpu_steps)
        if cuda_graph and device.type == "cuda":
            self.graph, self.execution, self.compile_s = capture_step(
                self.step_all, state, device, compile_step)

    def step_all(self) -> None:
        batch_idx = self._block.index_select(0, self.k).view(-1)
        x = self._split.train_x.index_select(0, batch_idx).view(self._n_streams, -1,
                                                                 self._split.train_x.shape[1])
        y = self._split.train_y.index_select(0, batch_idx).view(self._n_streams, -1)
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
                self.run_step()


def _retire(shards: list[_Shard], where: dict) -> list[Stack]:
    """Take the networks that can no longer change (members.dead) out of eager shards' steps:
    each stack with any is split into its live networks, which train on, and the dead ones,
    whose state is kept as it is; where follows. Returns the stacks of the dead networks.
    (A captured or compiled step keeps its shapes: its networks train to the end.)"""
    retired = []
    for shard in shards:
        if shard.execution != "eager":
            continue
        live = []
        for stack in shard.stacks:
            gone = dead(stack)
            if not gone:
                live.append(stack)
                continue
            alive = [i for i in range(stack.m) if i not in gone]
            parts = [(select(stack, gone), gone)] + ([(select(stack, alive), alive)] if alive
                                                     else [])
            moved = {i: (part, j) for part, rows in parts for j, i in enumerate(rows)}
            for key, (old, i) in list(where.items()):
                if old is stack:
                    where[key] = moved[i]
            retired.append(parts[0][0])
            live += [part for part, _ in parts[1:]]
        shard.stacks = live
    return retired


def _compile_cpu(shards: list[_Shard], stacks: list[Stack]) -> None:
    """Compile each CPU shard's step (its execution and compile time recorded on it)."""
    pads = [stack.canvas_pad for stack in stacks]
    for stack in stacks:
        stack.canvas_pad = 0  # Inductor writes no strided out= buffers
    steps, execution, seconds = compile_cpu_steps([s.step_all for s in shards],
                                                  [t for s in shards for t in s.state])
    if execution == "eager":  # uncompiled: the padded canvases again
        for stack, pad in zip(stacks, pads):
            stack.canvas_pad = pad
    for shard, step in zip(shards, steps):
        shard.run_step, shard.execution = step, execution
    shards[0].compile_s = seconds


def _next_block(streams, n_steps: int) -> torch.Tensor:
    """The next n_steps steps' batch indices of every stream, side by side: (n_steps, S * B)."""
    return torch.cat([stream.next_indices(n_steps) for stream in streams], dim=1)


def one_step(runs: list[RunConfig], split: Split, device: torch.device,
             compiling: bool = False) -> Callable[[], None]:
    """One training step of every model of runs, as a function (for counting and profiling
    what a step dispatches); it reads the first batch of each seed's stream, every call.
    compiling: laid out for torch.compile (unpadded canvases, as a compiled shard has)."""
    groups, _ = _build_stacks(runs, device, 1)
    if compiling:
        for stack in groups[0]:
            stack.canvas_pad = 0
    seeds = stream_seeds(runs)
    block = _next_block([BatchStream(split.train_x.shape[0], runs[0].batch_size, seed, device)
                         for seed in seeds], 1)
    shard = _Shard(groups[0], split.astype(DTYPES[runs[0].dtype]), block, len(seeds), device,
                   cuda_graph=False, compile_step=False)

    def step() -> None:
        shard.k.zero_()
        shard.step_all()

    return step


def should_compile(runs: list[RunConfig], device: torch.device, compile_step: bool) -> bool:
    """Compile only when asked (compile_step True), for a population of one StackKind.

    Not by default: Inductor picks kernels by the tensors' sizes, so a compiled run's rounding
    depends on how many networks share its population (measured on an H100: a run's bytes
    alone and among 24 networks agree, among 240 they differ), which would break "same
    config, same numbers". Populations of several stacks (clipping, BN after the activation,
    layer or group norm beside batch norm) stay uncompiled: only single-stack populations
    were measured on CUDA to agree with the uncompiled step (float64, 2e-15 over 100 steps).
    (The mixed population that drifted to 5e-5 there holds a tanh layer-norm network that
    amplifies any rounding difference tenfold every 6 to 8 steps: compiled with Inductor on
    the CPU it drifts the same way, and so does the eager step when that network's learning
    rate is changed by 2e-16; its other networks stay within 2e-15 and 1e-12.) On the CPU
    compiling pays most for small populations, whose steps are mostly per-operator overhead
    (2 to 8 networks: about 1.8x faster steps), less for large ones, whose time is in the
    matrix products (the lesson's 24 on 2 threads: 1.3x); it costs 20 to 75 s per
    population with a cold Inductor cache, about 4 s with a warm one. Compiled CPU kernels
    are not independent of the population either: with mixed populations compiled for the
    test, a sigmoid and an elu run gave other bytes alone than among other networks (16
    runs of the lesson's grid gave the same bytes alone and among 24 and 72 networks).
    """
    return (bool(compile_step) and device.type in ("cuda", "cpu")
            and len({_kind(run) for run in runs}) == 1)


def train_population(runs: list[RunConfig], split: Split, device: torch.device,
                     progress: Progress | None = None, keep_states: bool = False,
                     cuda_graph: bool = True, resume: list[dict] | None = None,
                     on_checkpoint: Callable[[int, dict], None] | None = None,
                     on_evaluate: OnEvaluate | None = None,
                     compile_step: bool = False,
                     stop: threading.Event | None = None) -> list[RunResult]:
    """Train every model of runs (which share a population key) together.

    resume holds one checkpoint per run, all taken at the same step; on_checkpoint(r, data)
    receives run r's checkpoint at the first evaluation after every checkpoint_every steps
    and at the end; on_evaluate(r, models) follows every evaluation (and a resume).
    On the CPU the models are spread over up to torch.get_num_threads() threads
    (threads.cpu_shards); on CUDA the step
    is captured as a CUDA graph. Either is compiled first where compile_step and
    should_compile say so (the result's execution says which path ran); products are in
    TF32 only for dtype tf32. A run's numbers are the same alone, in any population, resumed
    or not, with any threads (unless compiled).
    """
    with single_threaded_kernels(device) as threads, cuda_precision(runs[0].dtype, device):
        n_models = sum(len(run.batch_norm) for run in runs)
        compiled = should_compile(runs, device, compile_step)
        cpu = device.type == "cpu"
        shards = cpu_shards(threads, n_models, compiled) if cpu else 1
        # evaluation's products are large: every stack may have a thread there
        with shard_pool(min(threads, n_models) if cpu else 1) as pool:
            return _train(runs, split.astype(DTYPES[runs[0].dtype]), device, shards, pool,
                          progress, keep_states, cuda_graph, resume, on_checkpoint,
                          on_evaluate or (lambda r, models: None), compiled, stop)


def _train(runs, split: Split, device: torch.device, n_shards: int, pool, progress,
           keep_states: bool, cuda_graph: bool, resume, on_checkpoint,
           on_evaluate: OnEvaluate, compile_step: bool,
           stop: threading.Event | None) -> list[RunResult]:
    first = runs[0]
    start = time.perf_counter()
    groups, where = _build_stacks(runs, device, n_shards)
    stacks = [stack for group in groups for stack in group]
    n_models = sum(s.m for s in stacks)
    streams = {seed: BatchStream(split.train_x.shape[0], first.batch_size, seed, device)
               for seed in stream_seeds(runs)}
    block = torch.zeros(min(first.eval_every, first.steps), len(streams) * first.batch_size,
                        dtype=torch.long, device=device)
    shards = [_Shard(group, split, block, len(streams), device, cuda_graph, compile_step)
              for group in groups]
    if compile_step and device.type == "cpu":
        _compile_cpu(shards, stacks)
    each = pool.map if pool else map
    each_shard = each if len(shards) > 1 else map
    results = [[ModelResult(variant_name(bn, run.norm)) for bn in run.batch_norm]
               for run in runs]
    on_test = first.eval_split == "test"
    eval_x, eval_y = (split.test_x, split.test_y) if on_test else (split.val_x, split.val_y)
    probe = tracked_unit(first)
    train_x, train_y = (split.train_x[:TRAIN_EVAL_EXAMPLES], split.train_y[:TRAIN_EVAL_EXAMPLES])

    eval_time = 0.0
    graves: list[Stack] = []  # the stacks of networks that left the step (_retire)

    def live_stacks() -> list[Stack]:
        return [stack for shard in shards for stack in shard.stacks]

    def all_stacks() -> list[Stack]:
        return live_stacks() + graves

    def retire_dead() -> None:
        # where a unit is tracked dead networks train on: its input may still move
        if probe is None:
            graves.extend(_retire(shards, where))

    def evaluate(done: int, n_block: int) -> None:
        nonlocal eval_time
        tick = time.perf_counter()
        live = live_stacks()
        # Both accuracies in one pass over the shards (each shard's thread evaluates its own).
        outs = list(each(lambda s: (*correct(s, eval_x, eval_y, probe),
                                    correct(s, train_x, train_y)[0]), live))
        accs = [[n / eval_x.shape[0] for n in c.tolist()] for c, _, _ in outs]
        fits = [[n / train_x.shape[0] for n in c.tolist()] for _, _, c in outs]
        percentiles = [None if p is None else p.tolist() for _, p, _ in outs]
        losses = [(s.loss_sum / max(n_block, 1)).tolist() for s in live]
        for s in live:
            s.loss_sum.zero_()
        for (r, bn), (stack, i) in where.items():
            model = results[r][run_variant(runs[r], bn)]
            if stack in graves:  # what training on would have measured: its NaN outputs'
                model.record(done, model.val_acc[-1], float("nan"), None,
                             train_acc=model.train_acc[-1])
                continue
            j = live.index(stack)
            loss = losses[j][i] if n_block else float("nan")
            unit = percentiles[j][i] if percentiles[j] is not None else None
            model.record(done, accs[j][i], loss, unit, train_acc=fits[j][i])
        for r in range(len(runs)):
            on_evaluate(r, results[r])
        retire_dead()
        eval_time += time.perf_counter() - tick

    done, train_time = 0, 0.0
    if resume:
        done, train_time, eval_time = restore(resume, runs, stacks, where, results, streams)
        for shard in shards:
            shard.step.fill_(done)
        for r in range(len(runs)):  # the live metrics go back to the checkpoint's step
            on_evaluate(r, results[r])
        retire_dead()  # as the uninterrupted run did at this step
    else:
        evaluate(0, 0)
    next_checkpoint = done + first.checkpoint_every
    for n_block in remaining_blocks(first, done):
        block[:n_block].copy_(_next_block(streams.values(), n_block))
        tick = time.perf_counter()
        list(each_shard(lambda shard, n=n_block: shard.train_block(n), shards))
        sync(device)
        train_time += time.perf_counter() - tick
        done += n_block
        evaluate(done, n_block)
        stopping = stop is not None and stop.is_set() and done < first.steps
        if on_checkpoint and (done >= next_checkpoint or done == first.steps or stopping):
            for r, data in enumerate(make_checkpoints(runs, all_stacks(), where, results,
                                                      streams, done, train_time, eval_time)):
                on_checkpoint(r, data)
            next_checkpoint = done + first.checkpoint_every
        if progress:
            progress(n_block * n_models)
        if stopping:
            raise Interrupted(done, checkpointed=on_checkpoint is not None)
    _finish(runs, all_stacks(), where, results, split, keep_states)
    wall = time.perf_counter() - start
    population = uuid.uuid4().hex
    return [RunResult(run, str(device), "population", results[r], wall, n_models,
                      shards[0].execution, train_time_s=train_time,
                      compile_time_s=sum(shard.compile_s for shard in shards),
                      eval_time_s=eval_time, threads=len(shards), population_id=population)
            for r, run in enumerate(runs)]


def _accuracies(stack: Stack, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    return [c / x.shape[0] for c in correct(stack, x, y)[0].tolist()]


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
            model.state = model_state(stack, i)
