import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bnexp import bench
from bnexp.cli import app
from bnexp.engine import processes

CPU = torch.device("cpu")


def test_population_runs_mix_the_lesson_grid():
    runs = bench.population_runs(32, steps=10, eval_every=10)
    assert sum(len(r.batch_norm) for r in runs) == 32
    assert {r.activation for r in runs} == {"relu", "sigmoid"}
    assert {r.init_scale for r in runs} == {0.05, 5.0}
    assert len({(r.activation, r.lr, r.init_scale) for r in runs}) == 16, "every run distinct"


def test_bench_command_writes_its_table(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", "--models", "2,4",
                                      "--steps", "5", "--reference-steps", "5",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "network-steps/s" in result.stdout.replace("\n", "") or "network" in result.stdout
    record = json.loads(out.read_text())
    engines = [(r["engine"], r["arch"], r["models"]) for r in record["rows"]]
    assert engines == [("reference", "mlp", 1), ("reference", "convnet", 1),
                       ("population", "mlp", 2), ("population", "mlp", 4)]
    for row in record["rows"]:
        assert row["network_steps_per_s"] > 0 and row["peak_memory_mib"] > 0
    assert record["rows"][1]["ratio"] is None and record["rows"][2]["ratio"] > 0
    # the population's shards as a long run has them: on 2 or more threads in processes, a
    # network each (on Linux); the ConvNet's two networks train side by side
    two = torch.get_num_threads() >= 2
    fork = processes.can_fork()
    pair = "eager, 2 processes" if two and fork else "eager, 1 thread"
    four = ("eager, 2 processes" if fork else "eager, 2 threads") if two else "eager, 1 thread"
    convnet = "convnet, 2 networks side by side" if two else "convnet"
    assert [r["note"] for r in record["rows"][1:]] == [convnet, pair, four]
    assert record["environment"]["cpu_count"] >= 1 and record["environment"]["torch"]
    assert record["environment"]["tf32"] is False
    ops = record["ops_per_step"]
    assert ops["networks"] == 24 and 0 < ops["aten_ops_without_views"] < ops["aten_ops"]
    assert ops["aten_ops_by_name"]["bmm"] >= 7, "one product per layer and direction, one stack"
    assert 0 < ops["aten_ops_one_stack"] < ops["aten_ops"], "CUDA's layout: one stack, not two"
    # each kernel writes where its result belongs (an activation's gradient into its slice
    # of the stack's, the divergence step in place): no operator copies one
    assert "copy_" not in ops["aten_ops_by_name"], ops["aten_ops_by_name"]


def test_the_lesson_population_needs_one_stack_on_cuda_and_two_on_the_cpu():
    """The lesson grid's 24 networks (two activations, BN on and off) share one stack on CUDA
    (each layer's product once for all of them); the CPU gives plain and BN their own."""
    from bnexp.engine.shards import build_stacks

    runs = bench.population_runs(24, steps=1, eval_every=1)
    groups, _ = build_stacks(runs, torch.device("meta"))  # the CUDA layout, without a GPU
    assert [[s.m for s in group] for group in groups] == [[24]]
    assert [len(s.slices) for s in groups[0]] == [2], "relu and sigmoid: one slice each"
    groups, _ = build_stacks(runs, CPU)
    assert [[s.m for s in group] for group in groups] == [[12, 12]]


def test_bench_rejects_bad_model_counts():
    result = CliRunner().invoke(app, ["bench", "--models", "two", "--device", "cpu"])
    assert result.exit_code == 2 and "--models two" in result.stderr
    result = CliRunner().invoke(app, ["bench", "--models", "2,4097", "--device", "cpu"])
    assert result.exit_code == 2 and "at most 4,096 networks" in result.stderr


@pytest.mark.parametrize("where", ["folder", "under a file", "proc"])
def test_bench_checks_its_output_before_measuring(tmp_path, where, monkeypatch):
    """The JSON is written after minutes of measuring: a place it cannot go is found first."""
    if where == "proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    (tmp_path / "a-file").write_text("")
    out = {"folder": tmp_path, "under a file": tmp_path / "a-file" / "b.json",
           "proc": Path("/proc/bnexp-test/b.json")}[where]
    monkeypatch.setattr(bench, "bench_reference", lambda *a: pytest.fail("measured first"))
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", "--models", "2",
                                      "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.startswith(f"error: --out {out}: ") and result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"], "nothing created"


def test_the_compiled_cpu_steps_calls_are_counted():
    """--compile on the CPU: the compiled step of the lesson population calls its generated
    kernels and one aten product per layer and direction of each of its two stacks."""
    ops = bench.ops_per_step(bench.random_split(CPU, n_train=600), CPU, compile_step=True)
    products = 2 * (4 + 4 + 3)  # forward, weight gradients, input gradients (not layer 1)
    assert ops["cpu_compiled_aten_calls"] == products
    assert 0 < ops["cpu_compiled_kernel_calls"] < ops["aten_ops_without_views"]
    assert ops["cpu_compiled_calls"] == products + ops["cpu_compiled_kernel_calls"]
    assert ops["compile_s"] > 0
