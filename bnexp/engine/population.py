"""The population engine: many MLPs trained at once as stacked tensors on one batch stream.

The math of a stack of models lives in engine/stack.py and engine/backward.py, the stacks
and shards of a population in engine/shards.py; this module runs the training loop over the
shared mini-batch streams, evaluates, and checkpoints. Nothing in the loop reads a value
back to the host: losses, the divergence step and the running loss sum stay on the device
and are read at evaluation time only.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import torch

from bnexp.config import RunConfig
from bnexp.data import BatchStream, Split
from bnexp.engine.capture import sync
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
from bnexp.engine.members import correct, model_state
from bnexp.engine.precision import cuda_precision
from bnexp.engine.processes import ShardProcesses, processes_pay
from bnexp.engine.shards import (
    Shard,
    build_stacks,
    compile_cpu,
    next_block,
    retire,
    stack_kind,
    stream_seeds,
)
from bnexp.engine.stack import Stack
from bnexp.engine.threads import cpu_shards, shard_pool, single_threaded_kernels


def population_can_train(run: RunConfig) -> bool:
    """What the stacked engine expresses; the rest trains on the reference engine."""
    return run.arch == "mlp" and run.bn_impl == "torch"


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
            and len({stack_kind(run) for run in runs}) == 1)


def train_population(runs: list[RunConfig], split: Split, device: torch.device,
                     progress: Progress | None = None, keep_states: bool = False,
                     cuda_graph: bool = True, resume: list[dict] | None = None,
                     on_checkpoint: Callable[[int, dict], None] | None = None,
                     on_evaluate: OnEvaluate | None = None,
                     compile_step: bool = False,
                     stop: threading.Event | None = None,
                     shard_processes: bool | None = None) -> list[RunResult]:
    """Train every model of runs (which share a population key) together.

    resume holds one checkpoint per run, all taken at the same step; on_checkpoint(r, data)
    receives run r's checkpoint at the first evaluation after every checkpoint_every steps
    and at the end; on_evaluate(r, models) follows every evaluation (and a resume).
    On the CPU the models are spread over shards, up to torch.get_num_threads() of them:
    worker processes, one network or more each, where shard_processes asks for them or by
    default where enough steps are left (processes.processes_pay); else threads of this
    process, about sqrt(M) of them (threads.cpu_shards). On CUDA the step is captured as a
    CUDA graph. Either is compiled first where compile_step and
    should_compile say so (the result's execution says which path ran); products are in
    TF32 only for dtype tf32. A run's numbers are the same alone, in any population, resumed
    or not, with any threads (unless compiled).
    """
    with single_threaded_kernels(device) as threads, cuda_precision(runs[0].dtype, device):
        n_models = sum(len(run.batch_norm) for run in runs)
        compiled = should_compile(runs, device, compile_step)
        cpu = device.type == "cpu"
        steps_left = runs[0].steps - (resume[0]["step"] if resume else 0)
        every = min(threads, n_models)  # a thread (or worker) per network, up to threads
        # in processes every network may have a core; as threads they wait for the GIL
        processes = processes_pay(device, every, steps_left, compiled, shard_processes)
        shards = every if processes else cpu_shards(threads, n_models, compiled) if cpu else 1
        # evaluation's products are large: every stack may have a thread there
        with (shard_pool(every if cpu else 1) as pool,
              ShardProcesses() as workers):
            return _train(runs, split.astype(DTYPES[runs[0].dtype]), device, shards, pool,
                          workers if processes else None, progress, keep_states, cuda_graph,
                          resume, on_checkpoint, on_evaluate or (lambda r, models: None),
                          compiled, stop)


def _train(runs, split: Split, device: torch.device, n_shards: int, pool,
           workers: ShardProcesses | None, progress,
           keep_states: bool, cuda_graph: bool, resume, on_checkpoint,
           on_evaluate: OnEvaluate, compile_step: bool,
           stop: threading.Event | None) -> list[RunResult]:
    first = runs[0]
    start = time.perf_counter()
    groups, where = build_stacks(runs, device, n_shards)
    stacks = [stack for group in groups for stack in group]
    n_models = sum(s.m for s in stacks)
    streams = {seed: BatchStream(split.train_x.shape[0], first.batch_size, seed, device)
               for seed in stream_seeds(runs)}
    block = torch.zeros(min(first.eval_every, first.steps), len(streams) * first.batch_size,
                        dtype=torch.long, device=device)
    shards = [Shard(group, split, block, len(streams), device, cuda_graph, compile_step)
              for group in groups]
    if compile_step and device.type == "cpu":
        compile_cpu(shards, stacks)
    each = pool.map
    each_shard = each if len(shards) > 1 else map
    if workers is not None:
        workers.shards = shards

    def in_threads(n: int) -> None:
        list(each_shard(lambda shard: shard.train_block(n, pool.abandoned), shards))

    def train_block(n: int) -> None:
        if workers is not None:
            workers.train_block(n, in_threads)
        else:
            in_threads(n)
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
            graves.extend(retire(shards, where))

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

    done, train_time, earlier = 0, 0.0, (0.0, 0.0)
    if resume:
        done, train_time, eval_time = restore(resume, runs, stacks, where, results, streams)
        earlier = (train_time, eval_time)
        for shard in shards:
            shard.step.fill_(done)
        for r in range(len(runs)):  # the live metrics go back to the checkpoint's step
            on_evaluate(r, results[r])
        retire_dead()  # as the uninterrupted run did at this step
    else:
        evaluate(0, 0)
    next_checkpoint = done + first.checkpoint_every
    for n_block in remaining_blocks(first, done):
        block[:n_block].copy_(next_block(streams.values(), n_block))
        tick = time.perf_counter()
        train_block(n_block)
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
    tick = time.perf_counter()
    _finish(runs, all_stacks(), where, results, split, keep_states, each)
    eval_time += time.perf_counter() - tick  # the final test accuracy is an evaluation too
    wall = time.perf_counter() - start
    population = uuid.uuid4().hex
    return [RunResult(run, str(device), "population", results[r], wall, n_models,
                      shards[0].execution, train_time_s=train_time,
                      compile_time_s=sum(shard.compile_s for shard in shards),
                      eval_time_s=eval_time, resumed_train_time_s=earlier[0],
                      resumed_eval_time_s=earlier[1], threads=len(shards),
                      shards_in=("processes" if workers is not None and not workers.unavailable
                                 else "threads"),
                      population_id=population)
            for r, run in enumerate(runs)]


def _accuracies(stack: Stack, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    return [c / x.shape[0] for c in correct(stack, x, y)[0].tolist()]


def _finish(runs, stacks, where, results, split: Split, keep_states: bool, each=map) -> None:
    """Final accuracies (each stack's on a thread of each, as evaluations are), divergence
    steps and, where kept, the models' states."""
    on_val = runs[0].eval_split != "validation"  # else the curves' last value is final

    def finals(s: Stack) -> tuple[list[float], list[float] | None]:
        return (_accuracies(s, split.test_x, split.test_y),
                _accuracies(s, split.val_x, split.val_y) if on_val else None)

    tests, vals = zip(*each(finals, stacks))
    diverged = [s.diverged_at.tolist() for s in stacks]
    for (r, bn), (stack, i) in where.items():
        k = stacks.index(stack)
        model = results[r][run_variant(runs[r], bn)]
        model.final_val_acc = vals[k][i] if on_val else model.val_acc[-1]
        model.final_test_acc = tests[k][i]
        model.diverged_step = diverged[k][i] if diverged[k][i] >= 0 else None
        if keep_states:
            model.state = model_state(stack, i)
