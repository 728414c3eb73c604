"""`bnexp sweep --dry-run`: the runs, what would happen to each, the populations they would
train in and why, and an estimate of the training time from `bnexp bench` records (for
large grids a row per population rather than per run)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from bnexp.cli.common import LISTED_RUNS, out_console, settings_column

if TYPE_CHECKING:
    from bnexp import sweep


def dry_run_table(planned: list[sweep.Planned], force: bool, retry_failed: bool, out: Path,
                  executor: str = "local") -> None:
    """The runs, what would happen to each, and the populations they would train in (for
    more than LISTED_RUNS runs, one row per population and one per status of the rest)."""
    from bnexp import sweep

    todo = sweep.to_train(planned, force, retry_failed)
    where = sweep.populations(todo, sweep.batch_threads(executor))
    sizes = _memory(todo, where)
    table = (_run_table(planned, where, sizes) if len(planned) <= LISTED_RUNS
             else _population_table(planned, where, sizes))
    out_console.print(table)
    out_console.print(_estimate(todo, where, out), highlight=False)
    if budgets := _budgets(todo):
        out_console.print(budgets, highlight=False)
    n_groups = len({number for number, _ in where.values()})
    out_console.print(f"{len(todo)} run(s) to train in {n_groups} population(s), "
                      f"{sweep.network_steps(todo):,} network-steps. Runs share a population "
                      "when they differ only in seed (each seed reads its own batch stream), "
                      "learning rate, activation, initial weights, normaliser (batch, layer or "
                      "group norm, before or after the activation), dropout or clipping; "
                      "another dataset, batch size, step count, evaluation schedule or dtype "
                      "needs its own. Runs with the hand-written BN layer, and ConvNets, train "
                      "on the reference engine, a network per CPU thread: several runs at once "
                      "where their networks fit the threads and they share data, dtype and "
                      "steps.",
                      highlight=False)


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title)
    for column in columns:
        number = column in ("runs", "net-steps")
        table.add_column(column, overflow="fold", no_wrap=number or column == "status",
                         justify="right" if number else "left")
    return table


def _memory(todo: list[sweep.Planned], where: dict) -> dict[int, int]:
    """The estimated memory of each population of the population engine, by its number."""
    from bnexp.engine import effective_engine, memory

    members: dict[int, list[sweep.Planned]] = {}
    for p in todo:
        if effective_engine(p.run) == "population":
            members.setdefault(where[id(p)][0], []).append(p)
    return {number: memory.estimate_bytes([p.run for p in group], group[0].device)
            for number, group in members.items()}


def _budgets(todo: list[sweep.Planned]) -> str:
    """What memory a population is given on each device the runs train on."""
    from bnexp.engine import effective_engine, memory

    devices = dict.fromkeys(p.device for p in todo if effective_engine(p.run) == "population")
    said = []
    for device in devices:
        budget = memory.population_budget(device)
        if budget is None:
            said.append(f"on {device} no limit (its memory is not known here)")
            continue
        total = memory.bytes_text(memory.device_memory(device))
        said.append(f"on {device} at most {memory.bytes_text(budget)} "
                    f"({memory.POPULATION_SHARE:.0%} of {total})")
    if not said:
        return ""
    return ("Memory: a population's estimated training memory is shown beside its networks; "
            f"a population is given {', '.join(said)}, and larger groups of runs train as "
            "several populations (with the same numbers).")


def _population_label(number: int, size: int, sizes: dict[int, int]) -> str:
    from bnexp.engine import memory

    if number not in sizes:
        return f"{number} ({_networks(size)})"
    return f"{number} ({_networks(size)}, ~{memory.bytes_text(sizes[number])})"


def _run_table(planned: list[sweep.Planned], where: dict, sizes: dict[int, int]) -> Table:
    """One row per run."""
    from bnexp.engine import effective_engine

    header, cells = settings_column([p.run for p in planned])
    table = _table(f"{len(planned)} runs (dry run)", ("experiment", "run", *header, "device",
                                                      "engine", "population", "net-steps",
                                                      "status"))
    for p, settings in zip(planned, cells):
        trains = id(p) in where
        status = "would train" if trains else f"{p.status}, would skip"
        group = "-"
        if trains:
            group = _population_label(*where[id(p)], sizes)
        table.add_row(p.run.experiment, p.run_id, *map(Text, settings), str(p.device),
                      effective_engine(p.run), group, f"{p.run.steps * len(p.run.batch_norm):,}",
                      status)
    return table


def _networks(n: int) -> str:
    return f"{n:,} network" + ("" if n == 1 else "s")


def _population_table(planned: list[sweep.Planned], where: dict, sizes: dict[int, int],
                      ) -> Table:
    """One row per population to train (the reference engine's runs, each alone, one row per
    experiment), then one per status of the runs that would be skipped."""
    from bnexp.engine import effective_engine

    rows: dict[tuple, list[sweep.Planned]] = {}
    for p in planned:
        if id(p) not in where:
            key: tuple = ("skip", p.status)
        elif effective_engine(p.run) == "reference":
            key = ("reference", p.run.experiment, str(p.device))
        else:
            key = ("population", where[id(p)][0])
        rows.setdefault(key, []).append(p)
    table = _table(f"{len(planned):,} runs (dry run; more than {LISTED_RUNS:,}: a row per "
                   "population)", ("experiments", "runs", "device", "engine", "population",
                                   "net-steps", "status"))
    for key, runs in rows.items():
        first = runs[0]
        experiments = ", ".join(dict.fromkeys(p.run.experiment for p in runs))
        steps = f"{sum(p.run.steps * len(p.run.batch_norm) for p in runs):,}"
        if key[0] == "skip":
            table.add_row(experiments, f"{len(runs):,}", "-", "-", "-", steps,
                          f"{key[1]}, would skip")
            continue
        if key[0] == "reference":
            calls = len({where[id(p)][0] for p in runs})
            group = "each alone" if calls == len(runs) else f"in {calls}, side by side"
        else:
            group = _population_label(*where[id(first)], sizes)
        table.add_row(experiments, f"{len(runs):,}", str(first.device),
                      effective_engine(first.run), group, steps, "would train")
    return table


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
    stacks: dict[int, tuple[int, int, str]] = {}  # by population number
    alone: list[tuple[int, int, str]] = []  # the reference engine's runs, each at its rate
    for p in todo:
        number, size = where[id(p)]
        if effective_engine(p.run) == "population":
            stacks[number] = (size, p.run.steps, "population")
        else:  # as if alone: runs trained together take less (a conservative figure)
            alone.append((len(p.run.batch_norm), p.run.steps, p.run.arch))
    total, left_out = estimate.seconds([*stacks.values(), *alone], population, reference)
    missing = (f"; {left_out} ConvNet run(s) left out: that record has no ConvNet rate, a "
               "newer `bnexp bench` measures one" if left_out else "")
    return (f"estimated training time: {estimate.describe(total)} on {device} (rates from "
            f"{path}; evaluation, start-up and compiling not included{missing})")
