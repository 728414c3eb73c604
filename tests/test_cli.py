"""End-to-end through the CLI on tiny MNIST-format files: layout, skipping, errors."""

import csv
import json
import re
import threading
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from bnexp.cli import app
from bnexp.config import RunConfig

runner = CliRunner()

FAST = ["--set", "steps=40", "--set", "eval_every=20", "--device", "cpu"]


@pytest.fixture
def env(tiny_mnist, monkeypatch, tmp_path):
    monkeypatch.setenv("BNEXP_DATA_DIR", str(tiny_mnist))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def experiment(folder: Path, text: str, name: str = "exp.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_run_writes_the_documented_layout(env):
    path = experiment(env, "name: demo\nactivation: relu\nlr: 0.5\n")
    result = invoke("run", path, *FAST)
    assert result.exit_code == 0, result.output
    exp = env / "results" / "demo"
    (run_dir,) = [p for p in exp.iterdir() if p.is_dir()]
    assert {p.name for p in run_dir.iterdir()} == {"config.yaml", "metrics.csv", "summary.json",
                                                 "curves.png", "checkpoint.pt", ".lock"}
    assert {p.name for p in exp.iterdir() if p.is_file()} == {"summary.csv", "summary.md",
                                                            "environment.json", ".lock"}
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["steps"] == 40 and config["lr"] == 0.5 and config["device"] == "cpu"
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [(r["step"], r["model"]) for r in rows] == [
        (s, m) for m in ("plain", "bn") for s in ("0", "20", "40")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["models"]) == {"plain", "bn"}
    for model in summary["models"].values():
        assert 0 <= model["final_test_acc"] <= 1 and model["diverged"] is False
    assert summary["environment"]["torch"] and summary["device"] == "cpu"
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "Final accuracy" in result.stdout
    assert not list(exp.rglob("*.tmp")), "no temporary files left behind"


def test_the_time_line_counts_each_population_once():
    """Runs of one population share its times; two populations with equal times are two."""
    import time

    from bnexp import sweep
    from bnexp.cli import timing
    from bnexp.config import RunConfig
    from bnexp.engine.common import RunResult

    def done(population: str) -> sweep.Outcome:
        result = RunResult(RunConfig(experiment="t"), "cpu", "population", [], 2.0, 2,
                           train_time_s=1.0, eval_time_s=0.5, population_id=population)
        return sweep.Outcome(None, "done", result=result)

    line = timing.time_line([done("a"), done("a"), done("b")], time.perf_counter())
    assert ("4.0 s in 2 population(s) (2.0 s training steps, 1.0 s evaluating, 1.0 s setting "
            "up and checkpointing)") in line
    # a resumed population's training and evaluating before its checkpoint were another
    # command's: its summary counts them, this command's time line does not
    resumed = done("c")
    resumed.result.train_time_s, resumed.result.eval_time_s = 5.0, 0.75
    resumed.result.resumed_train_time_s, resumed.result.resumed_eval_time_s = 4.0, 0.25
    line = timing.time_line([resumed], time.perf_counter())
    assert ("2.0 s in 1 population(s) (1.0 s training steps, 0.5 s evaluating, 0.5 s setting "
            "up and checkpointing)") in line


def test_run_says_where_its_time_went(env):
    path = experiment(env, "name: t\ngrid:\n  lr: [0.1, 0.5]\n")
    result = invoke("run", path, *FAST, "--set", "eval_every=10")
    assert result.exit_code == 0, result.output
    number = r"(\d+\.\d)"
    match = re.fullmatch(
        rf"time: {number} s: {number} s starting \(imports, data\), {number} s in 1 "
        rf"population\(s\) \({number} s training steps, {number} s evaluating, {number} s "
        rf"setting up and checkpointing\), {number} s writing results and figures",
        result.stderr.strip().splitlines()[-1])
    assert match, result.stderr
    total, starting, population, steps, evals, rest, writing = map(float, match.groups())
    assert abs(starting + population + writing - total) <= 0.21, "the parts make the whole"
    assert abs(steps + evals + rest - population) <= 0.21  # each part rounded to 0.1
    summaries = [json.loads(p.read_text()) for p in (env / "results" / "t").rglob("summary.json")]
    assert len(summaries) == 2 and summaries[0]["eval_time_s"] == summaries[1]["eval_time_s"]
    for summary in summaries:  # five evaluations: a share of the population's time, not 0
        assert 0 < summary["eval_time_s"] < summary["wall_time_s"]
        assert summary["compile_time_s"] == 0


def test_rerun_skips_finished_work_and_force_retrains(env):
    path = experiment(env, "name: demo\n")
    assert invoke("run", path, *FAST).exit_code == 0
    summary = next((env / "results" / "demo").glob("*/summary.json"))
    before = summary.read_text()
    again = invoke("run", path, *FAST)
    assert again.exit_code == 0 and "skipped" in again.output
    assert summary.read_text() == before
    forced = invoke("run", path, *FAST, "--force")
    assert forced.exit_code == 0 and summary.read_text() != before  # new wall time


def test_engines_agree_from_the_cli(env):
    path = experiment(env, "name: demo\nlr: 0.01\n")
    assert invoke("run", path, *FAST).exit_code == 0
    assert invoke("run", path, *FAST, "--engine", "reference").exit_code == 0
    folder = env / "results" / "demo"
    summaries = [json.loads(p.read_text()) for p in folder.glob("*/summary.json")]
    assert sorted(s["engine"] for s in summaries) == ["population", "reference"]
    accs = [{k: v["final_val_acc"] for k, v in s["models"].items()} for s in summaries]
    assert accs[0] == accs[1]


BAD_FILES = [
    ("name: x\nlr: 0\n", "lr:"),
    ("name: x\nactivation: swish\n", "activation:"),
    ("name: x\nfoo: 1\n", "foo: unknown key"),
    ("name: x\nsteps: -5\n", "steps:"),
    ("name: x\nbatch_size: many\n", "batch_size:"),
    ("name: x\ndataset: cifar\n", "dataset:"),
    ("name: x\n  bad: [\n", "invalid YAML"),
    ("", "expected a mapping"),
]


@pytest.mark.parametrize("text, fragment", BAD_FILES)
@pytest.mark.parametrize("command", ["run", "validate", "sweep"])
def test_bad_input_exits_2_with_one_line_and_no_traceback(env, text, fragment, command):
    path = experiment(env, text)
    result = invoke(command, path)
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert all(line.startswith("error: ") for line in result.stderr.strip().splitlines())
    assert not (env / "results").exists()


def test_validate_reports_every_problem_of_every_file(env):
    a = experiment(env, "name: a\nlr: -1\nfoo: 2\n", "a.yaml")
    b = experiment(env, "name: b\nactivation: swish\n", "b.yaml")
    result = invoke("validate", a, b)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 3


def test_bad_override_and_missing_file(env):
    path = experiment(env, "name: x\n")
    result = invoke("run", path, "--set", "lr=-2")
    assert result.exit_code == 2 and "lr:" in result.stderr
    result = invoke("run", env / "missing.yaml")
    assert result.exit_code == 2 and "file not found" in result.stderr


def test_missing_data_exits_2(env, monkeypatch, tmp_path):
    monkeypatch.setenv("BNEXP_DATA_DIR", str(tmp_path / "nowhere"))
    result = invoke("run", experiment(env, "name: x\n"), *FAST)
    assert result.exit_code == 2
    assert "no usable data" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 or "error:" in result.stderr


def test_cuda_without_gpu_is_a_clear_error(env):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = invoke("run", experiment(env, "name: x\n"), "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA GPU" in result.stderr


def test_compile_on_the_cpu_is_recorded(env):
    """--compile runs on the CPU too (it pays for small populations); summary.json and the
    time line say so. (float64: the graph test_engine compiles, so Inductor's cache serves
    one of the two.)"""
    path = experiment(env, "name: c\nlr: 0.1\n")
    result = invoke("run", path, *FAST, "--set", "dtype=float64", "--compile")
    assert result.exit_code == 0, result.output
    summary = json.loads(next((env / "results" / "c").glob("*/summary.json")).read_text())
    assert summary["execution"] == "compiled" and summary["compile_time_s"] > 0
    assert re.search(r"[\d.]+ s compiling", result.stderr)


def test_tf32_where_it_cannot_run_is_a_clear_error(env):
    """dtype tf32 is TF32 arithmetic on CUDA tensor cores: refused on the CPU (where it would
    silently be float32), before anything is written."""
    path = experiment(env, "name: t\ndtype: tf32\ngrid:\n  lr: [0.1, 0.2]\n")
    for command in ("run", "sweep"):
        result = invoke(command, path, *FAST)
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert result.stderr.strip().splitlines() == [
            "error: t: dtype: tf32 needs a CUDA GPU (this run trains on the cpu); float32 "
            "runs anywhere"]
        assert not (env / "results").exists()
    bench = invoke("bench", "--device", "cpu", "--tf32")
    assert bench.exit_code == 2 and "--tf32 needs a CUDA GPU" in bench.stderr


def test_a_run_too_large_for_the_machines_memory_is_refused_before_anything_trains(
        env, monkeypatch):
    """One line naming the run and the settings that decide its size, exit 2, nothing
    written; a run that fits the same machine trains."""
    from bnexp.engine import memory

    monkeypatch.setattr(memory, "device_memory", lambda device: 8 * 2**20)
    path = experiment(env, "name: big\nlayers: [784, 300, 300, 10]\ngrid:\n  lr: [0.1, 0.2]\n")
    for command in ("run", "sweep"):
        result = invoke(command, path, *FAST)
        assert result.exit_code == 2 and "Traceback" not in result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, "one line for the runs of one experiment"
        assert lines[0].startswith("error: big: layers [784, 300, 300, 10] with batch_size 60 "
                                   "need about ")
        assert lines[0].endswith("more than the 8 MiB of memory cpu has here; use a smaller "
                                 "batch_size or narrower layers")
        assert not (env / "results").exists()
    assert invoke("run", experiment(env, "name: small\n", "small.yaml"), *FAST).exit_code == 0
    # finished where there was memory enough, its results are still read here
    monkeypatch.setattr(memory, "device_memory", lambda device: None)
    assert invoke("sweep", path, *FAST).exit_code == 0
    monkeypatch.setattr(memory, "device_memory", lambda device: 8 * 2**20)
    again = invoke("sweep", path, *FAST)
    assert again.exit_code == 0 and "0 done, 2 skipped, 0 failed" in again.stdout


def test_a_group_cut_by_the_memory_budget_trains_to_the_numbers_of_one_population(
        env, monkeypatch):
    """Runs that would share a population train in several where it would need more memory
    than a population is given, with the same numbers."""
    from conftest import results_of
    from rich.console import Console

    from bnexp.cli import dry_run
    from bnexp.engine import memory

    monkeypatch.setattr(dry_run, "out_console", Console(width=250))  # rows on one line each
    path = experiment(env, "name: g\ngrid:\n  lr: [0.01, 0.5]\n")
    whole = invoke("sweep", path, "--seeds", "2", *FAST, "--out", "whole")
    assert whole.exit_code == 0, whole.output
    pair = memory.estimate_bytes([RunConfig(experiment="g", steps=40, eval_every=20)],
                                 torch.device("cpu"))
    monkeypatch.setattr(memory, "population_budget", lambda device: pair)
    dry = " ".join(invoke("sweep", path, "--dry-run", "--seeds", "2", *FAST, "--out", "cut")
                   .stdout.split())
    assert "4 run(s) to train in 4 population(s)" in dry
    assert f"1 (2 networks, ~{memory.bytes_text(pair)})" in dry
    cut = invoke("sweep", path, "--seeds", "2", *FAST, "--out", "cut")
    assert cut.exit_code == 0, cut.output
    assert {json.loads(p.read_text())["population_size"]
            for p in (env / "cut").rglob("summary.json")} == {2}, "a pair per population"
    assert results_of(env / "cut") == results_of(env / "whole")


def test_sweep_dry_run_then_sweep_then_skip(env):
    path = experiment(env, "name: g\ngrid:\n  lr: [0.01, 0.5]\n")
    dry = invoke("sweep", path, "--dry-run", *FAST)
    assert dry.exit_code == 0 and dry.stdout.count("would train") == 2
    assert not (env / "results").exists()
    first = invoke("sweep", path, *FAST)
    assert first.exit_code == 0 and "2 done, 0 skipped, 0 failed" in first.stdout
    second = invoke("sweep", path, *FAST, "--seeds", "2")
    assert second.exit_code == 0 and "2 done, 2 skipped, 0 failed" in second.stdout
    table = (env / "results" / "g" / "summary.csv").read_text().splitlines()
    assert len(table) == 1 + 4 * 2


def test_sweep_reports_a_failing_run_and_goes_on(env, monkeypatch):
    """The error, as torch words it (brackets included: no Rich markup), on stderr and in the
    closing table."""
    from rich.console import Console

    from bnexp import sweep
    from bnexp.cli import outcomes

    real = sweep.train_population
    error = "[enforce fail at alloc_cpu.cpp:117] out of memory (simulated)"

    def flaky(runs, *args, **kwargs):
        if runs[0].batch_size == 50:
            raise RuntimeError(error)
        return real(runs, *args, **kwargs)

    monkeypatch.setattr(sweep, "train_population", flaky)
    monkeypatch.setattr(outcomes, "out_console", Console(width=250))
    path = experiment(env, "name: g\ngrid:\n  batch_size: [50, 60]\n")
    result = invoke("sweep", path, *FAST)
    assert result.exit_code == 1
    assert "1 done, 0 skipped, 1 failed" in result.stdout
    assert error in result.stderr
    assert f"RuntimeError: {error}" in result.stdout, result.stdout
    stopped = invoke("sweep", path, *FAST, "--fail-fast", "--set", "lr=0.2")
    assert "0 done, 0 skipped, 1 failed" in stopped.stdout


def test_plot_redraws_from_disk_only(env):
    path = experiment(env, "name: demo\n")
    assert invoke("run", path, *FAST).exit_code == 0
    png = next((env / "results").rglob("curves.png"))
    png.unlink()
    result = invoke("plot", env / "results")
    # the run's curves; the experiment's paper figure (PNG, SVG), overview, seed-band curves
    assert result.exit_code == 0 and "drew 5 figure" in result.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert invoke("plot", env / "nothing-here").exit_code == 2
    before = {p: p.stat().st_mtime_ns for p in (env / "results").rglob("*") if p.is_file()}
    one = invoke("plot", png.parent)  # a run's folder: its figure, nothing outside it
    assert one.exit_code == 0 and "drew 1 figure" in one.stdout
    after = {p: p.stat().st_mtime_ns for p in (env / "results").rglob("*") if p.is_file()}
    assert {p for p in after if after[p] != before.get(p)} == {png}


def test_help_explains_commands():
    result = invoke("--help")
    for command in ("run", "sweep", "validate", "runs", "plot", "report", "bench"):
        assert command in result.stdout
    assert "--install-completion" in result.stdout, "shell completion is offered"
    sweep_help = invoke("sweep", "--help").stdout
    assert "--set KEY=VALUE" in invoke("run", "--help").stdout
    assert "<bool>" not in sweep_help and "--force " in sweep_help, "flags shown as flags"


def test_light_commands_do_not_import_torch(tmp_path):
    """--help, validate and runs start without torch or matplotlib (they cost seconds)."""
    import subprocess
    import sys

    path = tmp_path / "e.yaml"
    path.write_text("name: e\n")
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom bnexp.cli import app\n"
            "r = CliRunner()\n"
            f"for args in (['--help'], ['validate', {str(path)!r}], ['runs', {str(tmp_path)!r}]):\n"
            "    assert r.invoke(app, args).exit_code == 0, args\n"
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_figures_and_reports_do_not_import_torch(env):
    """plot and report read files and draw: torch (about 2 s of their start) stays out."""
    import subprocess
    import sys

    path = experiment(env, "name: g\ngrid:\n  seed: [0, 1]\n")
    assert invoke("sweep", path, *FAST).exit_code == 0
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom bnexp.cli import app\n"
            "r = CliRunner()\n"
            "for args in (['plot', 'results'], ['report', 'results/g']):\n"
            "    assert r.invoke(app, args).exit_code == 0, args\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert (env / "results" / "g" / "report.html").is_file()


def test_tables_keep_their_width_where_no_stream_is_a_terminal(env, monkeypatch):
    """In a log (no terminal anywhere, no $COLUMNS) a run id stays on one line; $COLUMNS still
    decides where it is set."""
    import os
    import subprocess
    import sys

    from bnexp.cli import common

    path = experiment(env, "name: g\ngrid:\n  lr: [0.01, 0.5]\n")
    environ = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-m", "bnexp", "sweep", str(path), "--dry-run", *FAST],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, env=environ)
    assert out.returncode == 0, out.stderr
    assert re.search(r"│ relu-lr0\.01-init[^ ]*-seed0-[0-9a-f]{8} +│", out.stdout), out.stdout
    monkeypatch.setattr(common.os, "isatty", lambda fd: False)
    monkeypatch.delenv("COLUMNS", raising=False)
    assert common._console(stderr=False).width == common.LOG_WIDTH
    monkeypatch.setenv("COLUMNS", "80")
    assert common._console(stderr=False).width == 80


def test_version_threads_and_umask(env):
    import stat

    import bnexp

    version = invoke("--version")
    assert version.exit_code == 0 and version.stdout.strip() == f"bnexp {bnexp.__version__}"
    path = experiment(env, "name: demo\n")
    result = invoke("run", path, *FAST, "--threads", "1")
    assert result.exit_code == 0, result.output
    # Files get what open() would give them, 0666 less the umask (read at import), not 0600.
    from bnexp.files import UMASK
    for name in ("summary.json", "metrics.csv", "config.yaml"):
        mode = stat.S_IMODE(next(env.rglob(name)).stat().st_mode)
        assert mode == 0o666 & ~UMASK, (name, oct(mode))
    assert invoke("run", path, *FAST, "--threads", "0").exit_code == 2


def test_a_resumed_run_says_so_and_unfinished_work_exits_non_zero(env, monkeypatch):
    path = experiment(env, "name: demo\ncheckpoint_every: 20\n")
    assert invoke("run", path, *FAST).exit_code == 0
    folder = next((env / "results" / "demo").glob("*/summary.json")).parent
    (folder / "summary.json").unlink()  # as if killed after its last checkpoint
    again = invoke("run", path, *FAST)
    assert again.exit_code == 0 and "resuming demo/" in again.stderr
    assert "from step 40 of 40" in again.stderr
    config = folder / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.01", "lr: 0.02"))
    mismatch = invoke("run", path, *FAST)
    assert mismatch.exit_code == 1 and "mismatch" in mismatch.stderr


def test_dry_run_shows_the_populations(env, monkeypatch):
    from rich.console import Console

    from bnexp.cli import dry_run

    monkeypatch.setattr(dry_run, "out_console", Console(width=250))  # rows on one line each
    path = experiment(env, "name: g\ngrid:\n  lr: [0.01, 0.5]\n")
    dry = invoke("sweep", path, "--dry-run", "--seeds", "2", *FAST)
    assert dry.exit_code == 0, dry.output
    text = " ".join(dry.stdout.split())
    assert "4 run(s) to train in 1 population(s), 320 network-steps" in text
    assert "no time estimate: no `bnexp bench` record for cpu" in text
    from bnexp.engine import memory
    cpu = torch.device("cpu")
    runs = [RunConfig(experiment="g", lr=lr, seed=seed, steps=40, eval_every=20)
            for lr in (0.01, 0.5) for seed in (0, 1)]
    assert f"1 (8 networks, ~{memory.bytes_text(memory.estimate_bytes(runs, cpu))})" in text
    budget = memory.bytes_text(memory.population_budget(cpu))
    assert f"a population is given on cpu at most {budget}" in text
    bench = env / "results" / "bench"
    bench.mkdir(parents=True)
    rows = [{"engine": "reference", "device": "cpu", "models": 1, "network_steps_per_s": 2.0},
            {"engine": "population", "device": "cpu", "models": 4, "network_steps_per_s": 1.0},
            {"engine": "population", "device": "cpu", "models": 64, "network_steps_per_s": 8.0},
            {"engine": "population", "device": "cuda", "models": 8, "network_steps_per_s": 1e6}]
    (bench / "bench-1.json").write_text(json.dumps({"rows": rows}))
    text = " ".join(invoke("sweep", path, "--dry-run", "--seeds", "2", *FAST).stdout.split())
    # one population of 8 networks x 40 steps at the rate of the nearest size (4, on a log
    # scale): 320 network-steps at 1 per second
    assert "estimated training time: 5 min on cpu" in text and "bench-1.json" in text
    from bnexp import config, experiment_file, sweep
    runs = config.expand_grid(experiment_file.load_spec(path, ["steps=40", "device=cpu"], seeds=2))
    where = sweep.populations(sweep.plan(runs, env / "results"))
    assert sorted(where.values()) == [(1, 8)] * 4  # seeds train together


def test_dry_run_estimates_convnet_runs_at_the_convnet_rate(env):
    path = experiment(env, "name: c\narch: convnet\ngrid:\n  lr: [0.01, 0.5]\n")
    bench = env / "results" / "bench"
    bench.mkdir(parents=True)
    rows = [{"engine": "reference", "device": "cpu", "models": 1, "network_steps_per_s": 2.0},
            {"engine": "population", "device": "cpu", "models": 4, "network_steps_per_s": 1.0}]
    (bench / "bench-1.json").write_text(json.dumps({"rows": rows}))
    text = " ".join(invoke("sweep", path, "--dry-run", *FAST).stdout.split())
    assert "estimated training time: 0 s on cpu" in text, "not at the MLP's rate"
    assert "2 ConvNet run(s) left out: that record has no ConvNet rate" in text
    rows.insert(1, {"engine": "reference", "arch": "convnet", "device": "cpu", "models": 1,
                    "network_steps_per_s": 0.5})
    (bench / "bench-1.json").write_text(json.dumps({"rows": rows}))
    text = " ".join(invoke("sweep", path, "--dry-run", *FAST).stdout.split())
    # 2 runs x 2 networks x 40 steps at 0.5 network-steps/s
    assert "estimated training time: 5 min on cpu" in text and "left out" not in text


def test_a_large_dry_run_has_a_row_per_population(env, monkeypatch):
    """Beyond LISTED_RUNS runs: a row per population to train, one per experiment of the
    reference engine's runs and one per status of the runs to skip; the totals as before."""
    from rich.console import Console

    from bnexp.cli import dry_run
    from bnexp.engine import memory

    path = experiment(env, "name: g\ngrid:\n  lr: [0.01, 0.5]\n")
    manual = experiment(env, "name: m\nbn_impl: manual\ngrid:\n  lr: [0.01, 0.5]\n",
                        "manual.yaml")
    assert invoke("sweep", path, *FAST).exit_code == 0  # seed 0 done
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # pairs of networks train alone
    monkeypatch.setattr(dry_run, "LISTED_RUNS", 5)
    monkeypatch.setattr(dry_run, "out_console", Console(width=200))  # rows on one line each
    dry = invoke("sweep", path, manual, "--dry-run", "--seeds", "2", *FAST)
    assert dry.exit_code == 0, dry.output
    pairs = [RunConfig(experiment="g", lr=lr, seed=1, steps=40, eval_every=20)
             for lr in (0.01, 0.5)]
    size = memory.bytes_text(memory.estimate_bytes(pairs, torch.device("cpu")))
    rows = [" ".join(line.replace("│", " ").split()) for line in dry.stdout.splitlines()
            if line.startswith("│")]
    # in the order of the runs; the reference engine's 4 runs are populations 1 to 4
    assert rows == ["g 2 - - - 160 complete, would skip",
                    f"g 2 cpu population 5 (4 networks, ~{size}) 160 would train",
                    "m 4 cpu reference each alone 320 would train"], dry.stdout
    assert "8 runs (dry run; more than 5: a row per population)" in dry.stdout
    text = " ".join(dry.stdout.split())
    assert "6 run(s) to train in 5 population(s), 480 network-steps" in text
    listed = invoke("sweep", path, "--dry-run", "--seeds", "2", *FAST)  # 4 runs: each listed
    assert listed.stdout.count("would train") == 2
    assert listed.stdout.count("complete, would skip") == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # two pairs at a time
    text = " ".join(invoke("sweep", path, manual, "--dry-run", "--seeds", "2", *FAST)
                    .stdout.replace("│", " ").split())
    assert "m 4 cpu reference in 2, side by side 320 would train" in text
    assert "6 run(s) to train in 3 population(s), 480 network-steps" in text


def test_reference_runs_train_together_where_their_networks_fit_the_threads(env):
    """A network per thread: runs of the reference engine share a call while their networks
    fit the threads and they share data, dtype and steps; on CUDA each trains alone."""
    from bnexp import sweep

    def planned(device="cpu", **kw):
        cfg = RunConfig(**{"experiment": "r", "steps": 40, "eval_every": 20, "device": device,
                           "bn_impl": "manual", "batch_norm": [True], **kw})
        return sweep.Planned(cfg, torch.device(device), "", "new")

    made = [planned(**kw) for kw in (
        {}, {"lr": 0.5}, {"lr": 0.2}, {"steps": 60}, {"lr": 0.3, "seed": 2},
        {"batch_norm": [False, True]}, {"dtype": "float64"}, {"lr": 0.4})]
    made.append(planned(engine="population", bn_impl="torch", batch_norm=[False, True]))
    made += [planned("cuda"), planned("cuda", lr=0.5)]
    for number, p in enumerate(made):
        p.run_id = f"id{number}"

    def ids(threads):
        return [[p.run_id for p, _ in batch]
                for batch in sweep.batches([(p, None) for p in made], threads)]

    assert ids(2) == [["id0", "id1"], ["id2", "id4"], ["id3"], ["id5"], ["id6"], ["id7"],
                      ["id9"], ["id10"], ["id8"]]
    assert ids(4) == [["id0", "id1", "id2", "id4"], ["id3"], ["id5", "id7"], ["id6"],
                      ["id9"], ["id10"], ["id8"]]
    assert ids(1) == [["id0"], ["id1"], ["id2"], ["id3"], ["id4"], ["id5"], ["id6"],
                      ["id7"], ["id9"], ["id10"], ["id8"]]
    where = sweep.populations(made[:3], threads=2)
    assert [where[id(p)] for p in made[:3]] == [(1, 2), (1, 2), (2, 1)]


def test_a_long_sweep_lists_only_the_runs_that_need_attention(env, monkeypatch):
    """Beyond LISTED_RUNS runs the closing table leaves out the done and skipped runs (and
    says how many); a run whose folder holds another config is still listed."""
    from rich.console import Console

    from bnexp.cli import outcomes

    path = experiment(env, "name: g\ngrid:\n  lr: [0.01, 0.5]\n")
    assert invoke("sweep", path, *FAST).exit_code == 0  # seed 0: both done
    edited = next((env / "results" / "g").glob("*lr0.01*")) / "config.yaml"
    edited.write_text(edited.read_text().replace("lr: 0.01", "lr: 0.02"))
    monkeypatch.setattr(outcomes, "LISTED_RUNS", 3)
    monkeypatch.setattr(outcomes, "out_console", Console(width=200))
    result = invoke("sweep", path, "--seeds", "2", *FAST)
    assert result.exit_code == 1, result.output  # the mismatch was not trained
    rows = [" ".join(line.replace("│", " ").split()) for line in result.stdout.splitlines()
            if line.startswith("│")]
    assert len(rows) == 1 and rows[0].startswith("g relu-lr0.01-") and " mismatch " in rows[0]
    text = " ".join(result.stdout.split())
    assert ("2 done and 1 skipped runs not listed (more than 3 runs): `bnexp runs results` "
            "lists every run") in text
    assert "2 done, 1 skipped, 0 failed, 1 mismatch" in text


def test_command_line_problems_are_named_as_such(env):
    path = experiment(env, "name: x\nlr: 0\n")
    other = experiment(env, "name: y\n", "other.yaml")
    result = invoke("sweep", path, other, "--set", "steps=-5", "--set", "grid.seed=[-1]",
                    "--device", "tpu")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert f"error: {path}: lr: Input should be greater than 0" in lines
    assert lines.count("error: --set steps=-5: steps: Input should be greater than 0") == 1
    assert any(line.startswith("error: --set grid.seed=[-1]: grid.seed.0:") for line in lines)
    assert any(line.startswith("error: --device tpu: device:") for line in lines)


def test_sweep_takes_steps_as_run_does(env):
    """--steps N is --set steps=N for every run of every file (a steps axis included), and
    its problems are named as --steps."""
    path = experiment(env, "name: g\ngrid:\n  lr: [0.01, 0.5]\n  steps: [100, 200]\n")
    short = invoke("sweep", path, "--dry-run", "--device", "cpu", "--steps", "30")
    assert short.exit_code == 0, short.output
    text = " ".join(short.stdout.split())
    assert "2 run(s) to train in 1 population(s), 120 network-steps" in text
    result = invoke("sweep", path, "--steps", "0")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --steps 0: steps: Input should be greater than 0"


def test_runs_lists_what_is_on_disk(env):
    path = experiment(env, "name: g\ngrid:\n  lr: [0.01, 0.5]\n  seed: [0, 1]\n")
    assert invoke("sweep", path, *FAST).exit_code == 0
    folders = sorted(p.parent for p in (env / "results" / "g").glob("*/summary.json"))
    assert len(folders) == 4
    # one run stopped part-way (no summary yet), one with a hand-edited config, one failed
    (folders[0] / "summary.json").unlink()
    config = folders[1] / "config.yaml"
    config.write_text(config.read_text().replace("steps: 40", "steps: 41"))
    failed = env / "results" / "g" / "relu-lr9-init0.05-seed0-00000000"
    failed.mkdir()
    (failed / "config.yaml").write_text((folders[2] / "config.yaml").read_text())

    table = invoke("runs", "results")
    assert table.exit_code == 0, table.output
    assert "runs under results: 5" in table.stdout
    listed = list(csv.DictReader(invoke("runs", "results", "--csv").stdout.splitlines()))
    assert len(listed) == 5
    assert {"lr", "seed"} <= set(listed[0]) and "plain_val_acc" in listed[0]
    by_folder = {Path(r["folder"]).name: r for r in listed}
    summary = json.loads((folders[3] / "summary.json").read_text())
    assert by_folder[folders[3].name]["status"] == "done"
    assert by_folder[folders[3].name]["bn_test_acc"] == (
        f"{summary['models']['bn']['final_test_acc']:.4f}")
    assert by_folder[failed.name]["status"] == "mismatch", "its name is not its config's"
    assert by_folder[folders[1].name]["status"] == "mismatch", "edited after training"
    partial = by_folder[folders[0].name]
    assert (partial["status"], partial["step"], partial["bn_test_acc"]) == ("partial", "40", "")
    from bnexp import inventory
    assert inventory.read_row(folders[0]).status_text == "partial at step 40"

    done = invoke("runs", "results", "--csv", "--where", "status=done", "--where", "lr=0.5")
    rows = list(csv.DictReader(done.stdout.splitlines()))
    assert [r["status"] for r in rows] == ["done"] * len(rows) and rows
    assert all(r["run_id"].startswith("relu-lr0.5") for r in rows)
    partial = invoke("runs", "results", "--csv", "--where", "status=partial")
    assert [r["run_id"] for r in csv.DictReader(partial.stdout.splitlines())] == [
        folders[0].name]
    bad = invoke("runs", "results", "--where", "colour=red", "--where", "nonsense",
                 "--where", "status=finished", "--where", "lr=fast",
                 "--where", "activation=rellu")
    assert bad.exit_code == 2
    assert bad.stderr.splitlines() == [
        "error: --where colour=red: colour is not a run setting",
        "error: --where nonsense: expected KEY=VALUE, e.g. --where lr=0.1",
        "error: --where status=finished: a status is one of done, partial, failed, damaged, "
        "mismatch, started",
        "error: --where lr=fast: no run can have it (Input should be a valid number)",
        "error: --where activation=rellu: no run can have it (Input should be 'relu', "
        "'sigmoid', 'tanh', 'elu' or 'leaky_relu')"]


def test_tables_say_what_tells_runs_apart_beyond_their_names(env, monkeypatch):
    """Run names show activation, lr, initial weights, architecture, normaliser, batch size
    and seed; where an experiment's runs differ in anything else, the tables say in what."""
    from rich.console import Console

    from bnexp.cli import common, dry_run, outcomes, train, views

    def cfg(experiment="a", **kw):
        return RunConfig(**{"experiment": experiment, "steps": 40, "eval_every": 20,
                            "device": "cpu", **kw})

    runs = [cfg(bn_impl="manual", dropout=0.5), cfg(), cfg(dtype="float64"),
            cfg(layers=[784, 50, 10]), cfg("b", lr=0.5), cfg("b", lr=0.1, seed=3)]
    assert common.settings_apart(runs) == [
        "layers=[784, 100, 100, 100, 10] bn_impl=manual dropout=0.5 dtype=float32",
        "layers=[784, 100, 100, 100, 10] bn_impl=torch dropout=0.0 dtype=float32",
        "layers=[784, 100, 100, 100, 10] bn_impl=torch dropout=0.0 dtype=float64",
        "layers=[784, 50, 10] bn_impl=torch dropout=0.0 dtype=float32",
        "", ""]  # b's runs differ only in what their names show
    wide = Console(width=250)
    for module in (common, dry_run, outcomes, train):
        monkeypatch.setattr(module, "out_console", wide)
    path = experiment(env, "name: m\nbatch_norm: [true]\ngrid:\n  bn_impl: [torch, manual]\n")
    ran = invoke("run", path, *FAST)
    assert ran.exit_code == 0, ran.output
    rows = [" ".join(line.replace("│", " ").split()) for line in ran.stdout.splitlines()
            if line.startswith("│")]
    assert sorted(row.split()[1:3] for row in rows) == [["bn_impl=manual", "bn"],
                                                        ["bn_impl=torch", "bn"]], ran.stdout
    swept = invoke("sweep", path, *FAST)
    assert "bn_impl=manual skipped already complete" in " ".join(
        swept.stdout.replace("│", " ").split()), swept.stdout
    dry = invoke("sweep", path, *FAST, "--dry-run", "--force")
    text = " ".join(dry.stdout.replace("│", " ").split())
    assert "bn_impl=torch cpu population" in text and "bn_impl=manual cpu reference" in text
    assert "(1 network) 40 would train" in text and "networks)" not in text
    demo = invoke("run", experiment(env, "name: d\n", "d.yaml"), *FAST)
    assert demo.exit_code == 0 and "settings" not in demo.stdout, demo.stdout
    # `runs` over several experiments: one settings column, each experiment's differences
    monkeypatch.setattr(views, "out_console", wide)
    listed = invoke("runs", "results")
    assert listed.exit_code == 0, listed.output
    header = next(line for line in listed.stdout.splitlines() if "experiment" in line)
    assert [c.strip() for c in header.split("┃")[1:-1]] == [
        "experiment", "run", "status", "settings", "plain val/test", "bn val/test"], header
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in listed.stdout.splitlines()
             if line.startswith("│")]
    assert sorted((c[0], c[3]) for c in cells) == [
        ("d", ""), ("m", "bn_impl=manual"), ("m", "bn_impl=torch")]
    one = invoke("runs", "results/m")  # one experiment: a column per setting it varies
    header = next(line for line in one.stdout.splitlines() if "experiment" in line)
    assert [c.strip() for c in header.split("┃")[1:-1]] == [
        "experiment", "run", "status", "bn_impl", "bn val/test"], header


def test_ctrl_c_while_the_command_line_loads_exits_130_without_a_traceback(monkeypatch):
    """The first fifth of a second of every command imports the command line (Typer, Rich,
    the commands); a Ctrl-C there ends it as a Ctrl-C after it does: 130, nothing printed."""
    import builtins

    from bnexp import entry

    real = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "bnexp.cli":
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    try:
        with pytest.raises(SystemExit) as exited:
            entry.main()
    except KeyboardInterrupt:  # not to pytest, which would stop the whole session
        pytest.fail("the Ctrl-C escaped the entry point (Python prints its traceback)")
    assert exited.value.code == 130


def test_ctrl_c_during_torch_import_is_held_until_the_import_is_done(monkeypatch):
    """Inside torch's import a Ctrl-C can be swallowed by its C extension (numpy taken for
    missing, the command then going on) or abort the process from C++; the training
    commands import torch with it held, and raise it once the import is whole."""
    import builtins
    import signal

    from bnexp.cli import common

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    whole, real = [], builtins.__import__

    def importing(name, *args, **kwargs):
        if name == "torch":
            signal.raise_signal(signal.SIGINT)  # in the middle of the import
            whole.append(name)
        return real(name, *args, **kwargs)

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # a worker may ignore it
    try:
        monkeypatch.setattr(builtins, "__import__", importing)
        with pytest.raises(KeyboardInterrupt):  # raised once the import is done, not lost
            common.import_torch()
        assert whole == ["torch"], "the interrupt broke into the import"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "put back"
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGINT, before)


def test_tables_narrower_than_their_rows_keep_every_value_whole():
    """Where a table is wider than the terminal, Rich narrows its widest column first and
    folds the words in it: a report's cell 'batch_size=256' became 'batch_size=2' over '56'.
    add_columns gives each column room for its longest word first, then headers and lines;
    where even the words cannot fit, or the table fits, Rich lays it out as before."""
    from rich.console import Console
    from rich.table import Table

    from bnexp.cli import common
    from bnexp.report import TABLE_HEADER as headers

    rows = [["relu lr=0.05 init=0.05 steps=24 batch_size=256 norm=batch", "3",
             "14.6 [12.0, 16.1]", "65.9 [64.0, 66.2]", "+51.2 [40.1, 60.2]", "100.0%", "0.0%",
             "never", "never"],
            ["relu lr=0.05 init=0.05 steps=47 batch_size=128 norm=layer", "3",
             "21.0 [20.2, 22.4]", "80.4 [79.9, 81.0]", "+59.4 [55.0, 63.3]", "0.0%", "0.0%",
             "never", "1,500"]]
    words = {w for row in rows for cell in row for w in cell.split()}

    def render(width: int, fitted: bool) -> list[str]:
        table = Table()
        if fitted:
            common.add_columns(table, headers, rows, width)
        else:
            for header in headers:
                table.add_column(header, overflow="fold")
            for row in rows:
                table.add_row(*row)
        console = Console(width=width, record=True)
        console.print(table)
        return console.export_text().splitlines()

    def broken(lines: list[str]) -> set[str]:
        pieces = {w for line in lines if line.startswith("│")
                  for cell in line.split("│")[1:-1] for w in cell.split()}
        return pieces - words - {"[", "]"}

    assert broken(render(120, fitted=False)), "Rich alone splits a value here"
    for width in (100, 120, 150, 180):
        lines = render(width, fitted=True)
        assert not broken(lines), (width, broken(lines))
        assert max(map(len, lines)) == width, "the whole width, not beyond it"
    widths = common.column_widths(headers, rows, 100)
    assert widths and sum(widths) + 3 * len(headers) + 1 == 100
    assert all(w >= max(len(word) for row in rows for word in row[i].split())
               for i, w in enumerate(widths))
    assert common.column_widths(headers, rows, 400) is None  # fits: Rich's own layout
    assert common.column_widths(headers, rows, 60) is None  # no room for the words
    assert common.column_widths(["a"], [], 10) is None
    # a run id longer than the room left: it alone folds, beside whole headers where they fit
    runs = [["small_batches", "relu-lr0.05-init0.05-layernorm-bs128-seed0-77cf4289", "done",
             "0.2166 / 0.2104"]]
    run_headers = ["experiment", "run", "status", "plain val/test"]
    widths = common.column_widths(run_headers, runs, 80)
    assert widths == [13, 80 - 13 - 6 - 8 - 13, 6, 8], widths
    assert common.column_widths(run_headers, runs, 53) == [13, 17, 4, 6]  # headers fold
    assert common.column_widths(run_headers, runs, 51) is None  # the id's column under 16


def test_paths_with_brackets_are_printed_as_they_are(env, monkeypatch):
    """A file or folder named like Rich markup ('[ab]', '[old]') is printed whole: Rich took
    it for a style and printed 'ok x.yaml', 'results in res/demo'."""
    from rich.console import Console

    from bnexp.cli import train, views

    wide = Console(width=400)  # each line whole, whatever the terminal
    for module in (train, views):
        monkeypatch.setattr(module, "out_console", wide)
    path = experiment(env, "name: demo\n", "x[ab].yaml")
    assert f"ok {path}: 1 run(s)" in invoke("validate", path).stdout
    out = env / "res[old]"
    ran = invoke("run", path, *FAST, "--out", out)
    assert ran.exit_code == 0 and f"results in {out / 'demo'}" in ran.stdout, ran.stdout
    reported = invoke("report", out / "demo")
    assert f"written {out / 'demo' / 'report.md'}" in reported.stdout, reported.stdout
    assert f"drew 5 figure(s) under {out}" in invoke("plot", out).stdout
