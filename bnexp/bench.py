"""`bnexp bench`: network-steps per second of the population engine against the reference loop.

The workload is the lesson's network (784-100-100-100-10, batch 60, plain SGD) on random data of
MNIST's shape held on the device, so the benchmark needs no dataset. A population of M networks
mixes the lesson's grid: relu and sigmoid, learning rates 0.01, 1 and 2, init 0.05 and 5.0, half
with batch norm. Divergence on random data does not matter for the timing.
"""

from __future__ import annotations

import collections
import itertools
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bnexp import results
from bnexp.config import RunConfig
from bnexp.data import Split
from bnexp.engine import group_runs, train_population, train_reference
from bnexp.engine.capture import INDUCTOR_OPTIONS, compiled, sync
from bnexp.engine.shards import one_step
from bnexp.engine.threads import single_threaded_kernels

LESSON_AXES = (("relu", "sigmoid"), (0.01, 1.0, 2.0), (0.05, 5.0))


@dataclass
class BenchRow:
    engine: str
    device: str
    models: int
    steps: int
    seconds: float
    steps_per_s: float
    network_steps_per_s: float
    ratio: float | None  # population network-steps/s over the reference loop's
    peak_memory_mib: float
    note: str = ""
    compile_s: float = 0.0  # compiling and capturing the step, not in seconds
    arch: str = "mlp"  # the network timed: the lesson's MLP or the ConvNet


def random_split(device: torch.device, n_train: int = 55_000, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)

    def part(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)

    return Split(*part(n_train), *part(5_000), *part(10_000)).to(device)


def population_runs(n_models: int, steps: int, eval_every: int, dtype: str = "float32",
                    ) -> list[RunConfig]:
    """n_models networks as n_models / 2 plain/BN pairs cycling through the lesson's grid."""
    cells = itertools.cycle(itertools.product(*LESSON_AXES))
    runs = []
    for i in range(max(1, n_models // 2)):
        activation, lr, init = next(cells)
        # Cells repeat beyond 12 pairs: nudge lr so every run stays distinct.
        lr = lr * (1 + i // 12 * 1e-3)
        runs.append(RunConfig(experiment="bench", activation=activation, lr=lr,
                              init_scale=init, steps=steps, eval_every=eval_every,
                              dtype=dtype))
    return runs


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_reference(split: Split, device: torch.device, steps: int, dtype: str = "float32",
                    ) -> BenchRow:
    """One network at a time (the loop the population engine replaces); a short run,
    extrapolated per network-step."""
    run = RunConfig(experiment="bench", activation="relu", lr=0.01, steps=steps,
                    eval_every=steps, dtype=dtype)
    result = train_reference(run, split, device, threads=1)
    seconds = result.train_time_s
    n_networks = len(run.batch_norm)
    return BenchRow("reference", str(device), 1, steps, seconds, n_networks * steps / seconds,
                    n_networks * steps / seconds, 1.0, _peak_memory_mib(device),
                    note=f"extrapolated from {steps} steps")


def bench_convnet(split: Split, device: torch.device, steps: int, dtype: str = "float32",
                  ) -> BenchRow:
    """The ConvNet comparison as a sweep trains it (the reference engine, its two networks
    side by side on the CPU): the rate dry runs estimate ConvNet runs with."""
    run = RunConfig(experiment="bench", arch="convnet", activation="relu", lr=0.01,
                    steps=steps, eval_every=steps, dtype=dtype)
    result = train_reference(run, split, device)
    rate = len(run.batch_norm) * steps / result.train_time_s
    side = "" if result.threads == 1 else f", {result.threads} networks side by side"
    return BenchRow("reference", str(device), 1, steps, result.train_time_s, rate, rate,
                    None, _peak_memory_mib(device), note=f"convnet{side}", arch="convnet")


def bench_population(split: Split, device: torch.device, n_models: int, steps: int,
                     reference: BenchRow | None, cuda_graph: bool = True,
                     compile_step: bool | None = None, dtype: str = "float32") -> BenchRow:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = population_runs(n_models, steps, eval_every=steps, dtype=dtype)
    # shards as a long run has them (in processes on a CPU that can fork), whatever steps
    result = train_population(runs, split, device, cuda_graph=cuda_graph,
                              compile_step=compile_step, shard_processes=True)[0]
    seconds = result.train_time_s
    rate = result.population_size * steps / seconds
    ratio = rate / reference.network_steps_per_s if reference else None
    return BenchRow("population", str(device), result.population_size, steps, seconds,
                    steps / seconds, rate, ratio, _peak_memory_mib(device),
                    note=_execution(result), compile_s=result.compile_time_s)


def _execution(result) -> str:
    """How a population ran: eager or compiled, and on the CPU on how many threads or worker
    processes."""
    if result.device != "cpu":
        return result.execution
    unit = "processes" if result.shards_in == "processes" else "threads"
    return f"{result.execution}, {result.threads} {unit if result.threads > 1 else 'thread'}"


def bench_grid(runs: list[RunConfig], split: Split, device: torch.device,
               compile_step: bool | None = None) -> dict:
    """Training wall time of a whole grid through the population engine, as `sweep` runs it
    (wall time includes start-up, compiling, capture and evaluation)."""
    start = time.perf_counter()
    trained = [train_population(group, split, device, compile_step=compile_step)
               for group in group_runs(runs)]
    wall = time.perf_counter() - start
    return {
        "runs": len(runs),
        "networks": sum(len(r.batch_norm) for r in runs),
        "seeds": len({r.seed for r in runs}),
        "populations": len(trained),
        "steps": max(r.steps for r in runs),
        "eval_every": runs[0].eval_every,
        "wall_time_s": wall,
        "train_time_s": sum(group[0].train_time_s for group in trained),
        "compile_time_s": sum(group[0].compile_time_s for group in trained),
        "execution": sorted({group[0].execution for group in trained}),
    }


class _CountOps(TorchDispatchMode):
    """Counts the aten operators dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.views = 0  # of them, views: no kernel, no memory traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        self.views += func.is_view
        return func(*args, **(kwargs or {}))


def _count_ops(step: Callable[[], None]) -> _CountOps:
    """The aten operators one steady call of step dispatches (the first call allocates)."""
    step()
    with _CountOps() as counter:
        step()
    return counter


def _cuda_kernels(step) -> int:
    """CUDA kernels one call of step launches (memory copies and sets not counted)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    sync(torch.device("cuda"))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync(torch.device("cuda"))
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset")))


def _compile_timed(step: Callable[[], None], device: torch.device,
                   options: dict[str, object] | None = None,
                   ) -> tuple[Callable[[], None], float]:
    """(step compiled by Inductor, seconds to compile it: its first call)."""
    start = time.perf_counter()
    fast = compiled(step, options)
    fast()
    sync(device)
    return fast, time.perf_counter() - start


def _cpu_compiled_calls(step) -> dict:
    """What one call of the CPU step compiled by Inductor runs: calls of its generated C++
    kernels (each may hold several loops) and the aten operators it calls (matrix products),
    counted by the profiler (Inductor's kernel profiling names every generated kernel)."""
    from torch.profiler import ProfilerActivity, profile

    fast, seconds = _compile_timed(step, torch.device("cpu"),
                                   {**INDUCTOR_OPTIONS, "cpp.enable_kernel_profile": True})
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fast()
    kernels, aten = 0, 0
    for event in prof.events():
        parent = event.cpu_parent
        if parent is not None and (parent.name.startswith("aten::") or "cpp_fused" in parent.name):
            continue  # inside a counted call
        kernels += "cpp_fused" in event.name
        aten += event.name.startswith("aten::")
    return {"cpu_compiled_kernel_calls": kernels, "cpu_compiled_aten_calls": aten,
            "cpu_compiled_calls": kernels + aten, "compile_s": seconds}


def ops_per_step(split: Split, device: torch.device, compile_step: bool = False) -> dict:
    """What one training step of the lesson population (its 24 networks) dispatches:
    aten operators of the eager step (on any device, in the device's layout and in CUDA's,
    one stack for plain and BN networks); on CUDA, kernels launched by the
    eager and by the compiled step; on the CPU with compile_step, the calls the compiled
    step makes."""
    runs = population_runs(24, steps=1, eval_every=1)
    step = one_step(runs, split, device)
    counter = _count_ops(step)
    total = sum(counter.ops.values())
    record = {"networks": 24, "aten_ops": total, "aten_ops_without_views": total - counter.views,
              "aten_ops_by_name": dict(counter.ops.most_common()),
              # CUDA's layout (plain and BN networks in one stack) counted on any device
              "aten_ops_one_stack": sum(_count_ops(one_step(runs, split, device,
                                                            one_stack=True)).ops.values())}
    if device.type == "cuda":
        record["cuda_kernels_eager"] = _cuda_kernels(step)
        fast, record["compile_s"] = _compile_timed(step, device)
        record["cuda_kernels_compiled"] = _cuda_kernels(fast)
    elif compile_step:  # compiled on one thread, as the engine compiles each shard's step
        with single_threaded_kernels(device):
            record.update(_cpu_compiled_calls(one_step(runs, split, device, compiling=True)))
    return record


def environment(device: torch.device, tf32: bool = False) -> dict:
    """The environment record of every result, plus whether the timed matrix products ran
    in TF32 (--tf32) rather than FP32."""
    return {**results.environment(str(device)), "tf32": tf32}


def as_record(rows: list[BenchRow], device: torch.device, grid: dict | None,
              ops: dict | None = None, tf32: bool = False) -> dict:
    return {"rows": [asdict(r) for r in rows], "grid": grid, "ops_per_step": ops,
            "environment": environment(device, tf32),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def default_out(root: Path) -> Path:
    return root / "bench" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
