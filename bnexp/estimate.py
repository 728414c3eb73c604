"""A sweep's training time, estimated from the newest `bnexp bench` record of its device."""

from __future__ import annotations

import json
import math
from pathlib import Path


def bench_rates(bench_dir: Path, device: str) -> tuple[Path, dict[int, float], float] | None:
    """(record, population network-steps/s by population size, reference network-steps/s)
    from the newest readable bench record for the device's type (cpu, cuda), or None."""
    kind = device.split(":")[0]
    for path in sorted(bench_dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            rows = json.loads(path.read_text())["rows"]
            mine = [r for r in rows if str(r["device"]).split(":")[0] == kind]
            population = {int(r["models"]): float(r["network_steps_per_s"])
                          for r in mine if r["engine"] == "population"}
            reference = [float(r["network_steps_per_s"]) for r in mine
                         if r["engine"] == "reference"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if population and reference and min(population.values()) > 0 and reference[0] > 0:
            return path, population, reference[0]
    return None


def seconds(work: list[tuple[int, int, bool]], population: dict[int, float],
            reference: float) -> float:
    """Training seconds for (networks, steps, on the population engine) items: each
    population at the rate measured for the nearest population size (on a log scale)."""
    total = 0.0
    for networks, steps, stacked in work:
        if stacked:
            size = min(population, key=lambda m: abs(math.log(m) - math.log(networks)))
            rate = population[size]
        else:
            rate = reference
        total += networks * steps / rate
    return total


def describe(total: float) -> str:
    if total < 90:
        return f"{total:.0f} s"
    if total < 5400:
        return f"{total / 60:.0f} min"
    return f"{total / 3600:.1f} h"
