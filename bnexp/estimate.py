"""A sweep's training time, estimated from the newest `bnexp bench` record of its device."""

from __future__ import annotations

import json
import math
from pathlib import Path


def bench_rates(bench_dir: Path, device: str,
                ) -> tuple[Path, dict[int, float], dict[str, float]] | None:
    """(record, population network-steps/s by population size, the reference engine's
    network-steps/s by architecture: mlp, and convnet where the record has it) from the
    newest readable bench record for the device's type (cpu, cuda), or None."""
    kind = device.split(":")[0]
    for path in sorted(bench_dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            rows = json.loads(path.read_text())["rows"]
            mine = [r for r in rows if str(r["device"]).split(":")[0] == kind]
            population = {int(r["models"]): float(r["network_steps_per_s"])
                          for r in mine if r["engine"] == "population"}
            reference: dict[str, float] = {}
            for r in mine:  # the first row of each architecture (older records: mlp only)
                if r["engine"] == "reference":
                    reference.setdefault(str(r.get("arch", "mlp")),
                                         float(r["network_steps_per_s"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if (population and reference.get("mlp") and min(population.values()) > 0
                and min(reference.values()) > 0):
            return path, population, reference
    return None


def seconds(work: list[tuple[int, int, str]], population: dict[int, float],
            reference: dict[str, float]) -> tuple[float, int]:
    """(training seconds, items left out) for (networks, steps, how) items, how being
    "population" or, for a run of the reference engine, its architecture: each population at
    the rate measured for the nearest population size (on a log scale), each reference run
    at its architecture's rate; an architecture the record lacks is left out."""
    total, left_out = 0.0, 0
    for networks, steps, how in work:
        if how == "population":
            size = min(population, key=lambda m: abs(math.log(m) - math.log(networks)))
            rate = population[size]
        elif how in reference:
            rate = reference[how]
        else:
            left_out += 1
            continue
        total += networks * steps / rate
    return total, left_out


def describe(total: float) -> str:
    if total < 90:
        return f"{total:.0f} s"
    if total < 5400:
        return f"{total / 60:.0f} min"
    return f"{total / 3600:.1f} h"
