"""Planning and executing runs: skip finished work, resume checkpoints, write each result.

A run's folder is locked while it trains, so two sweeps sharing a results folder never train
or write the same run; a killed sweep leaves only complete files and checkpoints behind.
"""

from __future__ import annotations

import errno
import gc
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bnexp import plots, results, tensorboard_log
from bnexp.analyses import run_analyses
from bnexp.config import ConfigError, RunConfig
from bnexp.data import DataError, Split, load_split
from bnexp.engine import (
    RunResult,
    effective_engine,
    memory,
    resolve_device,
    together_key,
    train_population,
    train_references,
)
from bnexp.engine.checkpoint import checkpoint_problem
from bnexp.engine.common import Interrupted, Progress, group_runs
from bnexp.engine.precision import tf32_problem


@dataclass
class Planned:
    run: RunConfig
    device: torch.device
    run_id: str
    status: str  # as results.run_status: "new", "complete", "failed", "mismatch", "damaged"
    why: str | None = None  # for "mismatch" and "damaged"

    @property
    def complete(self) -> bool:
        return self.status == "complete"


@dataclass
class Outcome:
    planned: Planned
    status: str  # "done", "skipped", "failed", "locked", "mismatch" or "damaged"
    folder: Path | None = None
    result: RunResult | None = None
    error: str | None = None
    analyses: dict | None = None


def plan(runs: list[RunConfig], out: Path, cuda: bool | None = None) -> list[Planned]:
    """Resolve each run's device and run_id and what is already on disk for it.

    A run listed twice (the same file given twice, say) is planned once: same config, same
    folder, same numbers. ConfigError where a run asks for what its device cannot do (tf32).
    cuda: whether the machines that train have a CUDA GPU, for a Ray cluster's (its nodes then
    check what their GPU can do); None: this process's.
    """
    planned, seen, problems = [], set(), {}
    memory_of: dict[torch.device, int | None] = {}
    for run in runs:
        device = resolve_device(run.device, cuda)
        if run.dtype == "tf32" and (problem := _tf32_problem(device, cuda)):
            problems.setdefault(f"{run.experiment}: dtype: tf32 {problem}; float32 runs "
                                "anywhere", None)
        run_id = run.run_id(str(device))
        if (run.experiment, run_id) in seen:
            continue
        seen.add((run.experiment, run_id))
        status, why = results.run_status(out, run, str(device))
        if status != "complete" and effective_engine(run) == "population":
            if device not in memory_of:
                memory_of[device] = memory.device_memory(device)
            if problem := memory.too_large(run, device, memory_of[device]):
                problems.setdefault(f"{run.experiment}: {problem}", None)
        planned.append(Planned(run, device, run_id, status, why))
    if problems:
        raise ConfigError(list(problems))
    return planned


def _tf32_problem(device: torch.device, cuda: bool | None) -> str | None:
    if cuda is not None and device.type == "cuda":
        return None  # a cluster's GPU: the node the task lands on checks it
    return tf32_problem(device)


def to_train(planned: list[Planned], force: bool = False, retry_failed: bool = False,
             ) -> list[Planned]:
    """The runs a sweep trains: unfinished ones, only failed ones, or (force) all."""
    if retry_failed:
        return [p for p in planned if p.status == "failed"]
    if force:
        return [p for p in planned if p.status != "mismatch"]  # damaged: retrained
    return [p for p in planned if p.status in ("new", "failed")]


def populations(todo: list[Planned], threads: int | None = None,
                ) -> dict[int, tuple[int, int]]:
    """For each run to train (by id): its population's number (from 1) and network count,
    grouped as a fresh sweep would train them (threads: as batches)."""
    where: dict[int, tuple[int, int]] = {}
    for number, batch in enumerate(batches([(p, None) for p in todo], threads), start=1):
        size = sum(len(p.run.batch_norm) for p, _ in batch)
        for p, _ in batch:
            where[id(p)] = (number, size)
    return where


def network_steps(planned: list[Planned]) -> int:
    """Total network-steps of the given runs (for progress bars)."""
    return sum(p.run.steps * len(p.run.batch_norm) for p in planned)


def batch_threads(executor: str) -> int | None:
    """The threads batches() fits reference runs into: a Ray task has one CPU, so there the
    reference engine's runs go as tasks of their own; locally torch's thread count (None)."""
    return 1 if executor == "ray" else None


def batches(todo: list[tuple[Planned, dict | None]], threads: int | None = None,
            ) -> list[list[tuple[Planned, dict | None]]]:
    """Runs trained in one call: a population resuming from one step, within its device's
    memory budget (engine/memory.py), or runs of the reference engine whose networks fit the
    CPU threads (threads, by default torch's count), a network per thread; a run with more
    networks than threads, or on CUDA, trains alone."""
    batches, by_start = [], {}
    threads = threads or torch.get_num_threads()
    open_groups: dict[tuple, list] = {}  # reference runs of one together_key, still filling
    for p, checkpoint in todo:
        if effective_engine(p.run) == "reference":
            key = together_key(p.run, p.device)
            group = open_groups.get(key)
            fits = (group is not None and p.device.type == "cpu"
                    and sum(len(q.run.batch_norm) for q, _ in group)
                    + len(p.run.batch_norm) <= threads)
            if fits:
                group.append((p, checkpoint))
            else:
                open_groups[key] = [(p, checkpoint)]
                batches.append(open_groups[key])
        else:
            step = checkpoint["step"] if checkpoint else 0
            by_start.setdefault((str(p.device), step), []).append((p, checkpoint))
    for (device, _), items in by_start.items():
        index = {id(p.run): (p, c) for p, c in items}
        where = torch.device(device)
        groups = group_runs([p.run for p, _ in items], max_bytes=memory.population_budget(where),
                            device=where)
        batches.extend([index[id(run)] for run in group] for group in groups)
    return batches


@dataclass(frozen=True)
class TrainOptions:
    """How to train (not what): never part of a run's config."""

    compile_step: bool = False  # CUDA: compile the population step (see train_population)
    stop: threading.Event | None = None  # set (on Ctrl-C): stop at the next evaluation
    tensorboard: bool = False  # also write TensorBoard events into each run folder's tb/
    executor: str = "local"  # or "ray": populations as Ray tasks (bnexp/ray_executor.py)
    address: str | None = None  # Ray: a cluster to join ("auto", "host:port"); else local
    status: Callable[[str], None] | None = None  # Ray: "k done, m running, n queued" as it changes
    parallel_figures: bool = False  # draw a population's run figures in worker processes


def _train(batch, split: Split, out: Path, progress: Progress | None,
           options: TrainOptions) -> list[RunResult]:
    """Train one batch; metrics.csv follows every evaluation, checkpoints go beside it."""
    planned = [p for p, _ in batch]
    device = planned[0].device
    keep = any(p.run.analyses for p in planned)  # analyses need the final weights
    folders = [results.run_folder(out, p.run, str(device)) for p in planned]

    logs = ([tensorboard_log.RunLog(folder, p.run) for folder, p in zip(folders, planned)]
            if options.tensorboard else [])

    def live(r: int, models) -> None:
        results.write_metrics(folders[r], models)
        if logs:
            logs[r].log(models)

    def save(r: int, data: dict) -> None:
        results.write_checkpoint(folders[r], data)

    checkpoints = [c for _, c in batch]
    try:
        if effective_engine(planned[0].run) == "reference":
            return train_references([p.run for p in planned], split, device, progress,
                                    keep_states=keep, on_evaluate=live, stop=options.stop)
        if progress and checkpoints[0]:  # resumed steps count as done
            progress(checkpoints[0]["step"] * sum(len(p.run.batch_norm) for p in planned))
        return train_population([p.run for p in planned], split, device, progress,
                                keep_states=keep, on_evaluate=live, on_checkpoint=save,
                                resume=checkpoints if checkpoints[0] else None,
                                compile_step=options.compile_step, stop=options.stop)
    finally:
        for log in logs:
            log.close()


def load_data(todo: list[Planned], data_dir: Path, device: str | None = None,
              ) -> dict[tuple[str, str], Split]:
    """Every split the runs need, by (dataset, device); raises DataError before any write.
    device: load there instead of on each run's device (a Ray driver checks the data for its
    workers, which may have GPUs it lacks)."""
    keys = {(p.run.dataset, device or str(p.device)) for p in todo}
    splits = {key: load_split(key[0], data_dir, torch.device(key[1])) for key in sorted(keys)}
    for p in todo:  # the files decide how many training images there are
        n = splits[(p.run.dataset, device or str(p.device))].train_x.shape[0]
        if p.run.batch_size > n:
            raise DataError(f"{p.run.experiment}: batch_size {p.run.batch_size} is more than "
                            f"the {n:,} training images of {p.run.dataset} in {data_dir}")
    return splits


def execute(planned: list[Planned], out: Path, data_dir: Path, *, force: bool = False,
            retry_failed: bool = False, fail_fast: bool = False,
            progress: Progress | None = None,
            on_outcome: Callable[[Outcome], None] | None = None,
            on_notice: Callable[[str], None] | None = None,
            splits: dict[tuple[str, str], Split] | None = None,
            options: TrainOptions | None = None) -> list[Outcome]:
    """Train the runs that need it (see to_train), write their results, report the rest.

    splits may hold data already loaded by load_data. With options.stop set, training ends at
    the next evaluation (checkpointed) and Interrupted is raised once the locks are released.
    """
    todo = to_train(planned, force, retry_failed)
    chosen = {id(p) for p in todo}
    outcomes = [_set_aside(p) for p in planned if id(p) not in chosen]
    report = on_outcome or (lambda outcome: None)
    notice = on_notice or (lambda text: None)
    # Data first: a data error is the user's to fix, and must leave results/ untouched.
    splits = splits if splits is not None else load_data(todo, data_dir)
    locks: list[results.RunLock] = []
    try:
        _lock_and_train(todo, out, data_dir, splits, force, fail_fast, progress, outcomes,
                        report, locks, notice, options or TrainOptions())
        for experiment in sorted({p.run.experiment for p in planned}):
            if (out / experiment).is_dir():
                results.write_experiment_summary(out / experiment, str(planned[0].device))
    except OSError as exc:
        disk = _disk_error(exc)
        if disk is None:
            raise
        raise disk from None
    finally:
        for lock in locks:
            lock.release()
    return outcomes


def _lock_and_train(todo: list[Planned], out: Path, data_dir: Path, splits, force: bool,
                    fail_fast: bool, progress, outcomes: list[Outcome], report, locks: list,
                    notice, options: TrainOptions) -> None:
    """Lock every run to train (the others are outcomes already), then train them."""
    ready = []
    for p in todo:
        folder = results.run_folder(out, p.run, str(p.device))
        lock = results.RunLock(folder)
        if not lock.acquire():
            outcomes.append(Outcome(p, "locked", error="another sweep is training this run"))
            continue
        # Look again with the lock held: another sweep may have finished the run since plan().
        now, why = results.run_status(out, p.run, str(p.device))
        if now != p.status and now in ("complete", "mismatch", "damaged") and not force:
            lock.release()
            outcomes.append(_set_aside(Planned(p.run, p.device, p.run_id, now, why)))
            continue
        locks.append(lock)
        results.remove_stale_temp_files(folder)
        results.write_config(folder, p.run)
        def unusable(problem: str, p: Planned = p) -> None:
            notice(f"{p.run.experiment}/{p.run_id}: checkpoint.pt {problem}; the run starts "
                   "over")

        checkpoint = None if force else usable_checkpoint(
            folder, p, training_images(splits, p.run), unusable)
        if checkpoint:
            notice(f"resuming {p.run.experiment}/{p.run_id} from step {checkpoint['step']:,} "
                   f"of {p.run.steps:,} (its last checkpoint)")
        ready.append((p, checkpoint))
    if options.executor == "ray":
        from bnexp import ray_executor

        ray_executor.execute_batches(batches(ready, batch_threads(options.executor)), out,
                                     data_dir, fail_fast, progress, outcomes, report, options,
                                     notice, options.address)
        return
    _execute_batches(ready, out, splits, fail_fast, progress, outcomes, report, options, notice)


def _set_aside(p: Planned) -> Outcome:
    """The outcome of a run that is not trained: finished, or a folder left untouched."""
    if p.status == "damaged":
        return Outcome(p, "damaged", error=f"{p.why}; left as it is: delete the folder or "
                       "pass --force to train the run again")
    if p.status == "mismatch":
        return Outcome(p, "mismatch", error=p.why)
    return Outcome(p, "skipped")


def usable_checkpoint(folder: Path, p: Planned, n_train: int | None = None,
                      on_unusable: Callable[[str], None] | None = None) -> dict | None:
    """A checkpoint to resume from: population engine only, and one checkpoint_problem finds
    nothing wrong with (n_train: the training images its batch indices must stay below).
    A checkpoint at the run's last step is used too: the run is then only evaluated and
    written, not trained again. One that cannot be used is told to on_unusable (why), and the
    run starts over.
    """
    if effective_engine(p.run) != "population":
        return None
    try:
        checkpoint = results.read_checkpoint(folder)
    except Exception as exc:  # any unreadable file (truncated, not a zip, unpickling refused)
        problem = f"cannot be read ({type(exc).__name__})"
    else:
        if checkpoint is None:
            return None
        problem = checkpoint_problem(checkpoint, p.run, n_train)
        problem = problem and f"does not fit the run ({problem})"
    if problem is None:
        return checkpoint
    if on_unusable is not None:
        on_unusable(problem)
    return None


def training_images(splits: dict[tuple[str, str], Split], run: RunConfig) -> int | None:
    """How many training images the run's dataset has, where its split is loaded."""
    sizes = [split.train_x.shape[0] for (dataset, _), split in splits.items()
             if dataset == run.dataset]
    return sizes[0] if sizes else None


class ResultsUnwritable(Exception):
    """The results folder refused a write (disk full, read-only, ...): the sweep stops; what
    was finished is kept and the rest resumes from its checkpoints on the next run."""


# Errors of the disk, not of a run: retrying another run would fail the same way.
DISK_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO,
               errno.ENOLCK)


def _disk_error(exc: BaseException) -> ResultsUnwritable | None:
    if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
        where = exc.filename or "the results folder"
        text = f"{where}: {exc.strerror}; finished runs are kept"
        if exc.errno != errno.ENOLCK:  # a folder without locks would refuse again
            text += ", and running the command again resumes the rest"
        return ResultsUnwritable(text)
    return None


def _execute_batches(ready, out: Path, splits: dict[tuple[str, str], Split], fail_fast: bool,
                     progress: Progress | None, outcomes: list[Outcome], report,
                     options: TrainOptions, notice=None) -> None:
    for batch in batches(ready):
        try:
            execute_batch(batch, out, splits, progress, outcomes, report, options, notice)
        except BatchFailed:
            if fail_fast:
                return


def failure_traceback(exc: BaseException) -> str:
    """The exception's traceback, and the worker process's own where it raised in one (the
    training process's traceback then ends where it heard of it)."""
    text = "".join(traceback.format_exception(exc))
    remote = getattr(exc, "remote_traceback", None)
    if remote:
        text += "\nIn the worker process:\n" + remote
    return text


class BatchFailed(Exception):
    """A population failed to train; its runs were recorded as failed."""


def _train_halves(batch, detail: str, counted: int, out: Path, splits, progress,
                  outcomes: list[Outcome], report, options: TrainOptions, notice) -> None:
    """Train a population that ran out of memory as two; BatchFailed where either failed."""
    gc.collect()  # the failed population's tensors, where a reference cycle still held them
    if progress:
        progress(-counted)
    networks = sum(len(p.run.batch_norm) for p, _ in batch)
    if notice:
        notice(f"a population of {networks:,} networks ran out of memory ({detail}); its "
               f"{len(batch):,} runs train again as two populations")
    failed = False
    half = len(batch) // 2
    for part in (batch[:half], batch[half:]):
        try:
            execute_batch(part, out, splits, progress, outcomes, report, options, notice)
        except BatchFailed:
            failed = True
    if failed:
        raise BatchFailed


def execute_batch(batch, out: Path, splits, progress, outcomes: list[Outcome], report,
                   options: TrainOptions, notice=None) -> None:
    """Train one population and write its runs; BatchFailed where training failed. A
    population of several runs that runs out of memory trains again as two halves (a run's
    numbers do not depend on its population), down to runs alone; notice hears of it."""
    first = batch[0][0]
    key = (first.run.dataset, str(first.device))
    done = [0]  # network-steps counted, to take back where the population trains again

    def counted(n: int) -> None:
        done[0] += n
        progress(n)

    halve = None
    try:
        trained = _train(batch, splits[key], out, progress and counted, options)
    except Interrupted:
        raise
    except Exception as exc:  # one failing population must not stop the others
        if _disk_error(exc):
            raise
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        if len(batch) > 1 and memory.out_of_memory(exc):
            halve = detail  # after this block, which holds the failed population's tensors
        else:
            trace = failure_traceback(exc)
            for p, _ in batch:
                results.write_failure(results.run_folder(out, p.run, str(p.device)), p.run,
                                      detail, trace)
                outcomes.append(Outcome(p, "failed", error=detail))
                report(outcomes[-1])
            raise BatchFailed from None
    if halve is not None:
        _train_halves(batch, halve, done[0], out, splits, progress, outcomes, report, options,
                      notice)
        return
    found = [run_analyses(result, splits[key]) for result in trained]
    folders = [results.write_run(out, result, analyses)
               for result, analyses in zip(trained, found)]
    plots.plot_runs(folders, parallel=options.parallel_figures)
    for (p, _), result, analyses, folder in zip(batch, trained, found, folders):
        results.finish_run(folder, result)
        outcomes.append(Outcome(p, "done", folder, result, analyses=analyses))
        report(outcomes[-1])
