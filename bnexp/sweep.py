"""Planning and executing runs: skip finished work, train populations, write each result."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bnexp import plots, results
from bnexp.config import RunConfig
from bnexp.data import Split, load_split
from bnexp.engine import (
    RunResult,
    group_runs,
    resolve_device,
    train_population,
    train_reference,
)
from bnexp.engine.common import Progress


@dataclass
class Planned:
    run: RunConfig
    device: torch.device
    run_id: str
    complete: bool


@dataclass
class Outcome:
    planned: Planned
    status: str  # "done", "skipped" or "failed"
    folder: Path | None = None
    result: RunResult | None = None
    error: str | None = None


def plan(runs: list[RunConfig], out: Path) -> list[Planned]:
    """Resolve each run's device and run_id and whether it is already finished on disk."""
    planned = []
    for run in runs:
        device = resolve_device(run.device)
        done = results.is_complete(out, run, str(device))
        planned.append(Planned(run, device, run.run_id(str(device)), done))
    return planned


def network_steps(planned: list[Planned]) -> int:
    """Total network-steps of the runs to train (for progress bars)."""
    return sum(p.run.steps * len(p.run.batch_norm) for p in planned)


def _batches(todo: list[Planned]) -> list[list[Planned]]:
    """Runs trained in one call: a population, or a single run for the reference engine."""
    by_context: dict[tuple, list[Planned]] = {}
    for p in todo:
        by_context.setdefault((str(p.device), p.run.engine), []).append(p)
    batches = []
    for (_, engine), group in by_context.items():
        if engine == "reference":
            batches.extend([p] for p in group)
            continue
        index = {id(p.run): p for p in group}
        batches.extend([index[id(r)] for r in runs] for runs in group_runs([p.run for p in group]))
    return batches


def _train(batch: list[Planned], split: Split, progress: Progress | None) -> list[RunResult]:
    device = batch[0].device
    if batch[0].run.engine == "reference":
        return [train_reference(batch[0].run, split, device, progress)]
    return train_population([p.run for p in batch], split, device, progress)


def execute(planned: list[Planned], out: Path, data_dir: Path, *, force: bool = False,
            fail_fast: bool = False, progress: Progress | None = None,
            on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Train every run not yet complete (all of them with force) and write its results."""
    outcomes = [Outcome(p, "skipped") for p in planned if p.complete and not force]
    todo = [p for p in planned if force or not p.complete]
    splits: dict[tuple[str, str], Split] = {}
    for batch in _batches(todo):
        key = (batch[0].run.dataset, str(batch[0].device))
        if key not in splits:  # a data error is the user's to fix: it ends the sweep
            splits[key] = load_split(key[0], data_dir, batch[0].device)
        try:
            trained = _train(batch, splits[key], progress)
        except Exception as exc:  # one failing population must not stop the others
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            failed = [Outcome(p, "failed", error=detail) for p in batch]
            outcomes.extend(failed)
            for outcome in failed:
                if on_outcome:
                    on_outcome(outcome)
            if fail_fast:
                break
            continue
        for p, result in zip(batch, trained):
            folder = results.write_run(out, result)
            plots.plot_run(folder)
            outcome = Outcome(p, "done", folder, result)
            outcomes.append(outcome)
            if on_outcome:
                on_outcome(outcome)
    for experiment in sorted({p.run.experiment for p in planned}):
        if results.run_folders(out / experiment):
            results.write_experiment_summary(out / experiment, str(planned[0].device))
    return outcomes
