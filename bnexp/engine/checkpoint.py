"""Population checkpoints: plain tensors and numbers, loadable with weights_only=True."""

from __future__ import annotations

import itertools
import math

import torch

from bnexp.config import RunConfig
from bnexp.data import BatchStream
from bnexp.engine.common import DTYPES, eval_blocks, run_variant, variant_name
from bnexp.engine.members import load_model_state, model_state
from bnexp.engine.shards import named_shapes

CHECKPOINT_FORMAT = 1


def evaluation_steps(run: RunConfig) -> list[int]:
    """The steps a run is evaluated (and may be checkpointed) at, 0 first."""
    return [0, *itertools.accumulate(eval_blocks(run.steps, run.eval_every))]


def remaining_blocks(run: RunConfig, done: int) -> list[int]:
    """The evaluation blocks still to train after done steps (an evaluation step)."""
    steps = evaluation_steps(run)
    if done not in steps:
        raise ValueError("a checkpoint must lie on an evaluation step")
    return eval_blocks(run.steps, run.eval_every)[steps.index(done):]


def make_checkpoints(runs, stacks, where, results, streams: dict[int, BatchStream],
                     done: int, train_time: float, eval_time: float) -> list[dict]:
    """One checkpoint per run: its models' states and metrics, its seed's stream, the step
    and the time spent so far."""
    diverged = {id(s): s.diverged_at.tolist() for s in stacks}
    states = {seed: stream.state() for seed, stream in streams.items()}
    out = [{"format": CHECKPOINT_FORMAT, "step": done, "train_time_s": train_time,
            "eval_time_s": eval_time, "stream": states[run.seed], "models": {}} for run in runs]
    for (r, bn), (stack, i) in where.items():
        model = results[r][run_variant(runs[r], bn)]
        out[r]["models"][model.name] = {
            "state": model_state(stack, i), "diverged_at": diverged[id(stack)][i],
            "steps": list(model.steps), "val_acc": list(model.val_acc),
            "train_loss": list(model.train_loss), "train_acc": list(model.train_acc),
            "unit_percentiles": [list(p) for p in model.unit_percentiles],
        }
    return out


def restore(resume: list[dict], runs, stacks, where, results,
            streams: dict[int, BatchStream]) -> tuple[int, float, float]:
    """Load checkpoints (one per run, one step) into stacks, results and streams; the step,
    and the training and evaluation time spent until it."""
    steps = {c["step"] for c in resume}
    if len(steps) != 1 or any(c.get("format") != CHECKPOINT_FORMAT for c in resume):
        raise ValueError("runs of one population must resume from one step and format")
    for seed, stream in streams.items():  # runs of one seed share one stream and its state
        stream.load_state(next(c for c, run in zip(resume, runs) if run.seed == seed)["stream"])
    for (r, bn), (stack, i) in where.items():
        saved = resume[r]["models"][variant_name(bn, runs[r].norm)]
        load_model_state(stack, i, saved["state"])
        stack.diverged_at[i] = saved["diverged_at"]
        model = results[r][run_variant(runs[r], bn)]
        model.steps, model.val_acc = list(saved["steps"]), list(saved["val_acc"])
        model.train_loss = list(saved["train_loss"])
        # checkpoints from before train_acc was recorded: those rows have none
        model.train_acc = list(saved.get("train_acc", [math.nan] * len(model.steps)))
        model.unit_percentiles = [list(p) for p in saved["unit_percentiles"]]
    # checkpoints from before evaluation time was kept: it counts from the resume
    return steps.pop(), resume[0]["train_time_s"], resume[0].get("eval_time_s", 0.0)


def checkpoint_problem(checkpoint: object, run: RunConfig,
                       n_train: int | None = None) -> str | None:
    """Why a checkpoint, as torch.load read it, cannot resume run (None where it can): its
    format, a step on the run's evaluation schedule, its batch stream's state (indices below
    n_train, where given), and for each of the run's models a state with the engine's names,
    shapes and dtype, a divergence step and curves up to the step. (restore would otherwise
    fail inside training, or resume from values no run can have.)"""
    if not isinstance(checkpoint, dict) or not (_is_int(checkpoint.get("format"))
                                                and checkpoint["format"] == CHECKPOINT_FORMAT):
        return "is not a checkpoint of this bnexp (format)"
    step = checkpoint.get("step")
    schedule = evaluation_steps(run)
    if not _is_int(step) or step not in schedule[1:]:
        return f"step {step!r} is not one of the run's evaluation steps"
    for key, missing in (("train_time_s", None), ("eval_time_s", 0.0)):  # see restore
        value = checkpoint.get(key, missing)
        if not (_is_number(value) and 0 <= value < math.inf):
            return f"{key} is not a time"
    problem = _stream_problem(checkpoint.get("stream"), run, n_train)
    if problem:
        return f"stream: {problem}"
    models = checkpoint.get("models")
    names = {variant_name(bn, run.norm): bn for bn in run.batch_norm}
    if not isinstance(models, dict) or set(models) != set(names):
        return f"models are not {', '.join(names)}"
    expected = named_shapes(run)
    curve = schedule[:schedule.index(step) + 1]
    for name, bn in names.items():
        problem = _model_problem(models[name], expected[bn], DTYPES[run.dtype], step, curve)
        if problem:
            return f"models.{name}: {problem}"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """An int or float (NaN included), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(values: object, n: int) -> bool:
    """A list of n numbers."""
    return isinstance(values, list) and len(values) == n and all(map(_is_number, values))


def _stream_problem(stream: object, run: RunConfig, n_train: int | None) -> str | None:
    if not isinstance(stream, dict):
        return "missing"
    generator, pending = stream.get("generator"), stream.get("pending")
    if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8:
        return "no generator state"
    try:
        torch.Generator().set_state(generator)
    except (RuntimeError, TypeError, ValueError):
        return "the generator state does not load"
    if (not isinstance(pending, torch.Tensor) or pending.dtype != torch.long
            or pending.dim() != 2 or pending.shape[1] != run.batch_size):
        return f"pending batches are not rows of {run.batch_size} indices"
    if pending.numel() and (pending.min() < 0 or (n_train is not None
                                                   and pending.max() >= n_train)):
        return "pending batches point outside the training images"
    return None


def _model_problem(model: object, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                   step: int, curve: list[int]) -> str | None:
    if not isinstance(model, dict):
        return "not a model's entry"
    state = model.get("state")
    if not isinstance(state, dict) or set(state) != set(shapes):
        return "its state does not name this network's tensors"
    for key, shape in shapes.items():
        t = state[key]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
            return f"state {key} is not a {dtype} tensor of shape {shape}"
    diverged = model.get("diverged_at")
    if not _is_int(diverged) or not -1 <= diverged <= step:
        return "diverged_at is not a step"
    steps = model.get("steps")
    if not (isinstance(steps, list) and all(_is_int(v) for v in steps) and steps == curve):
        return "its curve's steps are not the run's evaluation steps"
    for key in ("val_acc", "train_loss", "train_acc"):
        if key == "train_acc" and key not in model:  # from before train_acc was recorded
            continue
        if not _numbers(model.get(key), len(curve)):
            return f"{key} is not a curve of {len(curve)} numbers"
    rows = model.get("unit_percentiles")
    if not (isinstance(rows, list) and len(rows) in (0, len(curve))):
        return "unit_percentiles is not a curve"
    if not all(isinstance(row, list) and all(map(_is_number, row)) for row in rows):
        return f"unit_percentiles is not a curve of {len(curve)} numbers"
    return None
