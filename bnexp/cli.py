"""The bnexp command line: run, sweep, validate, plot and bench."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bnexp import config as cfg
from bnexp import plots, sweep
from bnexp.data import DataError, resolve_data_dir

app = typer.Typer(
    help="Paired Batch Normalization experiments: YAML grids in, curves and tables out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out_console = Console()
err_console = Console(stderr=True)

DEFAULT_GRID = Path("experiments/lesson_grid.yaml")

OutOption = Annotated[Path, typer.Option("--out", help="Results folder.")]
DataDirOption = Annotated[Path | None, typer.Option(
    "--data-dir", help="Dataset folder (else $BNEXP_DATA_DIR, else ./data).")]
DeviceOption = Annotated[str | None, typer.Option(
    "--device", help="auto | cpu | cuda (overrides the file).")]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a setting, KEY=VALUE (YAML value); repeatable, e.g. --set lr=0.5.")]


def fail(lines: list[str]) -> None:
    """Report input problems on stderr, one line each, and exit with code 2."""
    for line in lines:
        err_console.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _overrides(sets: list[str] | None, **named: object) -> list[str]:
    extra = [f"{key}={value}" for key, value in named.items() if value is not None]
    return list(sets or []) + extra


def _load_runs(files: list[Path], overrides: list[str], seeds: int | None = None,
               ) -> list[cfg.RunConfig]:
    """Load, validate and expand every file, reporting all problems of all files at once."""
    runs, problems = [], []
    for path in files:
        try:
            spec = cfg.load_spec(path, overrides)
            if seeds is not None:
                spec = cfg.with_seeds(spec, seeds)
            runs.extend(cfg.expand_grid(spec))
        except cfg.ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        fail(problems)
    return runs


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=err_console, transient=False,
    )


def _execute(planned: list[sweep.Planned], out: Path, data_dir: Path | None, label: str,
             force: bool = False, fail_fast: bool = False) -> list[sweep.Outcome]:
    total = sweep.network_steps([p for p in planned if force or not p.complete])
    with _progress() as progress:
        task = progress.add_task(label, total=max(total, 1), rate="")

        def advance(n: int) -> None:
            progress.advance(task, n)
            speed = progress.tasks[task].speed
            if speed:
                progress.update(task, rate=f"{speed:,.0f} net-steps/s")

        try:
            return sweep.execute(planned, out, resolve_data_dir(data_dir), force=force,
                                 fail_fast=fail_fast, progress=advance)
        except DataError as exc:
            progress.stop()
            fail([str(exc)])
    raise AssertionError("unreachable")


def _accuracy_table(outcomes: list[sweep.Outcome]) -> Table:
    table = Table(title="Final accuracy")
    for column in ("run", "model", "val acc", "test acc", "diverged at"):
        table.add_column(column, justify="left" if column in ("run", "model") else "right",
                         overflow="fold")
    for outcome in outcomes:
        if outcome.result is None:
            continue
        for model in outcome.result.models:
            diverged = "-" if model.diverged_step is None else f"step {model.diverged_step}"
            table.add_row(outcome.planned.run_id, model.name, f"{model.final_val_acc:.4f}",
                          f"{model.final_test_acc:.4f}", diverged)
    return table


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="Experiment YAML file.")],
    device: DeviceOption = None,
    engine: Annotated[str | None, typer.Option(
        "--engine", help="population (default) | reference.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Training steps.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of weights and batches.")] = None,
    out: OutOption = Path("results"),
    data_dir: DataDirOption = None,
    set_: SetOption = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain runs already on disk.")] = False,
) -> None:
    """Train the comparisons of one experiment file and write their results."""
    runs = _load_runs([file], _overrides(set_, device=device, engine=engine, steps=steps,
                                         seed=seed))
    planned = _plan(runs, out)
    outcomes = _execute(planned, out, data_dir, f"{runs[0].experiment}", force=force)
    for outcome in outcomes:
        if outcome.status == "skipped":
            err_console.print(f"skipped {outcome.planned.run_id}: already complete "
                              "(use --force to retrain)")
    if any(o.result for o in outcomes):
        out_console.print(_accuracy_table(outcomes))
    out_console.print(f"results in {out / runs[0].experiment}")
    if _report_failures(outcomes):
        raise typer.Exit(1)


def _report_failures(outcomes: list[sweep.Outcome]) -> int:
    """One untruncated stderr line per failed run; returns how many failed."""
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        err_console.print(f"failed {o.planned.run.experiment}/{o.planned.run_id}: {o.error}",
                          markup=False, highlight=False, soft_wrap=True)
    return len(failed)


def _plan(runs: list[cfg.RunConfig], out: Path) -> list[sweep.Planned]:
    try:
        return sweep.plan(runs, out)
    except cfg.ConfigError as exc:
        fail(exc.problems)
    raise AssertionError("unreachable")


@app.command("sweep")
def sweep_command(
    files: Annotated[list[Path] | None, typer.Argument(
        help=f"Experiment YAML files (default: {DEFAULT_GRID}).")] = None,
    seeds: Annotated[int | None, typer.Option(
        "--seeds", min=1, help="Repeat every comparison with N seeds.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List the runs, train nothing.")] = False,
    fail_fast: Annotated[bool, typer.Option(
        "--fail-fast", help="Stop at the first failure.")] = False,
    device: DeviceOption = None,
    out: OutOption = Path("results"),
    data_dir: DataDirOption = None,
    set_: SetOption = None,
) -> None:
    """Run whole grids, skipping runs already complete on disk."""
    runs = _load_runs(files or [DEFAULT_GRID], _overrides(set_, device=device), seeds)
    planned = _plan(runs, out)
    if dry_run:
        table = Table(title=f"{len(planned)} runs (dry run)")
        for column in ("experiment", "run", "device", "engine", "status"):
            table.add_column(column, overflow="fold")
        for p in planned:
            status = "complete, would skip" if p.complete else "would train"
            table.add_row(p.run.experiment, p.run_id, str(p.device), p.run.engine, status)
        out_console.print(table)
        return
    outcomes = _execute(planned, out, data_dir, "sweep", fail_fast=fail_fast)
    table = Table(title="Sweep")
    for column in ("experiment", "run", "status", "detail"):
        table.add_column(column, overflow="fold")
    for o in outcomes:
        detail = o.error or (str(o.folder) if o.folder else "already complete")
        table.add_row(o.planned.run.experiment, o.planned.run_id, o.status, detail)
    out_console.print(table)
    _report_failures(outcomes)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    out_console.print(", ".join(f"{n} {s}" for s, n in counts.items()))
    if counts["failed"]:
        raise typer.Exit(1)


@app.command()
def validate(files: Annotated[list[Path], typer.Argument(help="Experiment YAML files.")]) -> None:
    """Check experiment files without training; every problem is reported at once."""
    problems = []
    for path in files:
        try:
            n = len(cfg.expand_grid(cfg.load_spec(path)))
            out_console.print(f"ok {path}: {n} run(s)", highlight=False)
        except cfg.ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        fail(problems)


@app.command()
def plot(root: Annotated[Path, typer.Argument(help="Results folder to redraw.")] = Path("results"),
         ) -> None:
    """Redraw every figure under a results folder from the files on disk."""
    if not root.is_dir():
        fail([f"{root}: no such results folder"])
    paths = plots.plot_tree(root)
    out_console.print(f"drew {len(paths)} figure(s) under {root}")


def main() -> None:
    app()
