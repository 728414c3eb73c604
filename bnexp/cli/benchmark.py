"""`bnexp bench`: the engine's speed, compile time and operators per step."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bnexp import config as cfg
from bnexp.cli.common import (
    CompileOption,
    DataDirOption,
    app,
    check_output_file,
    err_console,
    fail,
    import_torch,
    load_runs,
    out_console,
)


def _model_counts(text: str) -> list[int]:
    from bnexp.engine.common import MAX_POPULATION_NETWORKS

    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        fail([f"--models {text}: expected positive integers separated by commas, e.g. 2,32,256"])
    if max(counts) > MAX_POPULATION_NETWORKS:
        fail([f"--models {text}: a population has at most {MAX_POPULATION_NETWORKS:,} networks "
              "(about 5 GB; larger grids train as several populations)"])
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
    tf32: Annotated[bool, typer.Option(
        "--tf32", help="Time float32 networks whose matrix products run in TF32 on the "
        "tensor cores (dtype tf32; CUDA, Ampere or newer). Off: full FP32.")] = False,
    out: Annotated[Path | None, typer.Option(
        "--out", metavar="PATH",
        help="JSON file (default results/bench/bench-<time>.json).")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Measure network-steps/s of the population engine against the one-at-a-time loop (and
    the ConvNet's, for dry runs' estimates), compile time, and the operators one training
    step of the lesson population dispatches."""
    import json

    import_torch()
    from bnexp import bench as bench_mod
    from bnexp.engine import resolve_device
    from bnexp.engine.precision import tf32_problem
    from bnexp.files import atomic_write

    if device not in cfg.DEVICES:
        fail([f"--device {device}: expected one of {', '.join(cfg.DEVICES)}"])
    try:
        dev = resolve_device(device)
    except cfg.ConfigError as exc:
        fail(exc.problems)
    cuda = dev.type == "cuda"
    if tf32 and (problem := tf32_problem(dev)):
        fail([f"--tf32 {problem}"])
    dtype = "tf32" if tf32 else "float32"
    counts = _model_counts(models or ("2,32,256,1024" if cuda else "2,32,256"))
    n_steps = steps or (3000 if cuda else 300)
    grid_runs = (load_runs([grid], [f"device={dev.type}"] + (["dtype=tf32"] if tf32 else []),
                           grid_seeds) if grid else [])
    path = out or bench_mod.default_out(Path("results"))
    check_output_file(path, "--out")
    split = bench_mod.random_split(dev)
    rows = []
    with err_console.status("reference loop (one network at a time)..."):
        reference = bench_mod.bench_reference(split, dev, reference_steps, dtype)
    rows.append(reference)
    with err_console.status("the ConvNet on the reference engine..."):
        rows.append(bench_mod.bench_convnet(split, dev, min(reference_steps, 100), dtype))
    for m in counts:
        with err_console.status(f"population engine, {m} networks..."):
            rows.append(bench_mod.bench_population(
                split, dev, m, n_steps, reference, cuda_graph, compile_step, dtype))
    with err_console.status("operators per training step..."):
        ops = bench_mod.ops_per_step(split, dev, compile_step)
    grid_record = (_bench_grid(grid, grid_runs, split, dev, compile_step, data_dir)
                   if grid_runs else None)
    out_console.print(_bench_table(rows))
    out_console.print(_ops_line(ops), highlight=False)
    if grid_record:
        out_console.print(_grid_line(grid_record), highlight=False)
    atomic_write(path, json.dumps(bench_mod.as_record(rows, dev, grid_record, ops, tf32), indent=2))
    out_console.print(f"written {path}", markup=False)


def _bench_grid(grid: Path, runs: list, split, device, compile_step: bool,
                data_dir: Path | None) -> dict:
    """The grid file timed as sweep trains it: on real data where found, else on split."""
    from bnexp import bench as bench_mod
    from bnexp.data import DataError, load_split, resolve_data_dir

    try:
        split, source = load_split(runs[0].dataset, resolve_data_dir(data_dir),
                                   device), "real data"
    except DataError:
        source = "random data"
    with err_console.status(f"grid {grid} ({len(runs)} runs, {source})..."):
        record = bench_mod.bench_grid(runs, split, device, compile_step)
    record.update(file=str(grid), data=source)
    return record


def _ops_line(ops: dict) -> str:
    kernels = (f"; CUDA kernels: {ops['cuda_kernels_eager']} eager, "
               f"{ops['cuda_kernels_compiled']} compiled ({ops['compile_s']:.1f} s to compile)"
               if "cuda_kernels_compiled" in ops else
               f"; compiled: {ops['cpu_compiled_calls']} calls ("
               f"{ops['cpu_compiled_kernel_calls']} of generated C++ kernels, "
               f"{ops['cpu_compiled_aten_calls']} of aten operators; {ops['compile_s']:.1f} s "
               "to compile)" if "cpu_compiled_calls" in ops else "")
    return (f"one training step of the lesson population ({ops['networks']} networks): "
            f"{ops['aten_ops']} aten operators dispatched ({ops['aten_ops_without_views']} "
            f"without views; {ops['aten_ops_one_stack']} with CUDA's one stack){kernels}")


def _grid_line(record: dict) -> str:
    return (f"grid {record['file']}: {record['networks']} networks x {record['steps']:,} steps "
            f"({record['data']}): {record['train_time_s']:.1f} s training, "
            f"{record['wall_time_s']:.1f} s wall with evaluation every "
            f"{record['eval_every']} steps; {record['populations']} population(s), "
            f"{record['seeds']} seed(s), {record['compile_time_s']:.1f} s compiling, "
            f"{', '.join(record['execution'])}")


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
