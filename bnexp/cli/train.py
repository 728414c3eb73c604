"""`bnexp run` and `bnexp sweep`: plan, train, write, report what happened."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from bnexp import config as cfg
from bnexp.cli import timing
from bnexp.cli.common import (
    DEFAULT_GRID,
    CompileOption,
    DataDirOption,
    DeviceOption,
    OutOption,
    SetOption,
    StepsOption,
    TensorBoardOption,
    ThreadsOption,
    YesOption,
    app,
    check_executor,
    check_tensorboard,
    check_writable,
    err_console,
    fail,
    import_torch,
    labels,
    load_runs,
    out_console,
    overrides,
    progress_bar,
    set_threads,
    settings_column,
)
from bnexp.cli.dry_run import dry_run_table
from bnexp.cli.outcomes import print_outcomes

if TYPE_CHECKING:
    from bnexp import sweep

def _execute(planned: list[sweep.Planned], out: Path, data_dir: Path | None, label: str,
             force: bool = False, fail_fast: bool = False, retry_failed: bool = False,
             compile_step: bool = False, tensorboard: bool = False,
             executor: str = "local", address: str | None = None,
             ) -> tuple[list[sweep.Outcome], float]:
    """The outcomes, and perf_counter() when training was about to begin."""
    from bnexp import results, sweep
    from bnexp.data import DataError, resolve_data_dir
    from bnexp.engine.common import Interrupted

    todo = sweep.to_train(planned, force, retry_failed)
    folder = resolve_data_dir(data_dir)
    try:  # loaded here once to fail cleanly before any progress output; cached below
        # (Ray: only checked, on this CPU; the workers load it for their own devices)
        splits = sweep.load_data(todo, folder, "cpu" if executor == "ray" else None)
    except DataError as exc:
        fail([str(exc)])
    check_writable(out, {p.run.experiment for p in planned}, results.EXPERIMENT_FILES)
    with progress_bar() as progress:
        task = progress.add_task(label, total=max(sweep.network_steps(todo), 1), rate="")

        def advance(n: int) -> None:
            progress.advance(task, n)
            speed = progress.tasks[task].speed
            if speed:
                progress.update(task, rate=f"{speed:,.0f} net-steps/s")

        def notice(text: str) -> None:
            progress.console.print(text, markup=False, highlight=False, soft_wrap=True)

        def status(text: str) -> None:
            progress.update(task, description=f"{label} ({text})")

        options = sweep.TrainOptions(compile_step, threading.Event(), tensorboard, executor,
                                     address, status, parallel_figures=True)
        began = time.perf_counter()
        try:
            with _stop_on_ctrl_c(options.stop, notice) as received:
                return sweep.execute(planned, out, folder, force=force,
                                     retry_failed=retry_failed, fail_fast=fail_fast,
                                     progress=advance, splits=splits, on_notice=notice,
                                     options=options), began
        except sweep.ResultsUnwritable as exc:
            progress.stop()
            fail([str(exc)])
        except Interrupted as exc:
            progress.stop()
            kept = ("its checkpoint is written" if exc.checkpointed else
                    "the reference engine keeps no checkpoints: the runs it was training "
                    "start over")
            if exc.step is None:  # Ray: populations were cancelled wherever they were
                kept = "cancelled populations keep their last checkpoints"
            where = f"interrupted at step {exc.step:,}" if exc.step is not None else "interrupted"
            err_console.print(f"{where}: {kept}; finished runs are kept. Run the same command "
                              "again to resume.", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(128 + (received[0] if received else signal.SIGINT)) from None
    raise AssertionError("unreachable")


@contextmanager
def _stop_on_ctrl_c(stop: threading.Event, notice) -> Iterator[list[int]]:
    """First Ctrl-C or SIGTERM (kill, timeout, a batch scheduler's time limit, docker stop):
    set stop (training ends at its next evaluation, checkpointed) and note the signal in the
    list yielded; the same signal again stops at once, as usual."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    again = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    name = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def first(signum, frame) -> None:
        stop.set()
        received.append(signum)
        signal.signal(signum, again[signum])
        notice(f"{name[signum]}: stopping at the next evaluation to checkpoint it "
               f"({name[signum]} again stops at once and loses the steps since the last "
               "checkpoint)")

    previous = {signum: signal.signal(signum, first) for signum in again}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _accuracy_table(outcomes: list[sweep.Outcome]) -> Table:
    """A row per trained network; a settings column where the runs differ in settings their
    names do not show."""
    trained = [o for o in outcomes if o.result is not None]
    header, cells = settings_column([o.planned.run for o in trained])
    table = Table(title="Final accuracy")
    for column in ("run", *header, "model", "val acc", "test acc", "diverged at"):
        table.add_column(column, overflow="fold",
                         justify="left" if column in ("run", "settings", "model") else "right")
    for outcome, settings in zip(trained, cells):
        for model in outcome.result.models:
            diverged = "-" if model.diverged_step is None else f"step {model.diverged_step}"
            table.add_row(outcome.planned.run_id, *map(Text, settings), model.name,
                          f"{model.final_val_acc:.4f}", f"{model.final_test_acc:.4f}", diverged)
    return table


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="Experiment YAML file.")],
    device: DeviceOption = None,
    engine: Annotated[str | None, typer.Option(
        "--engine", metavar="NAME", help="population (default) | reference.")] = None,
    steps: StepsOption = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", metavar="S", help="Seed of weights and batches.")] = None,
    out: OutOption = Path("results"),
    data_dir: DataDirOption = None,
    set_: SetOption = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain runs already on disk.")] = False,
    yes: YesOption = False,
    threads: ThreadsOption = None,
    compile_step: CompileOption = False,
    tensorboard: TensorBoardOption = False,
) -> None:
    """Train the comparisons of one experiment file and write their results."""
    set_threads(threads)
    named = dict(device=device, engine=engine, steps=steps, seed=seed)
    runs = load_runs([file], overrides(set_, **named), allow_large=yes, labels=labels(**named))
    planned = _plan(runs, out)
    check_tensorboard(tensorboard)
    outcomes, began = _execute(planned, out, data_dir, f"{runs[0].experiment}", force=force,
                               compile_step=compile_step, tensorboard=tensorboard)
    for outcome in outcomes:
        if outcome.status == "skipped":
            err_console.print(f"skipped {outcome.planned.run_id}: already complete "
                              "(use --force to retrain)")
        elif outcome.status in NOT_TRAINED:
            err_console.print(f"{outcome.status} {outcome.planned.run_id}: {outcome.error}",
                              markup=False, highlight=False, soft_wrap=True)
    if any(o.result for o in outcomes):
        out_console.print(_accuracy_table(outcomes))
    for outcome in outcomes:
        for line in _analysis_lines(outcome.analyses or {}):
            out_console.print(line, markup=False, highlight=False, soft_wrap=True)
    out_console.print(f"results in {out / runs[0].experiment}", markup=False)
    _print_time(outcomes, began)
    if _report_failures(outcomes) or any(o.status in NOT_TRAINED for o in outcomes):
        raise typer.Exit(1)


def _print_time(outcomes: list[sweep.Outcome], began: float) -> None:
    line = timing.time_line(outcomes, began)
    if line:
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)


# Runs asked for but neither trained nor found finished: the command did not do its job.
NOT_TRAINED = ("locked", "mismatch", "damaged")


def _report_failures(outcomes: list[sweep.Outcome]) -> int:
    """One untruncated stderr line per failed run; returns how many failed."""
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        err_console.print(f"failed {o.planned.run.experiment}/{o.planned.run_id}: {o.error}",
                          markup=False, highlight=False, soft_wrap=True)
    if failed:
        err_console.print("(each failed run's folder keeps the traceback in failed.json; "
                          "`bnexp runs --where status=failed` lists them)",
                          markup=False, highlight=False, soft_wrap=True)
    return len(failed)


def _analysis_lines(analyses: dict[str, dict]) -> list[str]:
    modes = analyses.get("inference_modes")
    if not modes:
        return []
    lines = [f"BN model, {modes['examples']} test images predicted one at a time:"]
    for key, label in (("batch_statistics", "batch statistics (training mode)"),
                       ("population_statistics", "population statistics (inference mode)")):
        part = modes[key]
        lines.append(f"  {label}: accuracy {part['accuracy']:.1%}")
        lines.append("    predictions: " + " ".join(map(str, part["predictions"])))
    full = modes["full_test_set"]
    lines.append(f"  full test set as one batch: batch statistics "
                 f"{full['batch_statistics_accuracy']:.1%}, population statistics "
                 f"{full['population_statistics_accuracy']:.1%}")
    return lines


def _plan(runs: list[cfg.RunConfig], out: Path, executor: str = "local",
          address: str | None = None) -> list[sweep.Planned]:
    """The runs planned for this machine, or for a Ray cluster's (joined here: `auto` means
    cuda where the cluster has GPUs, whatever this process sees)."""
    import_torch()
    from bnexp import sweep

    cuda = None
    if executor == "ray":
        from bnexp import ray_executor

        try:
            cuda = ray_executor.connect(address).gpus > 0
        except ray_executor.Unreachable as exc:
            fail([str(exc)])
    try:
        return sweep.plan(runs, out, cuda)
    except cfg.ConfigError as exc:
        fail(exc.problems)
    raise AssertionError("unreachable")


@app.command("sweep")
def sweep_command(
    files: Annotated[list[Path] | None, typer.Argument(
        help=f"Experiment YAML files (default: {DEFAULT_GRID}).")] = None,
    seeds: Annotated[int | None, typer.Option(
        "--seeds", metavar="N", min=1, max=cfg.MAX_RUNS,
        help="Repeat every comparison with N seeds (seed .. seed+N-1, from the file's base "
        "seed; replaces a seed axis of the file).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List the runs, train nothing.")] = False,
    fail_fast: Annotated[bool, typer.Option(
        "--fail-fast", help="Stop at the first failure.")] = False,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="Train only the runs whose last attempt failed.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Retrain every run, finished or damaged ones too.")] = False,
    device: DeviceOption = None,
    steps: StepsOption = None,
    out: OutOption = Path("results"),
    data_dir: DataDirOption = None,
    set_: SetOption = None,
    yes: YesOption = False,
    threads: ThreadsOption = None,
    compile_step: CompileOption = False,
    tensorboard: TensorBoardOption = False,
    executor: Annotated[str, typer.Option(
        "--executor", metavar="NAME", help="local (default): populations one after another in "
        "this process; ray: each population a Ray task on a Ray cluster (needs the optional "
        "extra: pip install 'bnexp[ray]'; --out must be a folder every node sees).")] = "local",
    address: Annotated[str | None, typer.Option(
        "--address", metavar="ADDR", help="With --executor ray: the cluster to join (auto, or "
        "host:port of `ray start --head`); without it a local Ray instance is started.")] = None,
) -> None:
    """Run whole grids: skip finished runs, resume interrupted ones from their checkpoints."""
    set_threads(threads)
    check_executor(executor, address)
    named = dict(device=device, steps=steps)
    runs = load_runs(files or [DEFAULT_GRID], overrides(set_, **named), seeds,
                     allow_large=yes, labels=labels(**named))
    planned = _plan(runs, out, executor, address)
    if dry_run:
        dry_run_table(planned, force, retry_failed, out, executor)
        return
    check_tensorboard(tensorboard)
    outcomes, began = _execute(planned, out, data_dir, "sweep", force=force,
                               fail_fast=fail_fast, retry_failed=retry_failed,
                               compile_step=compile_step, tensorboard=tensorboard,
                               executor=executor, address=address)
    counts = {s: sum(o.status == s for o in outcomes)
              for s in ("done", "skipped", "failed", "locked", "mismatch", "damaged")}
    print_outcomes(outcomes, counts, out)
    _report_failures(outcomes)
    out_console.print(", ".join(f"{n} {s}" for s, n in counts.items() if n or s in
                                ("done", "skipped", "failed")))
    if executor == "local":  # Ray's populations overlap in other processes: no sum of parts
        _print_time(outcomes, began)
    if counts["failed"] or any(counts[s] for s in NOT_TRAINED):
        raise typer.Exit(1)
