"""What both engines share: result records, the evaluation schedule and run grouping."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bnexp.config import ConfigError, RunConfig
from bnexp.engine import memory

Progress = Callable[[int], None]  # called with a number of network-steps just done
# Called after every evaluation with a run's index and its models' records so far.
OnEvaluate = Callable[[int, list["ModelResult"]], None]
# Training accuracy is measured on a fixed subset: the same images at every evaluation.
TRAIN_EVAL_EXAMPLES = 5_000


NORM_NAMES = {"batch": "bn", "layer": "ln", "group": "gn"}
# tensors' dtype by a run's dtype; tf32 keeps float32 tensors (engine/precision.py)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "tf32": torch.float32}


def variant_name(batch_norm: bool, norm: str = "batch") -> str:
    """'plain' without a normaliser, else 'bn', 'ln' or 'gn'."""
    return NORM_NAMES[norm] if batch_norm else "plain"


def run_variant(run: RunConfig, batch_norm: bool) -> int:
    """Index of a variant among the run's models."""
    return run.batch_norm.index(batch_norm)


@dataclass
class ModelResult:
    """One network's record: a row per evaluation plus final accuracies."""

    name: str
    steps: list[int] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # mean over the steps since the last row
    # inference-mode accuracy on the first TRAIN_EVAL_EXAMPLES training images (nan: not known)
    train_acc: list[float] = field(default_factory=list)
    # 15/50/85th percentiles of the tracked unit's activation input, per row (when tracked)
    unit_percentiles: list[list[float]] = field(default_factory=list)
    final_val_acc: float = math.nan
    final_test_acc: float = math.nan
    diverged_step: int | None = None
    state: dict[str, torch.Tensor] | None = None  # final weights, only when asked for

    def record(self, step: int, val_acc: float, train_loss: float,
               unit_percentiles: list[float] | None = None, train_acc: float = math.nan,
               ) -> None:
        self.steps.append(step)
        self.val_acc.append(val_acc)
        self.train_loss.append(train_loss)
        self.train_acc.append(train_acc)
        if unit_percentiles is not None:
            self.unit_percentiles.append(list(unit_percentiles))


@dataclass
class RunResult:
    """All models of one comparison, as trained by one engine."""

    config: RunConfig
    device: str
    engine: str
    models: list[ModelResult]
    wall_time_s: float
    population_size: int  # networks trained together (they share the wall time)
    execution: str = "eager"  # or "compiled" (CPU), "cuda-graph", "compiled+cuda-graph"
    train_time_s: float | None = None  # training steps alone, without evaluation and set-up
    compile_time_s: float = 0.0  # compiling and capturing the step (inside wall_time_s)
    eval_time_s: float = 0.0  # evaluating while training, live metrics written (inside too)
    # Of train_time_s and eval_time_s, what a resumed run spent before its checkpoint (not
    # in wall_time_s, which is this call's): a command's time line leaves it out.
    resumed_train_time_s: float = 0.0
    resumed_eval_time_s: float = 0.0
    threads: int = 1  # CPU: shards of the population trained side by side
    shards_in: str = "threads"  # CPU: a thread of this process per shard, or "processes"
    # The runs trained together share it (and the times above); each call trains one.
    population_id: str = field(default_factory=lambda: uuid.uuid4().hex)


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C) at an evaluation step; checkpoints for that step
    were handed to on_checkpoint first where the engine keeps them."""

    def __init__(self, step: int | None, checkpointed: bool):
        super().__init__("interrupted" + (f" at step {step:,}" if step is not None else ""))
        self.step, self.checkpointed = step, checkpointed  # step None: several, not known


def eval_blocks(steps: int, eval_every: int) -> list[int]:
    """Lengths of the training blocks between evaluations (the last may be shorter)."""
    full, rest = divmod(steps, eval_every)
    return [eval_every] * full + ([rest] if rest else [])


def tracked_unit(run: RunConfig) -> tuple[int, int] | None:
    """(hidden layer index, unit) whose activation input is tracked, or None."""
    if run.track_unit is None:
        return None
    return run.track_layer % (len(run.layers) - 2), run.track_unit


def population_key(run: RunConfig) -> tuple:
    """Runs with equal keys can train together: one step count and evaluation schedule, one
    batch shape; each seed reads its own batch stream within the population."""
    return (run.dataset, run.layers, run.batch_size, run.steps, run.eval_every,
            run.eval_split, run.track_unit, run.track_layer, run.checkpoint_every, run.dtype)


# Networks per population at most, whatever their size: the lesson's MLP takes about 1.2 MB
# each in fp32 with gradients and batch activations, so 4,096 stay near 5 GB. Larger groups,
# and groups whose networks need more memory than a population is given (engine/memory.py),
# train as several populations.
MAX_POPULATION_NETWORKS = 4096


def group_runs(runs: list[RunConfig], max_networks: int = MAX_POPULATION_NETWORKS,
               max_bytes: int | None = None, device: torch.device = torch.device("cpu"),
               ) -> list[list[RunConfig]]:
    """Partition runs into populations (in order of first appearance), each at most
    max_networks networks and, where max_bytes is given, at most that many bytes on device
    by memory.estimate_bytes (a run that alone needs more still trains, alone)."""
    groups: dict[tuple, list[list[RunConfig]]] = {}
    filled: dict[tuple, tuple[int, int]] = {}  # networks and their bytes in each last chunk
    for run in runs:
        key = population_key(run)
        chunks = groups.setdefault(key, [[]])
        networks, trained = filled.get(key, (0, 0))
        n = len(run.batch_norm)
        need = n * memory.network_bytes(run)
        over = (networks + n > max_networks or max_bytes is not None and trained + need
                + memory.evaluation_bytes(run, networks + n, device) > max_bytes)
        if chunks[-1] and over:
            chunks.append([])
            networks, trained = 0, 0
        chunks[-1].append(run)
        filled[key] = (networks + n, trained + need)
    return [chunk for chunks in groups.values() for chunk in chunks]


def resolve_device(name: str, cuda: bool | None = None) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error. cuda: whether
    the machines that will train have a CUDA GPU (a Ray cluster's); None: this process's torch."""
    where = "torch sees no CUDA GPU" if cuda is None else "the Ray cluster has no GPU"
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "auto":
        return torch.device("cuda" if cuda else "cpu")
    if name == "cuda" and not cuda:
        raise ConfigError([f"device: 'cuda' asked for, but {where} (use auto or cpu)"])
    return torch.device(name)
