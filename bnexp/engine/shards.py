"""A population's stacks and shards: which models share a stack, how the stacks are dealt
into shards (one thread or worker process each on the CPU, one captured graph on CUDA), and
a shard's steps over a block of batches.

Within a shard every stack trains on the same step's batches (one per seed's stream); dead
networks leave an eager shard's step (retire), compiled ones keep their shapes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from bnexp.config import RunConfig
from bnexp.data import BatchStream, Split
from bnexp.engine.backward import train_step
from bnexp.engine.capture import capture_step, compile_cpu_steps
from bnexp.engine.common import DTYPES
from bnexp.engine.members import dead, select, state_shapes
from bnexp.engine.stack import Member, Stack, StackKind
from bnexp.models import initial_weights


def stack_kind(run: RunConfig) -> StackKind:
    """What a run's networks share with their stack-mates."""
    return StackKind(run.norm, run.bn_position, run.group_norm_groups, run.bn_scale, run.clip,
                     run.clip_threshold)


def named_shapes(run: RunConfig) -> dict[bool, dict[str, tuple[int, ...]]]:
    """The shape of every tensor a checkpoint holds for each of a run's models (by its
    batch_norm flag), read off a stack of them (uninitialised: about a megabyte)."""
    cpu = torch.device("cpu")
    weights = [torch.empty(o, i) for i, o in zip(run.layers, run.layers[1:])]
    stack = Stack([Member(run.activation, bn, run.lr, weights, 0, run.bn_decay, run.dropout,
                          run.seed) for bn in run.batch_norm], stack_kind(run), cpu,
                  DTYPES[run.dtype])
    return {bn: state_shapes(stack, i) for i, bn in enumerate(run.batch_norm)}


def stream_seeds(runs: list[RunConfig]) -> list[int]:
    """The population's batch streams: one per seed, in order of first appearance."""
    return list(dict.fromkeys(run.seed for run in runs))


def plain_apart(device: torch.device) -> bool:
    """Whether plain and normalised networks get stacks of their own: on the CPU, where
    computing both branches for every network costs more than a second stack does; on CUDA
    one stack means fewer kernels per step. A network's numbers are the same either way."""
    return device.type == "cpu"


def build_stacks(runs: list[RunConfig], device: torch.device, shards: int = 1,
                 one_stack: bool | None = None):
    """Stacks by shard and StackKind, and each model's (stack, index) by (run index, batch_norm).

    The models, ordered by kind and activation, are dealt into shards of nearly equal size; a
    shard holds one stack per kind among its models (on the CPU, per kind and BN flag; or as
    one_stack says, where given). A model's numbers do not depend on its shard, its stack or
    its neighbours.
    """
    slot = {seed: i for i, seed in enumerate(stream_seeds(runs))}
    weights = [initial_weights(run.layers, run.init_scale, run.seed, run.init) for run in runs]
    split_plain = plain_apart(device) if one_stack is None else not one_stack
    models = sorted(((stack_kind(run), bn if split_plain else None, run.activation, r, bn)
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


class Shard:
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
        # on the CPU, the step compiled where asked (compile_cpu_steps); not self.step_all
        # when uncompiled: a bound method held by its own object would keep the shard and
        # its stacks (and, in worker processes, their shared-memory files) alive until
        # Python's cycle collector runs
        self.compiled_step: Callable[[], None] | None = None
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
            train_step(stack, x, y, self.step)

    def rehearse(self) -> None:
        """Every stack's inference pass on a batch of zeros: the training step's forward
        products, with its shapes and layouts, changing nothing."""
        x = self._split.train_x
        batch = self._block.shape[1] // self._n_streams
        with torch.no_grad():
            zeros = torch.zeros(self._n_streams, batch, x.shape[1], dtype=x.dtype,
                                device=x.device)
            for stack in self.stacks:
                stack.forward(zeros, train=False)

    def shared_state(self) -> list[torch.Tensor]:
        """What its steps change and what they read from the caller (the block of batch
        indices): what a worker process training it shares with its parent."""
        return ([self.k, self.step, self._block]
                + [t for stack in self.stacks for t in stack.state_tensors()])

    def train_block(self, n_steps: int, abandoned: threading.Event) -> None:
        """n_steps steps on the block's batches; stops early once abandoned is set (the
        caller has given up on this population)."""
        self.k.zero_()
        for _ in range(n_steps):
            if abandoned.is_set():
                return
            if self.graph is not None:
                self.graph.replay()
            elif self.compiled_step is not None:
                self.compiled_step()
            else:
                self.step_all()


def retire(shards: list[Shard], where: dict) -> list[Stack]:
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


def compile_cpu(shards: list[Shard], stacks: list[Stack]) -> None:
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
        shard.compiled_step = None if execution == "eager" else step
        shard.execution = execution
    shards[0].compile_s = seconds


def next_block(streams, n_steps: int) -> torch.Tensor:
    """The next n_steps steps' batch indices of every stream, side by side: (n_steps, S * B)."""
    return torch.cat([stream.next_indices(n_steps) for stream in streams], dim=1)


def one_shard(runs: list[RunConfig], split: Split, device: torch.device,
              compiling: bool = False, one_stack: bool | None = None,
              n_steps: int = 1) -> Shard:
    """Every model of runs in one shard, over a block of the first n_steps batches of each
    seed's stream (for counting, profiling and testing what a step does).
    compiling: laid out for torch.compile (unpadded canvases, as a compiled shard has);
    one_stack: plain and normalised networks in one stack or apart (default: the device's
    layout, plain_apart)."""
    groups, _ = build_stacks(runs, device, 1, one_stack)
    if compiling:
        for stack in groups[0]:
            stack.canvas_pad = 0
    seeds = stream_seeds(runs)
    block = next_block([BatchStream(split.train_x.shape[0], runs[0].batch_size, seed, device)
                         for seed in seeds], n_steps)
    return Shard(groups[0], split.astype(DTYPES[runs[0].dtype]), block, len(seeds), device,
                 cuda_graph=False, compile_step=False)


def one_step(runs: list[RunConfig], split: Split, device: torch.device,
             compiling: bool = False, one_stack: bool | None = None) -> Callable[[], None]:
    """One training step of every model of runs, as a function (for counting and profiling
    what a step dispatches); it reads the first batch of each seed's stream, every call
    (compiling, one_stack: as one_shard)."""
    shard = one_shard(runs, split, device, compiling, one_stack)

    def step() -> None:
        shard.k.zero_()
        shard.step_all()

    return step
