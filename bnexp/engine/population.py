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
    pop = _Population(runs, split, device, n_shards, pool, workers, cuda_graph, compile_step)
    done = 0
    if resume:
        done = pop.restore(resume)
        # the live metrics go back to the checkpoint's step, and dead networks leave the
        # step as they did there in the uninterrupted run
        pop.announce(on_evaluate)
    else:
        pop.evaluate(0, 0, on_evaluate)
    next_checkpoint = done + first.checkpoint_every
    for n_block in remaining_blocks(first, done):
        pop.train_block(n_block)
        done += n_block
        pop.evaluate(done, n_block, on_evaluate)
        stopping = stop is not None and stop.is_set() and done < first.steps
        if on_checkpoint and (done >= next_checkpoint or done == first.steps or stopping):
            for r, data in enumerate(pop.checkpoints(done)):
                on_checkpoint(r, data)
            next_checkpoint = done + first.checkpoint_every
        if progress:
            progress(n_block * pop.n_models)
        if stopping:
            raise Interrupted(done, checkpointed=on_checkpoint is not None)
    pop.finish(keep_states)
    return pop.run_results(time.perf_counter() - start)


class _Population:
    """One population while it trains: its shards (in threads or worker processes), where
    each run's models are, and what has been measured of them."""

    def __init__(self, runs: list[RunConfig], split: Split, device: torch.device,
                 n_shards: int, pool, workers: ShardProcesses | None, cuda_graph: bool,
                 compile_step: bool) -> None:
        first = runs[0]
        self.runs, self.split, self.device, self.pool, self.workers = (runs, split, device,
                                                                       pool, workers)
        groups, self.where = build_stacks(runs, device, n_shards)
        self.n_models = sum(stack.m for group in groups for stack in group)
        self.streams = {seed: BatchStream(split.train_x.shape[0], first.batch_size, seed,
                                          device)
                        for seed in stream_seeds(runs)}
        self.block = torch.zeros(min(first.eval_every, first.steps),
                                 len(self.streams) * first.batch_size, dtype=torch.long,
                                 device=device)
        self.shards = [Shard(group, split, self.block, len(self.streams), device, cuda_graph,
                             compile_step) for group in groups]
        if compile_step and device.type == "cpu":
            compile_cpu(self.shards, [stack for group in groups for stack in group])
        if workers is not None:
            workers.shards = self.shards
        self.results = [[ModelResult(variant_name(bn, run.norm)) for bn in run.batch_norm]
                        for run in runs]
        on_test = first.eval_split == "test"
        self.eval_x, self.eval_y = ((split.test_x, split.test_y) if on_test
                                    else (split.val_x, split.val_y))
        self.train_x = split.train_x[:TRAIN_EVAL_EXAMPLES]
        self.train_y = split.train_y[:TRAIN_EVAL_EXAMPLES]
        self.probe = tracked_unit(first)
        self.graves: list[Stack] = []  # the stacks of networks that left the step (retire)
        self.train_time = self.eval_time = 0.0
        self.earlier = (0.0, 0.0)  # training and evaluation time before a resume

    def live_stacks(self) -> list[Stack]:
        return [stack for shard in self.shards for stack in shard.stacks]

    def all_stacks(self) -> list[Stack]:
        return self.live_stacks() + self.graves

    def restore(self, resume: list[dict]) -> int:
        """The checkpoints' state, curves and times; the step they were taken at."""
        done, self.train_time, self.eval_time = restore(resume, self.runs, self.all_stacks(),
                                                        self.where, self.results,
                                                        self.streams)
        self.earlier = (self.train_time, self.eval_time)
        for shard in self.shards:
            shard.step.fill_(done)
        return done

    def _in_threads(self, n: int) -> None:
        each_shard = self.pool.map if len(self.shards) > 1 else map
        list(each_shard(lambda shard: shard.train_block(n, self.pool.abandoned), self.shards))

    def train_block(self, n: int) -> None:
        """The next n steps of every shard, on the streams' next batches."""
        self.block[:n].copy_(next_block(self.streams.values(), n))
        tick = time.perf_counter()
        if self.workers is not None:
            self.workers.train_block(n, self._in_threads)
        else:
            self._in_threads(n)
        sync(self.device)
        self.train_time += time.perf_counter() - tick

    def announce(self, on_evaluate: OnEvaluate) -> None:
        """Tell on_evaluate every run's curves so far, then let dead networks leave the step
        (where a unit is tracked they train on: its input may still move)."""
        for r, models in enumerate(self.results):
            on_evaluate(r, models)
        if self.probe is None:
            self.graves.extend(retire(self.shards, self.where))

    def evaluate(self, done: int, n_block: int, on_evaluate: OnEvaluate) -> None:
        """Record every model's accuracies and mean loss over the block just trained (none
        at step 0), tell on_evaluate, and let dead networks leave the step."""
        tick = time.perf_counter()
        live = self.live_stacks()
        # Both accuracies in one pass over the shards (each shard's thread evaluates its own).
        outs = list(self.pool.map(
            lambda s: (*correct(s, self.eval_x, self.eval_y, self.probe),
                       correct(s, self.train_x, self.train_y)[0]), live))
        accs = [[n / self.eval_x.shape[0] for n in c.tolist()] for c, _, _ in outs]
        fits = [[n / self.train_x.shape[0] for n in c.tolist()] for _, _, c in outs]
        percentiles = [None if p is None else p.tolist() for _, p, _ in outs]
        losses = [(s.loss_sum / max(n_block, 1)).tolist() for s in live]
        for s in live:
            s.loss_sum.zero_()
        for (r, bn), (stack, i) in self.where.items():
            model = self.results[r][run_variant(self.runs[r], bn)]
            if stack in self.graves:  # what training on would have measured: its NaN outputs'
                model.record(done, model.val_acc[-1], float("nan"), None,
                             train_acc=model.train_acc[-1])
                continue
            j = live.index(stack)
            loss = losses[j][i] if n_block else float("nan")
            unit = percentiles[j][i] if percentiles[j] is not None else None
            model.record(done, accs[j][i], loss, unit, train_acc=fits[j][i])
        self.announce(on_evaluate)
        self.eval_time += time.perf_counter() - tick

    def checkpoints(self, done: int) -> list[dict]:
        return make_checkpoints(self.runs, self.all_stacks(), self.where, self.results,
                                self.streams, done, self.train_time, self.eval_time)

    def finish(self, keep_states: bool) -> None:
        tick = time.perf_counter()
        _finish(self.runs, self.all_stacks(), self.where, self.results, self.split,
                keep_states, self.pool.map)
        self.eval_time += time.perf_counter() - tick  # the final test accuracy is one too

    def run_results(self, wall: float) -> list[RunResult]:
        population = uuid.uuid4().hex
        shards_in = ("processes" if self.workers is not None and not self.workers.unavailable
                     else "threads")
        return [RunResult(run, str(self.device), "population", self.results[r], wall,
                          self.n_models, self.shards[0].execution,
                          train_time_s=self.train_time,
                          compile_time_s=sum(shard.compile_s for shard in self.shards),
                          eval_time_s=self.eval_time, resumed_train_time_s=self.earlier[0],
                          resumed_eval_time_s=self.earlier[1], threads=len(self.shards),
                          shards_in=shards_in, population_id=population)
                for r, run in enumerate(self.runs)]


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
