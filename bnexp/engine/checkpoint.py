"""Population checkpoints: plain tensors and numbers, loadable with weights_only=True."""

from __future__ import annotations

import math

from bnexp.config import RunConfig
from bnexp.data import BatchStream
from bnexp.engine.common import eval_blocks, run_variant, variant_name
from bnexp.engine.members import load_model_state, model_state

CHECKPOINT_FORMAT = 1


def remaining_blocks(run: RunConfig, done: int) -> list[int]:
    """The evaluation blocks still to train after done steps (an evaluation step)."""
    blocks = eval_blocks(run.steps, run.eval_every)
    passed = 0
    while done > 0:
        done -= blocks[passed]
        passed += 1
    if done != 0:
        raise ValueError("a checkpoint must lie on an evaluation step")
    return blocks[passed:]


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
