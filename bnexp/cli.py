"""The bnexp command line: run, sweep, validate, plot and bench."""

from __future__ import annotations

import math
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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

# torch, matplotlib and the modules that use them are imported inside the commands that need
# them, so that --help, validate, runs and completion start in a fraction of a second.
if TYPE_CHECKING:
    from bnexp import sweep

app = typer.Typer(
    help="Paired Batch Normalization experiments: YAML grids in, curves and tables out.",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,  # plain help: flags without type labels such as <bool>
    pretty_exceptions_enable=False,
)
out_console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        import bnexp

        out_console.print(f"bnexp {bnexp.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool | None, typer.Option(
        "--version", callback=_version, is_eager=True, help="Show the version and exit.")] = None,
          ) -> None:
    """Paired Batch Normalization experiments: YAML grids in, curves and tables out."""

DEFAULT_GRID = Path("experiments/lesson_grid.yaml")

OutOption = Annotated[Path, typer.Option("--out", metavar="PATH", help="Results folder.")]
DataDirOption = Annotated[Path | None, typer.Option(
    "--data-dir", metavar="DIR", help="Dataset folder (else $BNEXP_DATA_DIR, else ./data).")]
DeviceOption = Annotated[str | None, typer.Option(
    "--device", metavar="NAME", help="auto | cpu | cuda (overrides the file).")]
YesOption = Annotated[bool, typer.Option(
    "--yes", help=f"Allow grids of more than {cfg.LARGE_GRID_RUNS:,} runs.")]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE",
    help="Override a setting (YAML value); repeatable, e.g. --set lr=0.5.")]
ThreadsOption = Annotated[int | None, typer.Option(
    "--threads", metavar="N", min=1, max=1024,
    help="CPU threads (default: torch's, i.e. $OMP_NUM_THREADS "
    "or all cores). Results are the same bytes for any count; only the time changes.")]
TensorBoardOption = Annotated[bool, typer.Option(
    "--tensorboard", help="Also write TensorBoard events (per-model scalars at every "
    "evaluation, the settings in the HParams view) into each run folder's tb/; view with "
    "`tensorboard --logdir results`. Needs the optional extra: pip install "
    "'bnexp[tensorboard]'.")]
CompileOption = Annotated[bool, typer.Option(
    "--compile", help="CUDA: compile each population's training step with torch.compile "
    "before capturing it as a CUDA graph: several times faster on large grids, but the "
    "compiled kernels depend on the population's size, so a run's last digits then depend on "
    "which runs shared its population (recorded as execution: compiled+cuda-graph). Off by "
    "default; populations mixing kinds of normaliser or clipping stay uncompiled.")]


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _check_compile(compile_step: bool | None, planned: list) -> None:
    """--compile is an error where no run trains on CUDA: it could not take effect."""
    if compile_step and not any(p.device.type == "cuda" for p in planned):
        fail(["--compile: only CUDA training steps are compiled; these runs train on the "
              "CPU (use --device cuda on a machine with a GPU)"])


def _check_executor(executor: str, address: str | None) -> None:
    from bnexp import ray_executor

    if executor not in ("local", "ray"):
        fail([f"--executor {executor}: expected local or ray"])
    if executor == "ray" and not ray_executor.available():
        fail([f"--executor ray: ray is not installed ({ray_executor.INSTALL_HINT})"])
    if address is not None and executor != "ray":
        fail([f"--address {address}: only with --executor ray"])


def _check_tensorboard(wanted: bool) -> None:
    from bnexp import tensorboard_log

    if wanted and not tensorboard_log.available():
        fail(["--tensorboard: the tensorboard package is not installed "
              f"({tensorboard_log.INSTALL_HINT})"])


def fail(lines: list[str]) -> None:
    """Report input problems on stderr, one line each, and exit with code 2."""
    for line in lines:
        err_console.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _overrides(sets: list[str] | None, **named: object) -> list[str]:
    extra = [f"{key}={value}" for key, value in named.items() if value is not None]
    return list(sets or []) + extra


def _labels(**named: object) -> dict[str, str]:
    """How the named options appear in error messages: "steps=5" -> "--steps 5"."""
    return {f"{key}={value}": f"--{key} {value}" for key, value in named.items()
            if value is not None}


def _load_runs(files: list[Path], overrides: list[str], seeds: int | None = None,
               allow_large: bool = False, labels: dict[str, str] | None = None,
               ) -> list[cfg.RunConfig]:
    """Load, validate and expand every file, reporting all problems of all files at once."""
    runs, problems = [], []
    for path in files:
        try:
            runs.extend(cfg.expand_grid(cfg.load_spec(path, overrides, allow_large, seeds,
                                                      labels)))
        except cfg.ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        fail(list(dict.fromkeys(problems)))  # an override's problem once, not once per file
    return runs


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=err_console, transient=False,
    )


def _check_writable(out: Path, experiments: set[str]) -> None:
    """Fail early, before any training and without creating anything, where results cannot
    be written: the results folder and each experiment's folder that exists already."""
    problems = []
    for folder in [out] + [out / name for name in sorted(experiments)]:
        if folder.exists() and not folder.is_dir():
            problems.append(f"{folder}: is a file, not a folder; move it away")
        elif folder.is_dir():
            try:  # a name of its own: sweeps starting together must not remove each other's
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".bnexp-write-test-"):
                    pass
            except OSError as exc:
                problems.append(f"{folder}: results folder is not writable "
                                f"({exc.strerror or exc})")
        elif folder == out:
            parent = next(p for p in [out, *out.parents] if p.exists())
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                problems.append(f"{out}: results folder is not writable (cannot create it "
                                f"in {parent})")
    if problems:
        fail(problems)


def _execute(planned: list[sweep.Planned], out: Path, data_dir: Path | None, label: str,
             force: bool = False, fail_fast: bool = False, retry_failed: bool = False,
             compile_step: bool = False, tensorboard: bool = False,
             executor: str = "local", address: str | None = None) -> list[sweep.Outcome]:
    from bnexp import sweep
    from bnexp.data import DataError, resolve_data_dir
    from bnexp.engine.common import Interrupted

    todo = sweep.to_train(planned, force, retry_failed)
    folder = resolve_data_dir(data_dir)
    try:  # loaded here once to fail cleanly before any progress output; cached below
        splits = sweep.load_data(todo, folder)
    except DataError as exc:
        fail([str(exc)])
    _check_writable(out, {p.run.experiment for p in planned})
    with _progress() as progress:
        task = progress.add_task(label, total=max(sweep.network_steps(todo), 1), rate="")

        def advance(n: int) -> None:
            progress.advance(task, n)
            speed = progress.tasks[task].speed
            if speed:
                progress.update(task, rate=f"{speed:,.0f} net-steps/s")

        def notice(text: str) -> None:
            progress.console.print(text, markup=False, highlight=False, soft_wrap=True)

        options = sweep.TrainOptions(compile_step, threading.Event(), tensorboard, executor,
                                     address)
        try:
            with _stop_on_ctrl_c(options.stop, notice):
                return sweep.execute(planned, out, folder, force=force,
                                     retry_failed=retry_failed, fail_fast=fail_fast,
                                     progress=advance, splits=splits, on_notice=notice,
                                     options=options)
        except sweep.ResultsUnwritable as exc:
            progress.stop()
            fail([str(exc)])
        except Interrupted as exc:
            progress.stop()
            kept = ("its checkpoint is written" if exc.checkpointed else
                    "the reference engine keeps no checkpoint: that run starts over")
            if exc.step is None:  # Ray: populations were cancelled wherever they were
                kept = "cancelled populations keep their last checkpoints"
            where = f"interrupted at step {exc.step:,}" if exc.step is not None else "interrupted"
            err_console.print(f"{where}: {kept}; finished runs are kept. Run the same command "
                              "again to resume.", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
    raise AssertionError("unreachable")


@contextmanager
def _stop_on_ctrl_c(stop: threading.Event, notice) -> Iterator[None]:
    """First Ctrl-C: set stop (training ends at its next evaluation, checkpointed); a second
    Ctrl-C stops at once, as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum, frame) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        notice("Ctrl-C: stopping at the next evaluation to checkpoint it (Ctrl-C again "
               "stops at once and loses the steps since the last checkpoint)")

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
        "--engine", metavar="NAME", help="population (default) | reference.")] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", metavar="N", help="Training steps.")] = None,
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
    _set_threads(threads)
    named = dict(device=device, engine=engine, steps=steps, seed=seed)
    runs = _load_runs([file], _overrides(set_, **named), allow_large=yes, labels=_labels(**named))
    planned = _plan(runs, out)
    _check_compile(compile_step, planned)
    _check_tensorboard(tensorboard)
    outcomes = _execute(planned, out, data_dir, f"{runs[0].experiment}", force=force,
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
    out_console.print(f"results in {out / runs[0].experiment}")
    if _report_failures(outcomes) or any(o.status in NOT_TRAINED for o in outcomes):
        raise typer.Exit(1)


# Runs asked for but neither trained nor found finished: the command did not do its job.
NOT_TRAINED = ("locked", "mismatch", "damaged")


def _report_failures(outcomes: list[sweep.Outcome]) -> int:
    """One untruncated stderr line per failed run; returns how many failed."""
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        err_console.print(f"failed {o.planned.run.experiment}/{o.planned.run_id}: {o.error}",
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


def _plan(runs: list[cfg.RunConfig], out: Path) -> list[sweep.Planned]:
    from bnexp import sweep

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
        "--seeds", metavar="N", min=1, max=cfg.MAX_RUNS,
        help="Repeat every comparison with N seeds (seed .. seed+N-1).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List the runs, train nothing.")] = False,
    fail_fast: Annotated[bool, typer.Option(
        "--fail-fast", help="Stop at the first failure.")] = False,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="Train only the runs whose last attempt failed.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Retrain every run, finished or damaged ones too.")] = False,
    device: DeviceOption = None,
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
    _set_threads(threads)
    _check_executor(executor, address)
    runs = _load_runs(files or [DEFAULT_GRID], _overrides(set_, device=device), seeds,
                      allow_large=yes, labels=_labels(device=device))
    planned = _plan(runs, out)
    if dry_run:
        _dry_run(planned, force, retry_failed, out)
        return
    _check_compile(compile_step, planned)
    _check_tensorboard(tensorboard)
    outcomes = _execute(planned, out, data_dir, "sweep", force=force, fail_fast=fail_fast,
                        retry_failed=retry_failed, compile_step=compile_step,
                        tensorboard=tensorboard, executor=executor, address=address)
    table = Table(title="Sweep")
    for column in ("experiment", "run", "status", "detail"):
        table.add_column(column, overflow="fold")
    for o in outcomes:
        detail = o.error or (str(o.folder) if o.folder else "already complete")
        table.add_row(o.planned.run.experiment, o.planned.run_id, o.status, detail)
    out_console.print(table)
    _report_failures(outcomes)
    counts = {s: sum(o.status == s for o in outcomes)
              for s in ("done", "skipped", "failed", "locked", "mismatch", "damaged")}
    out_console.print(", ".join(f"{n} {s}" for s, n in counts.items() if n or s in
                                ("done", "skipped", "failed")))
    if counts["failed"] or any(counts[s] for s in NOT_TRAINED):
        raise typer.Exit(1)


def _dry_run(planned: list[sweep.Planned], force: bool, retry_failed: bool, out: Path,
             ) -> None:
    """The runs, what would happen to each, and the populations they would train in."""
    from bnexp import sweep
    from bnexp.engine import effective_engine

    todo = sweep.to_train(planned, force, retry_failed)
    where = sweep.populations(todo)
    table = Table(title=f"{len(planned)} runs (dry run)")
    for column in ("experiment", "run", "device", "engine", "population", "net-steps",
                   "status"):
        table.add_column(column, overflow="fold", no_wrap=column in ("net-steps", "status"),
                         justify="right" if column == "net-steps" else "left")
    for p in planned:
        trains = id(p) in where
        status = "would train" if trains else f"{p.status}, would skip"
        group = "-"
        if trains:
            number, size = where[id(p)]
            group = f"{number} ({size} networks)"
        table.add_row(p.run.experiment, p.run_id, str(p.device), effective_engine(p.run),
                      group, f"{p.run.steps * len(p.run.batch_norm):,}", status)
    out_console.print(table)
    out_console.print(_estimate(todo, where, out), highlight=False)
    n_groups = len({number for number, _ in where.values()})
    out_console.print(f"{len(todo)} run(s) to train in {n_groups} population(s), "
                      f"{sweep.network_steps(todo):,} network-steps. Runs share a population "
                      "when they differ only in seed (each seed reads its own batch stream), "
                      "learning rate, activation, initial weights, normaliser (batch, layer or "
                      "group norm, before or after the activation) or clipping; another "
                      "dataset, batch size, step count, evaluation schedule or dtype needs its "
                      "own, and runs with dropout or the hand-written BN layer, and ConvNets, "
                      "train alone on the reference engine.",
                      highlight=False)


def _estimate(todo: list[sweep.Planned], where: dict, out: Path) -> str:
    """How long training would take, from the newest bench record of the device."""
    from bnexp import estimate
    from bnexp.engine import effective_engine

    if not todo:
        return "nothing to train"
    device = str(todo[0].device)
    found = estimate.bench_rates(out / "bench", device)
    if found is None:
        return (f"no time estimate: no `bnexp bench` record for {device} in {out / 'bench'} "
                f"(run `bnexp bench --device {device.split(':')[0]}` once to calibrate)")
    path, population, reference = found
    work: dict[int, tuple[int, int, bool]] = {}
    for p in todo:
        number, size = where[id(p)]
        stacked = effective_engine(p.run) == "population"
        work[number] = (size if stacked else len(p.run.batch_norm), p.run.steps, stacked)
    total = estimate.seconds(list(work.values()), population, reference)
    return (f"estimated training time: {estimate.describe(total)} on {device} (rates from "
            f"{path}; evaluation, start-up and compiling not included)")


@app.command()
def validate(files: Annotated[list[Path], typer.Argument(help="Experiment YAML files.")],
             yes: YesOption = False) -> None:
    """Check experiment files without training; every problem is reported at once."""
    problems = []
    for path in files:
        try:
            n = len(cfg.expand_grid(cfg.load_spec(path, allow_large=yes)))
            out_console.print(f"ok {path}: {n} run(s)", highlight=False)
        except cfg.ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        fail(problems)


@app.command()
def runs(
    root: Annotated[Path, typer.Argument(
        help="Results folder, or one experiment's folder in it.")] = Path("results"),
    where: Annotated[list[str] | None, typer.Option(
        "--where", metavar="KEY=VALUE",
        help="Only runs with KEY=VALUE (a setting, or status); repeatable, e.g. "
        "--where activation=relu --where status=done.")] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV on stdout instead of a table.")
                      ] = False,
) -> None:
    """List the runs on disk: status (done, partial at step N, failed, damaged, mismatch),
    the settings that vary between them, and their final accuracies."""
    from bnexp import inventory

    if not root.is_dir():
        fail([f"{root}: no such results folder"])
    conditions, problems = [], []
    for text in where or []:
        try:
            key, value = cfg.parse_override(text)
        except cfg.ConfigError:
            problems.append(f"--where {text}: expected KEY=VALUE, e.g. --where lr=0.1")
            continue
        if ".".join(key) not in cfg.RunConfig.model_fields and key != ["status"]:
            problems.append(f"--where {text}: {'.'.join(key)} is not a run setting")
        conditions.append((".".join(key), value))
    if problems:
        fail(problems)
    rows = [r for r in inventory.find_runs(root) if inventory.matches(r, conditions)]
    if as_csv:
        sys.stdout.write(inventory.as_csv(rows))
        return
    out_console.print(_runs_table(rows, inventory.varied_settings(rows),
                                  inventory.model_names(rows), root))


def _runs_table(rows: list, varied: list[str], models: list[str], root: Path) -> Table:
    table = Table(title=f"runs under {root}: {len(rows)}")
    for column in ("experiment", "run", "status", *varied, *[f"{m} val/test" for m in models]):
        table.add_column(column, overflow="fold")
    for row in rows:
        accs = []
        for m in models:
            val, test = row.accuracies.get(m, (math.nan, math.nan))
            accs.append("-" if math.isnan(val) else
                        f"{val:.4f}" + ("" if math.isnan(test) else f" / {test:.4f}"))
        table.add_row(row.experiment, row.run_id, row.status_text,
                      *[str(row.config.get(k, "")) for k in varied], *accs)
    return table


@app.command()
def plot(root: Annotated[Path, typer.Argument(help="Results folder to redraw.")] = Path("results"),
         ) -> None:
    """Redraw every figure under a results folder from the files on disk."""
    from bnexp import plots, report
    if not root.is_dir():
        fail([f"{root}: no such results folder"])
    try:
        paths, damaged = plots.plot_tree(root)
        experiments = {p.parent.parent for p in root.rglob("summary.json")
                       if (p.parent / "config.yaml").is_file()}
        for experiment in sorted(experiments):
            paths += report.draw_figures(experiment)
    except OSError as exc:
        fail([f"{exc.filename or root}: cannot write a figure ({exc.strerror or exc})"])
    _warn_damaged(damaged)
    out_console.print(f"drew {len(paths)} figure(s) under {root}")


def _warn_damaged(damaged: list[tuple[Path, str]]) -> None:
    for folder, why in damaged:
        err_console.print(f"damaged {folder}: {why}; left out (delete the folder, or rerun the "
                          "sweep with --force, to train it again)", markup=False,
                          highlight=False, soft_wrap=True)


@app.command("report")
def report_command(
    experiment: Annotated[Path, typer.Argument(
        help="An experiment folder, e.g. results/lesson_grid.")],
) -> None:
    """Write report.md and a self-contained report.html: statistics over seeds and figures."""
    from bnexp import readback, report

    if not experiment.is_dir():
        fail([f"{experiment}: no such experiment folder"])
    try:
        md, page = report.write_report(experiment)
    except FileNotFoundError as exc:
        fail([str(exc)])
    except OSError as exc:
        fail([f"{exc.filename or experiment}: cannot write the report ({exc.strerror or exc})"])
    _warn_damaged(readback.damaged_runs(experiment))
    cells = report.collect_cells(experiment)
    table = Table(title=f"{experiment.name}: comparison over seeds")
    for column in report.TABLE_HEADER:
        table.add_column(column, overflow="fold")
    for row in report.table_rows(cells):
        table.add_row(*row)
    out_console.print(table)
    out_console.print(f"written {md} and {page}")


@app.command("bn-check")
def bn_check(
    batch: Annotated[int, typer.Option("--batch", min=2, help="Batch size.")] = 60,
    features: Annotated[int, typer.Option("--features", min=1, help="Units.")] = 100,
    steps: Annotated[int, typer.Option("--steps", metavar="N", min=1, help="Training steps.")] = 5,
    decay: Annotated[float, typer.Option("--decay", min=0.0, max=1.0,
                                         help="Running-average decay.")] = 0.99,
) -> None:
    """Show that the hand-written batch norm matches torch.nn.BatchNorm1d."""
    from bnexp.analyses import compare_batch_norms

    worst = compare_batch_norms(batch, features, steps, decay)
    table = Table(title=f"ManualBatchNorm vs nn.BatchNorm1d ({steps} training steps)")
    table.add_column("quantity")
    table.add_column("largest |difference|", justify="right")
    for key, value in worst.items():
        table.add_row(key.replace("_", " "), f"{value:.2e}")
    out_console.print(table)
    if max(worst.values()) > 1e-4:
        err_console.print(f"bn-check: differences up to {max(worst.values()):.2e} exceed 1e-4")
        raise typer.Exit(1)


def _model_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        fail([f"--models {text}: expected positive integers separated by commas, e.g. 2,32,256"])
    return counts


@app.command()
def bench(
    device: Annotated[str, typer.Option(
        "--device", metavar="NAME", help="auto | cpu | cuda.")] = "auto",
    models: Annotated[str | None, typer.Option(
        "--models", metavar="M,M,...",
        help="Population sizes, comma-separated (default 2,32,256 on CPU, "
        "2,32,256,1024 on CUDA).")] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", metavar="N", min=1,
        help="Population steps per size (default 300 CPU, 3000 CUDA).")] = None,
    reference_steps: Annotated[int, typer.Option(
        "--reference-steps", metavar="N", min=1,
        help="Steps per network of the reference loop.")] = 300,
    grid: Annotated[Path | None, typer.Option(
        "--grid", metavar="FILE",
        help="Also time this whole grid file through the population engine "
        "(real data where found, else random data).")] = None,
    grid_seeds: Annotated[int | None, typer.Option(
        "--grid-seeds", metavar="N", min=1, max=1000,
        help="Repeat the --grid file's comparisons with N "
        "seeds (they train in one population).")] = None,
    cuda_graph: Annotated[bool, typer.Option(
        "--cuda-graph/--no-cuda-graph", help="Capture the CUDA step as a graph.")] = True,
    compile_step: CompileOption = False,
    out: Annotated[Path | None, typer.Option(
        "--out", metavar="PATH",
        help="JSON file (default results/bench/bench-<time>.json).")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Measure network-steps/s of the population engine against the one-at-a-time loop,
    compile time, and the operators one training step of the lesson population dispatches."""
    import json

    from bnexp import bench as bench_mod
    from bnexp.data import DataError, load_split, resolve_data_dir
    from bnexp.engine import resolve_device
    from bnexp.results import atomic_write

    if device not in cfg.DEVICES:
        fail([f"--device {device}: expected one of {', '.join(cfg.DEVICES)}"])
    try:
        dev = resolve_device(device)
    except cfg.ConfigError as exc:
        fail(exc.problems)
    cuda = dev.type == "cuda"
    if compile_step and not cuda:
        fail(["--compile: only CUDA training steps are compiled (this bench runs on the CPU)"])
    counts = _model_counts(models or ("2,32,256,1024" if cuda else "2,32,256"))
    n_steps = steps or (3000 if cuda else 300)
    grid_runs = _load_runs([grid], [f"device={dev.type}"], grid_seeds) if grid else []
    split = bench_mod.random_split(dev)
    rows = []
    with err_console.status("reference loop (one network at a time)..."):
        reference = bench_mod.bench_reference(split, dev, reference_steps)
    rows.append(reference)
    for m in counts:
        with err_console.status(f"population engine, {m} networks..."):
            rows.append(bench_mod.bench_population(
                split, dev, m, n_steps, reference, cuda_graph, compile_step))
    with err_console.status("operators per training step..."):
        ops = bench_mod.ops_per_step(split, dev)
    grid_record = None
    if grid_runs:
        try:
            grid_split, source = load_split(grid_runs[0].dataset, resolve_data_dir(data_dir),
                                            dev), "real data"
        except DataError:
            grid_split, source = split, "random data"
        with err_console.status(f"grid {grid} ({len(grid_runs)} runs, {source})..."):
            grid_record = bench_mod.bench_grid(grid_runs, grid_split, dev, compile_step)
        grid_record.update(file=str(grid), data=source)
    out_console.print(_bench_table(rows))
    kernels = (f"; CUDA kernels: {ops['cuda_kernels_eager']} eager, "
               f"{ops['cuda_kernels_compiled']} compiled ({ops['compile_s']:.1f} s to compile)"
               if "cuda_kernels_compiled" in ops else "")
    out_console.print(f"one training step of the lesson population ({ops['networks']} "
                      f"networks): {ops['aten_ops']} aten operators dispatched "
                      f"({ops['aten_ops_without_views']} without views){kernels}",
                      highlight=False)
    if grid_record:
        out_console.print(
            f"grid {grid}: {grid_record['networks']} networks x {grid_record['steps']:,} steps "
            f"({grid_record['data']}): {grid_record['train_time_s']:.1f} s training, "
            f"{grid_record['wall_time_s']:.1f} s wall with evaluation every "
            f"{grid_record['eval_every']} steps; {grid_record['populations']} population(s), "
            f"{grid_record['seeds']} seed(s), {grid_record['compile_time_s']:.1f} s compiling, "
            f"{', '.join(grid_record['execution'])}", highlight=False)
    path = out or bench_mod.default_out(Path("results"))
    atomic_write(path, json.dumps(bench_mod.as_record(rows, dev, grid_record, ops), indent=2))
    out_console.print(f"written {path}")


def _bench_table(rows: list) -> Table:
    table = Table(title="bnexp bench")
    for column in ("engine", "device", "M", "steps/s", "network-steps/s", "ratio",
                   "peak memory", "compile", "note"):
        table.add_column(column, justify="left" if column in ("engine", "device", "note")
                         else "right", overflow="fold")
    for r in rows:
        memory = f"{r.peak_memory_mib:,.0f} MiB" + (" RSS" if r.device == "cpu" else "")
        table.add_row(r.engine, r.device, str(r.models), f"{r.steps_per_s:,.0f}",
                      f"{r.network_steps_per_s:,.0f}", f"{r.ratio:.1f}x" if r.ratio else "-",
                      memory, f"{r.compile_s:.1f} s" if r.compile_s else "-", r.note)
    return table


def main() -> None:
    app()
