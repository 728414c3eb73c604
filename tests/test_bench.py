import json

from typer.testing import CliRunner

from bnexp import bench
from bnexp.cli import app


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
    engines = [(r["engine"], r["models"]) for r in record["rows"]]
    assert engines == [("reference", 1), ("population", 2), ("population", 4)]
    for row in record["rows"]:
        assert row["network_steps_per_s"] > 0 and row["peak_memory_mib"] > 0
    assert record["rows"][1]["ratio"] > 0
    assert record["environment"]["cpu_count"] >= 1 and record["environment"]["torch"]


def test_bench_rejects_bad_model_counts():
    result = CliRunner().invoke(app, ["bench", "--models", "two", "--device", "cpu"])
    assert result.exit_code == 2 and "--models two" in result.stderr
