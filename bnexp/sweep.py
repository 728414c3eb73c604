"""Planning and executing runs: skip finished work, resume checkpoints, write each result.

A run's folder is locked while it trains, so two sweeps sharing a results folder never train
or write the same run; a killed sweep leaves only complete files and checkpoints behind.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bnexp import plots, results
from bnexp.analyses import run_analyses
from bnexp.config import RunConfig
from bnexp.data import Split, load_split
from bnexp.engine import (
    RunResult,
    effective_engine,
    resolve_device,
    train_population,
    train_reference,
)
from bnexp.engine.common import Progress, group_runs


@dataclass
class Planned:
    run: RunConfig
    device: torch.device
    run_id: str
    status: str  # as results.run_status: "new", "complete", "failed" or "mismatch"

    @property
    def complete(self) -> bool:
        return self.status == "complete"


@dataclass
class Outcome:
    planned: Planned
    status: str  # "done", "skipped", "failed", "locked" or "mismatch"
    folder: Path | None = None
    result: RunResult | None = None
    error: str | None = None
    analyses: dict | None = None


def plan(runs: list[RunConfig], out: Path) -> list[Planned]:
    """Resolve each run's device and run_id and what is already on disk for it."""
    planned = []
    for run in runs:
        device = resolve_device(run.device)
        status = results.run_status(out, run, str(device))
        planned.append(Planned(run, device, run.run_id(str(device)), status))
    return planned


def to_train(planned: list[Planned], force: bool = False, retry_failed: bool = False,
             ) -> list[Planned]:
    """The runs a sweep trains: unfinished ones, only failed ones, or (force) all."""
    if retry_failed:
        return [p for p in planned if p.status == "failed"]
    if force:
        return [p for p in planned if p.status != "mismatch"]
    return [p for p in planned if p.status in ("new", "failed")]


def network_steps(planned: list[Planned]) -> int:
    """Total network-steps of the given runs (for progress bars)."""
    return sum(p.run.steps * len(p.run.batch_norm) for p in planned)


def _batches(todo: list[tuple[Planned, dict | None]]) -> list[list[tuple[Planned, dict | None]]]:
    """Runs trained in one call: a population resuming from one step, or one reference run."""
    batches, by_start = [], {}
    for p, checkpoint in todo:
        if effective_engine(p.run) == "reference":
            batches.append([(p, checkpoint)])
        else:
            step = checkpoint["step"] if checkpoint else 0
            by_start.setdefault((str(p.device), step), []).append((p, checkpoint))
    for items in by_start.values():
        index = {id(p.run): (p, c) for p, c in items}
        groups = group_runs([p.run for p, _ in items])
        batches.extend([index[id(run)] for run in group] for group in groups)
    return batches


def _train(batch, split: Split, out: Path, progress: Progress | None) -> list[RunResult]:
    planned = [p for p, _ in batch]
    device = planned[0].device
    keep = any(p.run.analyses for p in planned)  # analyses need the final weights
    if effective_engine(planned[0].run) == "reference":
        return [train_reference(planned[0].run, split, device, progress, keep_states=keep)]
    folders = [results.run_folder(out, p.run, str(device)) for p in planned]
    checkpoints = [c for _, c in batch]
    if progress and checkpoints[0]:  # resumed steps count as done
        progress(checkpoints[0]["step"] * sum(len(p.run.batch_norm) for p in planned))

    def save(r: int, data: dict) -> None:
        results.write_checkpoint(folders[r], data)

    return train_population([p.run for p in planned], split, device, progress, keep_states=keep,
                            resume=checkpoints if checkpoints[0] else None, on_checkpoint=save)


def load_data(todo: list[Planned], data_dir: Path) -> dict[tuple[str, str], Split]:
    """Every split the runs need, by (dataset, device); raises DataError before any write."""
    keys = {(p.run.dataset, str(p.device)) for p in todo}
    return {key: load_split(key[0], data_dir, torch.device(key[1])) for key in sorted(keys)}


def execute(planned: list[Planned], out: Path, data_dir: Path, *, force: bool = False,
            retry_failed: bool = False, fail_fast: bool = False,
            progress: Progress | None = None,
            on_outcome: Callable[[Outcome], None] | None = None,
            splits: dict[tuple[str, str], Split] | None = None) -> list[Outcome]:
    """Train the runs that need it (see to_train), write their results, report the rest.

    splits may hold data already loaded by load_data.
    """
    todo = to_train(planned, force, retry_failed)
    chosen = {id(p) for p in todo}
    outcomes = [Outcome(p, "mismatch" if p.status == "mismatch" else "skipped",
                        error="folder holds another configuration; not reused"
                        if p.status == "mismatch" else None)
                for p in planned if id(p) not in chosen]
    report = on_outcome or (lambda outcome: None)
    # Data first: a data error is the user's to fix, and must leave results/ untouched.
    splits = splits if splits is not None else load_data(todo, data_dir)
    locks, ready = [], []
    for p in todo:
        folder = results.run_folder(out, p.run, str(p.device))
        lock = results.RunLock(folder)
        if not lock.acquire():
            outcomes.append(Outcome(p, "locked", error="another sweep is training this run"))
            continue
        # Look again with the lock held: another sweep may have finished the run since plan().
        now = results.run_status(out, p.run, str(p.device))
        if now != p.status and now in ("complete", "mismatch") and not force:
            lock.release()
            outcomes.append(Outcome(p, "skipped" if now == "complete" else "mismatch",
                                    error=None if now == "complete" else
                                    "folder holds another configuration; not reused"))
            continue
        locks.append(lock)
        results.remove_stale_temp_files(folder)
        results.write_config(folder, p.run)
        checkpoint = None if force else _usable_checkpoint(folder, p)
        ready.append((p, checkpoint))
    try:
        _execute_batches(ready, out, splits, fail_fast, progress, outcomes, report)
    finally:
        for lock in locks:
            lock.release()
    for experiment in sorted({p.run.experiment for p in planned}):
        if results.run_folders(out / experiment):
            results.write_experiment_summary(out / experiment, str(planned[0].device))
    return outcomes


def _usable_checkpoint(folder: Path, p: Planned) -> dict | None:
    """A checkpoint to resume from: population engine only, and not past the run's end.

    A checkpoint at the run's last step is used too: the run is then only evaluated and
    written, not trained again.
    """
    if effective_engine(p.run) != "population":
        return None
    try:
        checkpoint = results.read_checkpoint(folder)
    except Exception:  # an unreadable checkpoint is ignored: the run starts over
        return None
    if checkpoint is None or not 0 < checkpoint.get("step", 0) <= p.run.steps:
        return None
    return checkpoint


def _execute_batches(ready, out: Path, splits: dict[tuple[str, str], Split], fail_fast: bool,
                     progress: Progress | None, outcomes: list[Outcome], report) -> None:
    for batch in _batches(ready):
        first = batch[0][0]
        key = (first.run.dataset, str(first.device))
        try:
            trained = _train(batch, splits[key], out, progress)
        except Exception as exc:  # one failing population must not stop the others
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            for p, _ in batch:
                results.write_failure(results.run_folder(out, p.run, str(p.device)), p.run,
                                      detail)
                outcomes.append(Outcome(p, "failed", error=detail))
                report(outcomes[-1])
            if fail_fast:
                return
            continue
        for (p, _), result in zip(batch, trained):
            found = run_analyses(result, splits[key])
            folder = results.write_run(out, result, found, draw=plots.plot_run)
            outcomes.append(Outcome(p, "done", folder, result, analyses=found))
            report(outcomes[-1])
