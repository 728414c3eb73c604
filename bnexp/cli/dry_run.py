"""`bnexp sweep --dry-run`: the runs, what would happen to each, the populations they would
train in and why, and an estimate of the training time from `bnexp bench` records."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from bnexp.cli.common import out_console

if TYPE_CHECKING:
    from bnexp import sweep


def dry_run_table(planned: list[sweep.Planned], force: bool, retry_failed: bool, out: Path,
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
                      "group norm, before or after the activation), dropout or clipping; "
                      "another dataset, batch size, step count, evaluation schedule or dtype "
                      "needs its own, and runs with the hand-written BN layer, and ConvNets, "
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
