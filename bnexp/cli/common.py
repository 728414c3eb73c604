"""What every command shares: the Typer app, consoles, options, input checks, run loading."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer
from rich.cells import cell_len
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
from rich.text import Text

from bnexp import config as cfg
from bnexp import experiment_file

# torch, matplotlib and the modules that use them are imported inside the commands that need
# them, so that --help, validate, runs and completion start in a fraction of a second.

app = typer.Typer(
    help="Paired Batch Normalization experiments: YAML grids in, curves and tables out.",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,  # plain help: flags without type labels such as <bool>
    pretty_exceptions_enable=False,
)
# Where no standard stream is a terminal (CI logs, cron, a subprocess) Rich would lay tables
# out for 80 columns and fold every run id over three lines; such output is read in files and
# log viewers, so it gets room for a table's natural width. $COLUMNS still decides if set.
LOG_WIDTH = 200
LISTED_RUNS = 1_000  # tables of more runs show what needs attention (Rich: ~1,000 rows/s)


def _console(stderr: bool) -> Console:
    width = None
    if "COLUMNS" not in os.environ and not any(os.isatty(fd) for fd in (0, 1, 2)):
        width = LOG_WIDTH  # (os.isatty is False for a closed descriptor too)
    return Console(stderr=stderr, width=width)


out_console = _console(stderr=False)
err_console = _console(stderr=True)


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
StepsOption = Annotated[int | None, typer.Option(
    "--steps", metavar="N", help="Training steps of every run (overrides the file and a grid's "
    "steps axis; a shorter run also evaluates more often, see README).")]
YesOption = Annotated[bool, typer.Option(
    "--yes", help=f"Allow grids of more than {cfg.LARGE_GRID_RUNS:,} runs.")]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE",
    help="Override a setting (YAML value); repeatable, e.g. --set lr=0.5.")]
ThreadsOption = Annotated[int | None, typer.Option(
    "--threads", metavar="N", min=1, max=1024,
    help="CPU threads (default: torch's, i.e. $OMP_NUM_THREADS "
    "or all cores). A population of M networks trains in up to N worker processes on the "
    "CPU (a pair: one network each), or, for runs of fewer than 500 steps and compiled steps, "
    "on threads of one process (uncompiled: about sqrt(M) of them); evaluating uses them "
    "all. The reference engine trains networks a thread each, several comparisons at once "
    "where their networks fit. Results are the same bytes for any count; only the time "
    "changes.")]
TensorBoardOption = Annotated[bool, typer.Option(
    "--tensorboard", help="Also write TensorBoard events (per-model scalars at every "
    "evaluation, the settings in the HParams view) into each run folder's tb/; view with "
    "`tensorboard --logdir results`. Needs the optional extra: pip install "
    "'bnexp[tensorboard]'.")]
CompileOption = Annotated[bool, typer.Option(
    "--compile", help="Compile each population's training step with torch.compile "
    "(Inductor; on CUDA then captured as a CUDA graph). Pays on CUDA for large grids and on "
    "the CPU for populations up to the lesson's 24 networks (2 threads: 2 to 8 networks "
    "about 1.8x faster steps, 24 networks 1.3x), after 4-75 s of compiling per population "
    "(less once Inductor's cache holds it). The compiled kernels depend on the population, "
    "so a run's last digits then depend on which runs shared it (recorded as execution: "
    "compiled, or compiled+cuda-graph). Off by default; populations mixing kinds of "
    "normaliser or clipping stay uncompiled.")]


def import_torch() -> ModuleType:
    """torch, imported (the training commands' first step) with Ctrl-C held until it is done,
    then raised: inside torch's import a Ctrl-C can be taken by its C extension for "numpy
    is missing" and lost, or abort the process from C++ (exit 134); held, it is a
    KeyboardInterrupt at most the import's second later (exit 130)."""
    if (threading.current_thread() is not threading.main_thread()  # no signals there
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):  # nothing to hold
        import torch
        return torch
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        import torch
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt
    return torch


@contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """Inside, SIGTERM (`kill`, `timeout`) stops the command as Ctrl-C does, by an exception
    (exit 143), so that the figure workers it started are stopped with it and its
    semaphores released, rather than the process ending where it stands."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):  # handled already
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import_torch().set_num_threads(threads)


def check_executor(executor: str, address: str | None) -> None:
    from bnexp import ray_executor

    if executor not in ("local", "ray"):
        fail([f"--executor {executor}: expected local or ray"])
    if executor == "ray" and not ray_executor.available():
        fail([f"--executor ray: ray is not installed ({ray_executor.INSTALL_HINT})"])
    if address is not None and executor != "ray":
        fail([f"--address {address}: only with --executor ray"])


def check_tensorboard(wanted: bool) -> None:
    from bnexp import tensorboard_log

    if wanted and not tensorboard_log.available():
        fail(["--tensorboard: the tensorboard package is not installed "
              f"({tensorboard_log.INSTALL_HINT})"])


def fail(lines: list[str]) -> None:
    """Report input problems on stderr, one line each, and exit with code 2."""
    for line in lines:
        err_console.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def overrides(sets: list[str] | None, **named: object) -> list[str]:
    extra = [f"{key}={value}" for key, value in named.items() if value is not None]
    return list(sets or []) + extra


def labels(**named: object) -> dict[str, str]:
    """How the named options appear in error messages: "steps=5" -> "--steps 5"."""
    return {f"{key}={value}": f"--{key} {value}" for key, value in named.items()
            if value is not None}


def settings_apart(runs: list[cfg.RunConfig]) -> list[str]:
    """For each run, the settings in which the runs of its experiment differ beyond what run
    names show, as "bn_impl=manual dropout=0.5"; "" where they do not (inventory.apart)."""
    from bnexp import inventory

    return inventory.apart([(run.experiment, run.model_dump(mode="json")) for run in runs])


def settings_column(runs: list[cfg.RunConfig]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """A table's settings column for these runs (settings_apart): (its header, a cell per
    run), both empty where no run differs beyond its name, so that callers splice them in."""
    apart = settings_apart(runs)
    if not any(apart):
        return (), [()] * len(runs)
    return ("settings",), [(text,) for text in apart]


def load_runs(files: list[Path], overrides: list[str], seeds: int | None = None,
               allow_large: bool = False, labels: dict[str, str] | None = None,
               ) -> list[cfg.RunConfig]:
    """Load, validate and expand every file, reporting all problems of all files at once."""
    runs, problems = [], []
    for path in files:
        try:
            runs.extend(cfg.expand_grid(experiment_file.load_spec(path, overrides, allow_large,
                                                                  seeds, labels)))
        except cfg.ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        fail(list(dict.fromkeys(problems)))  # an override's problem once, not once per file
    return runs


def add_columns(table: Table, headers: list[str], rows: list[list[str]], width: int) -> None:
    """headers as table's columns (folding what does not fit), at column_widths where those
    keep every word of the rows whole, and rows as its rows: plain text, never Rich markup
    (a cell's '[n/a (1 seed)]' would be taken for a style and vanish)."""
    widths = column_widths(headers, rows, width) or [None] * len(headers)
    for header, column_width in zip(headers, widths):
        table.add_column(Text(header), overflow="fold", width=column_width)
    for row in rows:
        table.add_row(*map(Text, row))


# The narrowest a column whose words are folded gets from column_widths.
FOLDED_MIN = 16


def column_widths(headers: list[str], rows: list[list[str]], width: int) -> list[int] | None:
    """Widths for a Rich table's columns (default box and padding) in width characters that
    break no word of a cell, where the table's natural width is more than width: each column
    gets its cells' longest word, then room toward its header's longest word, its cells'
    longest line and its header's, in turn, in proportion to what each column still lacks.
    Where the words do not all fit, the column of the longest word (a run id) gets what the
    others leave, at least FOLDED_MIN, and only its words fold. None where the table fits
    as it is, or not even so. (Rich's own narrowing splits the widest column's words first:
    a cell's 'batch_size=256' as 'batch_size=2' over '56'.)"""
    columns = [(header, *cells) for header, *cells in zip(headers, *rows, strict=True)]

    def longest(texts, split) -> int:
        return max((cell_len(part) for text in texts for part in split(text)), default=0)

    widths = [max(1, longest(col[1:], str.split)) for col in columns]  # the cells' words
    header_words = [max(w, longest(col[:1], str.split)) for w, col in zip(widths, columns)]
    cell_lines = [max(w, longest(col[1:], str.splitlines))
                  for w, col in zip(header_words, columns)]
    natural = [max(w, longest(col[:1], str.splitlines)) for w, col in zip(cell_lines, columns)]
    room = width - (3 * len(columns) + 1)  # a border before each column, one after, padding
    if sum(natural) <= room:
        return None
    if sum(widths) > room:  # only the column of the longest word folds it (a run id),
        widest = widths.index(max(widths))  # beside whole headers where they fit
        for others in (header_words, widths):
            rest = sum(others) - others[widest]
            if room - rest >= FOLDED_MIN:
                widths = [*others[:widest], room - rest, *others[widest + 1:]]
                break
        else:
            return None
    for target in (header_words, cell_lines, natural):
        widths = _spread(widths, target, room - sum(widths))
    return widths


def _spread(widths: list[int], target: list[int], spare: int) -> list[int]:
    """widths grown toward target by at most spare characters in all, in proportion to what
    each lacks (the rounding's remainder to those that lack most)."""
    lack = [t - w for w, t in zip(widths, target)]
    if sum(lack) <= spare:
        return list(target)
    grown = [w + spare * x // sum(lack) for w, x in zip(widths, lack)]
    left = spare - (sum(grown) - sum(widths))  # fewer than the columns that lack any
    for i in sorted(range(len(grown)), key=lambda i: lack[i], reverse=True)[:left]:
        grown[i] += 1
    return grown


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=err_console, transient=False,
    )


@contextmanager
def figure_progress(total: int | None) -> Iterator[Callable[[], None]]:
    """A bar on stderr while figures are drawn (gone when done); yields what advances it."""
    with Progress(TextColumn("[bold]drawing figures"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console, transient=True) as progress:
        task = progress.add_task("figures", total=total)
        yield lambda: progress.advance(task)


def check_writable(out: Path, experiments: set[str], files: tuple[str, ...] = ()) -> None:
    """Fail early, before any training and without creating anything, where results cannot
    be written: the results folder, each experiment's folder that exists already, and the
    files each experiment's folder gets beside its runs."""
    from bnexp.results import NO_LOCKS, lock_problem

    problems = []
    for folder in [out] + [out / name for name in sorted(experiments)]:
        if folder.exists() and not folder.is_dir():
            problems.append(f"{folder}: is a file, not a folder; move it away")
            continue
        checked = folder == out or folder.is_dir()  # else the sweep makes it, in out
        if checked and (why := _cannot_create_in(folder)):
            problems.append(f"{folder}: results folder is not writable ({why})")
        elif checked and (why := lock_problem(_nearest_existing(folder))):
            problems.append(f"{folder}: files cannot be locked there ({why}); {NO_LOCKS}")
        if folder != out:
            problems += [f"{folder / name}: is a folder where a file is written; move it "
                         "away" for name in files if (folder / name).is_dir()]
    if problems:
        fail(problems)


def check_output_file(path: Path, option: str) -> None:
    """Fail early, without creating anything, where a file cannot be written at path (a
    command that works for minutes before writing checks first)."""
    if path.is_dir():
        fail([f"{option} {path}: is a folder; give a file name"])
    if why := _cannot_create_in(path.parent):
        fail([f"{option} {path}: cannot write there ({why})"])


def _nearest_existing(path: Path) -> Path:
    return next(p for p in [path, *path.parents] if p.exists())


def _cannot_create_in(path: Path) -> str | None:
    """Why nothing could be created at path's nearest existing folder (None if it can): a
    folder made and removed there at once, since permissions alone do not tell (root, /proc,
    a read-only mount); its name is its own, so sweeps starting together never remove each
    other's."""
    parent = _nearest_existing(path)
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".bnexp-write-test-"))
    except OSError as exc:
        return f"cannot create anything in {parent}: {exc.strerror or exc}"
    return None
