"""Where a command's time went: starting (imports, data), training populations (steps,
evaluations, compiling, the rest), writing results and figures."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bnexp import sweep


def process_start() -> float:
    """time.perf_counter()'s reading when this process started (Linux; elsewhere: now)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf(
            "SC_CLK_TCK")
        return time.perf_counter() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter()


def time_line(outcomes: list[sweep.Outcome], training_began: float) -> str | None:
    """One line on where the time went since the process started, or None where nothing was
    trained. training_began: perf_counter() when the first population was about to start."""
    results = [o.result for o in outcomes if o.result is not None]
    if not results:
        return None
    # The runs of one population share its times: count each population once; of a resumed
    # one, only what this command spent.
    populations = list({r.population_id: (r.wall_time_s,
                                          (r.train_time_s or 0.0) - r.resumed_train_time_s,
                                          r.eval_time_s - r.resumed_eval_time_s,
                                          r.compile_time_s)
                        for r in results}.values())
    wall, steps, evals, compiling = (sum(p[i] for p in populations) for i in range(4))
    now = time.perf_counter()
    starting = training_began - process_start()
    parts = [f"{steps:.1f} s training steps", f"{evals:.1f} s evaluating"]
    if compiling:
        parts.append(f"{compiling:.1f} s compiling")
    parts.append(f"{max(wall - steps - evals - compiling, 0.0):.1f} s setting up and "
                 "checkpointing")
    return (f"time: {now - training_began + starting:.1f} s: {starting:.1f} s starting "
            f"(imports, data), {wall:.1f} s in {len(populations)} population(s) "
            f"({', '.join(parts)}), {max(now - training_began - wall, 0.0):.1f} s writing "
            "results and figures")
