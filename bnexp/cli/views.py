"""Commands that read what is on disk: validate, runs, plot, report, bn-check."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from bnexp import config as cfg
from bnexp import experiment_file, readback
from bnexp.cli.common import (
    YesOption,
    add_columns,
    app,
    err_console,
    fail,
    figure_progress,
    import_torch,
    out_console,
    stopped_by_sigterm,
)


@app.command()
def validate(files: Annotated[list[Path], typer.Argument(help="Experiment YAML files.")],
             yes: YesOption = False) -> None:
    """Check experiment files without training; every problem is reported at once."""
    problems = []
    for path in files:
        try:
            n = len(cfg.expand_grid(experiment_file.load_spec(path, allow_large=yes)))
            out_console.print(f"ok {path}: {n} run(s)", markup=False, highlight=False)
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
        help="Only runs with KEY=VALUE (a setting, or status: done, partial, failed, damaged, "
        "mismatch, started); repeatable, e.g. --where activation=relu --where status=done.")
        ] = None,
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
            key, value = experiment_file.parse_override(text)
        except cfg.ConfigError:
            problems.append(f"--where {text}: expected KEY=VALUE, e.g. --where lr=0.1")
            continue
        if ".".join(key) not in cfg.RunConfig.model_fields and key != ["status"]:
            problems.append(f"--where {text}: {'.'.join(key)} is not a run setting")
        elif key == ["status"] and value not in inventory.STATUSES:
            problems.append(f"--where {text}: a status is one of "
                            f"{', '.join(inventory.STATUSES)}")
        elif key != ["status"] and (why := cfg.setting_problem(key[0], value)):
            problems.append(f"--where {text}: no run can have it ({why})")
        conditions.append((".".join(key), value))
    if problems:
        fail(problems)
    rows = [r for r in inventory.find_runs(root) if inventory.matches(r, conditions)]
    if as_csv:
        sys.stdout.write(inventory.as_csv(rows))
        return
    out_console.print(_runs_table(rows, inventory.model_names(rows), root))
    for line in why_lines(rows):  # whole lines below the table, not folded into a column
        out_console.print(line, markup=False, highlight=False, soft_wrap=True)


def _runs_table(rows: list, models: list[str], root: Path) -> Table:
    table = Table(title=Text(f"runs under {root}: {len(rows)}"))
    headers, settings = _setting_cells(rows)
    columns = ["experiment", "run", "status", *headers, *[f"{m} val/test" for m in models]]
    lines = []
    for row, cells in zip(rows, settings, strict=True):
        accs = []
        for m in models:
            val, test = row.accuracies.get(m, (math.nan, math.nan))
            accs.append("-" if math.isnan(val) else
                        f"{val:.4f}" + ("" if math.isnan(test) else f" / {test:.4f}"))
        lines.append([row.experiment, row.run_id, row.status_text, *cells, *accs])
    add_columns(table, columns, lines, out_console.width)
    return table


def _setting_cells(rows: list) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The table's setting columns and each row's cells: of one experiment, a column per
    setting its runs vary; of several, one `settings` column with what tells each
    experiment's runs apart beyond their names (a column per setting any of them varies
    would be dozens)."""
    from bnexp import inventory

    if len({row.experiment for row in rows}) <= 1:
        varied = inventory.varied_settings(rows)
        return tuple(varied), [tuple(str(row.config.get(k, "")) for k in varied)
                               for row in rows]
    texts = inventory.apart([(row.experiment, row.config) for row in rows])
    return (("settings",), [(text,) for text in texts]) if any(texts) else ((), [()] * len(rows))


def why_lines(rows: list) -> list[str]:
    """Why runs failed, are damaged or are mismatches: a line each, for below the table."""
    return [f"{row.status} {row.experiment}/{row.run_id}: {row.detail}" for row in rows
            if row.detail]


@app.command()
def plot(root: Annotated[Path, typer.Argument(help="Results folder to redraw.")] = Path("results"),
         ) -> None:
    """Redraw every figure under a results folder from the files on disk."""
    from bnexp import plots, report_figures
    if not root.is_dir():
        fail([f"{root}: no such results folder"])
    try:
        # one pool for every figure: the experiments' first (the paper figures take
        # longest), then the runs'
        calls, damaged = report_figures.tree_figures(root)
        with stopped_by_sigterm(), figure_progress(len(calls)) as advance:
            paths = report_figures.with_svgs(plots.draw_calls(calls, parallel=True,
                                                              on_figure=advance))
    except OSError as exc:
        fail([f"{exc.filename or root}: cannot write a figure ({exc.strerror or exc})"])
    _warn_damaged(damaged)
    out_console.print(f"drew {len(paths)} figure(s) under {root}", markup=False)


def _warn_damaged(damaged: list[tuple[Path, str]]) -> None:
    for folder, why in damaged:
        edited = why == readback.NOT_ITS_FOLDER  # its numbers are another configuration's
        remedy = ("restore its config.yaml, or delete the folder" if edited
                  else "delete the folder, or rerun the sweep with --force, to train it again")
        err_console.print(f"{'mismatch' if edited else 'damaged'} {folder}: {why}; left out "
                          f"({remedy})", markup=False,
                          highlight=False, soft_wrap=True)


@app.command("report")
def report_command(
    experiments: Annotated[list[Path], typer.Argument(
        help="Experiment folders, e.g. results/lesson_grid (several: one report each; a "
             "results folder: one for each experiment in it).")],
) -> None:
    """Write report.md and a self-contained report.html: statistics over seeds and figures."""
    missing = [f"{e}: no such experiment folder" for e in experiments if not e.is_dir()]
    if missing:
        fail(missing)
    found = [e for folder in experiments for e in experiments_in(folder)]
    with stopped_by_sigterm():
        problems = [problem for experiment in dict.fromkeys(found)
                    if (problem := _report_one(experiment))]
    if problems:
        fail(problems)


def experiments_in(folder: Path) -> list[Path]:
    """folder where it is an experiment's (it holds run folders, finished or not), else the
    experiment folders a results folder holds, by name; folder itself where it holds
    neither (its report then says that it has no runs)."""
    def holds_runs(path: Path) -> bool:
        return any(p.is_file() for p in path.glob("*/config.yaml"))

    if holds_runs(folder):
        return [folder]
    return sorted(p for p in folder.iterdir() if p.is_dir() and holds_runs(p)) or [folder]


def _report_one(experiment: Path) -> str | None:
    """Write one experiment's report and print its table; the problem where it cannot."""
    from bnexp import cells as grid_cells
    from bnexp import report, report_figures

    try:
        intact, damaged = readback.sort_runs(readback.finished(experiment))
        left = report.left_out(experiment, intact)
        cells = grid_cells.collect_cells(experiment, folders=intact)
        with figure_progress(report_figures.figure_count(cells)) as advance:
            md, page = report.write_report(experiment, cells, advance, left)
    except FileNotFoundError as exc:
        return str(exc)
    except OSError as exc:
        return f"{exc.filename or experiment}: cannot write the report ({exc.strerror or exc})"
    _warn_damaged(damaged)
    if left:
        err_console.print(f"left out of {experiment.name}'s statistics: "
                          f"{report.left_out_text(experiment, left)}",
                          markup=False, highlight=False, soft_wrap=True)
    table = Table(title=f"{experiment.name}: comparison over seeds")
    add_columns(table, report.TABLE_HEADER, report.table_rows(cells), out_console.width)
    out_console.print(table)
    out_console.print(f"written {md} and {page}", markup=False)
    return None


# bn-check holds ~20 tensors of batch x features values: 10^7 is ~1.6 GB in float64.
BN_CHECK_MAX_VALUES = 10_000_000
# The verdict is on float64, where only the order of sums differs: measured up to 1.7e-10
# (batch 10^7, one feature; 1e-14 at batch 60). float32 differences grow with the batch (sums
# of many terms: 5e-6 at batch 60, 6e-3 at 10^5, 20 at 10^7) and are shown, not judged.
BN_CHECK_TOLERANCE = 1e-8


@app.command("bn-check")
def bn_check(
    batch: Annotated[int, typer.Option("--batch", min=2, help="Batch size (batch x features "
                                       f"at most {BN_CHECK_MAX_VALUES:,}).")] = 60,
    features: Annotated[int, typer.Option("--features", min=1, help="Units.")] = 100,
    steps: Annotated[int, typer.Option("--steps", metavar="N", min=1, max=100_000,
                                       help="Training steps.")] = 5,
    decay: Annotated[float, typer.Option("--decay", min=0.0, max=1.0,
                                         help="Running-average decay.")] = 0.99,
) -> None:
    """Show that the hand-written batch norm matches torch.nn.BatchNorm1d."""
    if batch * features > BN_CHECK_MAX_VALUES:
        fail([f"--batch {batch} --features {features}: {batch * features:,} values per tensor "
              f"is more than {BN_CHECK_MAX_VALUES:,}"])
    torch = import_torch()

    from bnexp.analyses import compare_batch_norms

    float32 = compare_batch_norms(batch, features, steps, decay)
    float64 = compare_batch_norms(batch, features, steps, decay, dtype=torch.float64)
    table = Table(title="ManualBatchNorm vs nn.BatchNorm1d: largest |difference|",
                  caption=f"{steps} training steps, batch {batch}, {features} features")
    table.add_column("quantity")
    table.add_column("float32", justify="right")
    table.add_column("float64", justify="right")
    for key in float32:
        table.add_row(key.replace("_", " "), f"{float32[key]:.2e}", f"{float64[key]:.2e}")
    out_console.print(table)
    worst = max(float64.values())
    if worst > BN_CHECK_TOLERANCE:
        err_console.print(f"bn-check: float64 differences up to {worst:.2e} exceed "
                          f"{BN_CHECK_TOLERANCE:g}: the two compute different things")
        raise typer.Exit(1)
