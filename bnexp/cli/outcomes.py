"""The table that closes a sweep: what became of each run (for more than LISTED_RUNS runs,
only the runs that need attention, and how many finished or were skipped)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from bnexp.cli.common import LISTED_RUNS, out_console, settings_column

if TYPE_CHECKING:
    from bnexp import sweep

QUIET = ("done", "skipped")  # outcomes left out of a long table


def print_outcomes(outcomes: list[sweep.Outcome], counts: dict[str, int], out: Path) -> None:
    """A row per run, or beyond LISTED_RUNS a row per run that did not finish or was not
    trained for a reason to look at (failed, locked, mismatch, damaged); counts: the
    outcomes by status."""
    shown = (outcomes if len(outcomes) <= LISTED_RUNS
             else [o for o in outcomes if o.status not in QUIET])
    if shown:
        header, cells = settings_column([o.planned.run for o in shown])
        table = Table(title="Sweep")
        for column in ("experiment", "run", *header, "status", "detail"):
            table.add_column(column, overflow="fold")
        for o, settings in zip(shown, cells):
            detail = o.error or (str(o.folder) if o.folder else "already complete")
            # plain text: an error such as "[enforce fail at alloc_cpu.cpp:117] ..." is no
            # Rich markup
            table.add_row(*map(Text, (o.planned.run.experiment, o.planned.run_id, *settings,
                                      o.status, detail)))
        out_console.print(table)
    if len(shown) < len(outcomes):
        out_console.print(f"{counts['done']:,} done and {counts['skipped']:,} skipped runs not "
                          f"listed (more than {LISTED_RUNS:,} runs): `bnexp runs {out}` lists "
                          "every run", markup=False, highlight=False)
