"""The report from a real (tiny) multi-seed sweep: tables, figures, a self-contained page."""

import os
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnexp.cli import app


@pytest.fixture(scope="module")
def experiment(tiny_mnist, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    path = folder / "g.yaml"
    path.write_text("name: g\nsteps: 60\neval_every: 20\ndevice: cpu\n"
                    "grid:\n  lr: [0.05, 0.5]\n")
    result = CliRunner().invoke(app, ["sweep", str(path), "--seeds", "3", "--out",
                                      str(folder / "results"), "--data-dir", str(tiny_mnist)])
    assert result.exit_code == 0, result.output
    return folder / "results" / "g"


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.urls, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in ("img", "meta", "br", "hr", "link", "input"):
            self.stack.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "action") and value:
                self.urls.append(value)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>"
        self.stack.pop()


def test_report_files_and_table(experiment):
    result = CliRunner().invoke(app, ["report", str(experiment)])
    assert result.exit_code == 0, result.output
    md = (experiment / "report.md").read_text()
    assert "| relu lr=0.05 init=0.05 | 3 |" in md and "| relu lr=0.5 init=0.05 | 3 |" in md
    assert "95% CI" in md and "plots/overview.png" in md
    assert (experiment / "plots" / "overview.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((experiment / "plots").glob("curves-*.png"))) == 2
    assert '"torch"' in md
    # the header, the grid's axes, only the settings that matter
    assert "- **runs**: 6 in 2 grid cell(s)" in md
    assert "- **seeds**: 3 (0–2); 3 seeds per cell" in md and "- **steps**: 60 steps" in md
    assert "- **device**: cpu (population engine, eager)" in md
    axes = md.split("Grid axes:")[1].split("```")[1]
    assert "lr: [0.05, 0.5]" in axes
    shared = md.split("Settings shared by every run:")[1].split("```")[1]
    assert "conv_channels" not in shared and "seed:" not in shared and "layers:" in shared
    # every figure has a caption; the paper figure comes first, also as SVG
    figures = md.split("## Figures")[1].split("## Environment")[0]
    assert figures.count("![") == 4 == figures.count("\n*")
    assert figures.index("plots/paper.png") < figures.index("plots/overview.png")
    assert "middle 50% of seeds" in figures
    assert "Validation accuracy during training, one panel per grid cell" in figures
    svg = (experiment / "plots" / "paper.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    from bnexp import cells, report_figures
    grid = cells.collect_cells(experiment)
    drawn = []
    figures = report_figures.captioned_figures(experiment, grid, lambda: drawn.append(1))
    assert len(drawn) == len(figures) == report_figures.figure_count(grid) == 4


def test_several_experiments_get_a_report_each(experiment, tmp_path):
    """One command, several folders: each gets its report; a folder without finished runs is
    an error line after the others are written (exit 2), a missing one before any is."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (experiment / "report.md").unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["report", str(empty), str(experiment)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {empty}: no finished runs to report on"
    assert (experiment / "report.md").is_file() and "comparison over seeds" in result.stdout
    gone = CliRunner().invoke(app, ["report", str(experiment), str(tmp_path / "nowhere")])
    assert gone.exit_code == 2 and gone.stdout == ""
    assert gone.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such experiment folder"


def test_a_results_folder_gets_a_report_per_experiment(experiment, tmp_path):
    """`bnexp report results/`: every experiment folder in it gets its report (folders
    without runs, such as bench/, are passed over); given twice, each is written once."""
    import shutil

    root = tmp_path / "results"
    for name in ("g", "h"):
        shutil.copytree(experiment, root / name)
        (root / name / "report.md").unlink(missing_ok=True)
    (root / "bench").mkdir()
    (root / "bench" / "bench-1.json").write_text("{}")
    result = CliRunner().invoke(app, ["report", str(root), str(root / "h")])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("written ") == 2
    assert all((root / name / "report.md").is_file() for name in ("g", "h"))
    assert not (root / "report.md").exists() and not (root / "bench" / "report.md").exists()


def test_the_environment_is_the_runs(experiment, tmp_path):
    """The report names where its runs trained (their summaries), not the experiment's latest
    writer; runs from two machines give two entries with their counts."""
    import json
    import shutil

    copy = tmp_path / "g"
    shutil.copytree(experiment, copy)
    (copy / "environment.json").write_text(json.dumps({"device": "the latest writer"}))
    summary_path = sorted(copy.glob("*/summary.json"))[0]
    summary = json.loads(summary_path.read_text())
    summary["environment"]["torch"] = "0.0-elsewhere"
    summary_path.write_text(json.dumps(summary))
    assert CliRunner().invoke(app, ["report", str(copy)]).exit_code == 0
    md = (copy / "report.md").read_text()
    env = json.loads(md.split("## Environment")[1].split("```json")[1].split("```")[0])
    assert sorted(e["runs"] for e in env) == [1, 5]
    assert {e["torch"] for e in env if e["runs"] == 1} == {"0.0-elsewhere"}
    assert all(e["device"] == "cpu" for e in env) and "the latest writer" not in md


def test_runs_left_out_of_the_statistics_are_named(experiment, tmp_path):
    """A report over fewer runs than the grid has says so: a run that failed, one stopped
    part-way and one whose files do not read back are counted in its header and on stderr."""
    import json
    import shutil

    copy = tmp_path / "g"
    shutil.copytree(experiment, copy)
    failed, partial, damaged = sorted(copy.glob("*/summary.json"))[:3]
    failed.unlink()
    (failed.parent / "failed.json").write_text(json.dumps({"error": "RuntimeError: boom"}))
    partial.unlink()
    damaged.write_text("{")
    result = CliRunner().invoke(app, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    line = (f"3 run folder(s): 1 damaged, 1 failed, 1 partial (`bnexp runs {copy}` lists "
            "them)")
    assert f"left out of g's statistics: {line}" in " ".join(result.stderr.split())
    md = (copy / "report.md").read_text()
    # the three were lr 0.05's seeds: its whole cell is gone from the table, not from the header
    assert "- **runs**: 3 in 1 grid cell(s)" in md and f"- **left out**: {line}" in md
    assert "left out" in (copy / "report.html").read_text()
    assert CliRunner().invoke(app, ["report", str(experiment)]).exit_code == 0
    assert "left out" not in (experiment / "report.md").read_text(), "only where runs are"
    only_failed = tmp_path / "f" / "g"
    shutil.copytree(failed.parent, only_failed / failed.parent.name)
    none = CliRunner().invoke(app, ["report", str(only_failed)])
    assert none.exit_code == 2 and none.stderr.strip() == (
        f"error: {only_failed}: no finished runs to report on (1 run folder(s): 1 failed "
        f"(`bnexp runs {only_failed}` lists them))")


def test_a_finished_run_whose_config_was_edited_is_left_out(experiment, tmp_path):
    """A run folder whose config.yaml was edited to another valid configuration holds numbers
    that configuration never produced: report and plot leave it out as a mismatch (and say
    how to mend it) rather than count it in the cell the edit points to."""
    import shutil

    copy = tmp_path / "g"
    shutil.copytree(experiment, copy)
    edited = sorted(copy.glob("*lr0.05*/config.yaml"))[0]
    edited.write_text(edited.read_text().replace("lr: 0.05\n", "lr: 0.5\n"))
    result = CliRunner().invoke(app, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert (f"mismatch {edited.parent}: config.yaml does not give this folder's name (edited "
            "after the run?); left out (restore its config.yaml, or delete the folder)") in said
    line = f"1 run folder(s): 1 mismatch (`bnexp runs {copy}` lists them)"
    assert f"left out of g's statistics: {line}" in said
    md = (copy / "report.md").read_text()
    assert "| relu lr=0.05 init=0.05 | 2 |" in md and "| relu lr=0.5 init=0.05 | 3 |" in md
    assert "- **runs**: 5 in 2 grid cell(s)" in md and f"- **left out**: {line}" in md
    plotted = CliRunner().invoke(app, ["plot", str(copy)])
    assert plotted.exit_code == 0 and f"mismatch {edited.parent}" in plotted.stderr


def test_the_interval_is_the_seeds_t_interval(experiment):
    """Each cell's BN − plain entry: the mean of its seeds' paired differences of final test
    accuracy and Student's t interval (two degrees of freedom for three seeds), in points."""
    import json
    import math
    import statistics

    import yaml

    assert CliRunner().invoke(app, ["report", str(experiment)]).exit_code == 0
    md = (experiment / "report.md").read_text()
    diffs: dict[float, list[float]] = {}
    for path in experiment.glob("*/summary.json"):
        models = json.loads(path.read_text())["models"]
        lr = yaml.safe_load((path.parent / "config.yaml").read_text())["lr"]
        diffs.setdefault(lr, []).append(models["bn"]["final_test_acc"]
                                        - models["plain"]["final_test_acc"])
    assert sorted(len(d) for d in diffs.values()) == [3, 3]
    for lr, d in diffs.items():
        mean, half = statistics.fmean(d), 4.302653 * statistics.stdev(d) / math.sqrt(3)
        lo, hi = max(mean - half, -1.0), min(mean + half, 1.0)
        entry = f"{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        row = next(line for line in md.splitlines() if line.startswith(f"| relu lr={lr:g} "))
        assert row.split(" | ")[4] == entry, (row, entry)


def sweep_and_report(name: str, settings: str, tiny_mnist, tmp_path) -> str:
    """report.md of a one-seed sweep of a file with these settings (40 steps)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nsteps: 40\neval_every: 20\ndevice: cpu\n{settings}")
    out = tmp_path / "results"
    assert CliRunner().invoke(app, ["sweep", str(path), "--out", str(out), "--data-dir",
                                    str(tiny_mnist)]).exit_code == 0
    assert CliRunner().invoke(app, ["report", str(out / name)]).exit_code == 0
    return (out / name / "report.md").read_text()


def test_one_seed_prints_no_interval(tiny_mnist, tmp_path, monkeypatch):
    """report.md and the terminal's table alike (where Rich took '[n/a (1 seed)]' for markup
    and dropped it)."""
    from rich.console import Console

    from bnexp.cli import views

    md = sweep_and_report("one", "", tiny_mnist, tmp_path)
    row = next(line for line in md.splitlines() if line.startswith("| relu lr=0.01"))
    assert row.count("[n/a (1 seed)]") == 3, row
    monkeypatch.setattr(views, "out_console", Console(width=250))
    printed = CliRunner().invoke(app, ["report", str(tmp_path / "results" / "one")])
    row = next(line for line in printed.stdout.splitlines() if "relu lr=0.01" in line)
    assert row.count("[n/a (1 seed)]") == 3, printed.stdout
    assert "One seed per cell: no band" in md


def test_curves_on_the_test_split_are_named_so(tiny_mnist, tmp_path):
    md = sweep_and_report("t", "eval_split: test\n", tiny_mnist, tmp_path)
    figures = md.split("## Figures")[1]
    assert "Test accuracy during training, one panel per grid cell" in figures
    assert ": test accuracy during training" in figures
    assert "alidation accuracy" not in figures


def test_html_is_valid_and_self_contained(experiment):
    CliRunner().invoke(app, ["report", str(experiment)])
    page = (experiment / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    parser = Collector()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], "every element is closed"
    assert parser.tags.count("img") == 4 == parser.tags.count("figcaption")
    assert parser.urls and all(u.startswith("data:image/png;base64,") for u in parser.urls)
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_report_without_runs_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no finished runs" in result.stderr


def test_divergence_is_marked_in_seed_bands_and_small_multiples(tmp_path):
    from bnexp import plots

    steps = [0, 10, 20]
    curves = {"plain": [(steps, [0.1, 0.5, 0.6], None), (steps, [0.1, 0.1, 0.1], 20)],
              "bn": [(steps, [0.1, 0.8, 0.9], None), (steps, [0.1, 0.7, 0.9], None)]}
    assert plots.diverged_at({"step": steps, "train_loss": [float("nan"), 1.0, float("inf")]}
                             ) == 20, "a NaN before the first step is no divergence"
    path = plots.plot_seed_bands(curves, "t", tmp_path / "bands.png", "Validation accuracy")
    assert path.read_bytes()[:4] == b"\x89PNG"
    png, svg = plots.plot_small_multiples([("a", curves), ("b", curves)], 2, "t",
                                          tmp_path / "paper", "Validation accuracy")
    assert "first divergence among the seeds" in svg.read_text()
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_run_figures_drawn_in_worker_processes_are_the_same_bytes(experiment, tmp_path,
                                                                   monkeypatch):
    """plot_runs draws a population's figures in spawned workers (two here, whatever the
    machine): the same PNG bytes as drawing them one by one, in order; a pool that breaks
    leaves the rest to be drawn in this process."""
    import hashlib
    import shutil
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from bnexp import plots

    runs = sorted(p.parent for p in experiment.glob("*/summary.json"))
    folders = []
    for i in range(18):
        folders.append(tmp_path / f"run{i:02d}")
        shutil.copytree(runs[i % len(runs)], folders[-1])

    def digests():
        return [hashlib.sha256((f / "curves.png").read_bytes()).hexdigest() for f in folders]

    assert plots.plot_runs(folders) == [f / "curves.png" for f in folders]
    serial = digests()
    for f in folders:
        (f / "curves.png").unlink()
    monkeypatch.setattr(plots, "_cores", lambda: 2)
    drawn = []
    assert plots.plot_runs(folders, parallel=True, on_figure=lambda: drawn.append(1)) == [
        f / "curves.png" for f in folders]
    assert digests() == serial and len(drawn) == 18

    class Breaks:  # draws its first chunk of figures, then its worker dies
        def __init__(self, *args, **kwargs):
            self.chunks = 0

        def submit(self, fn, *args):
            done = Future()
            if self.chunks == 0:
                done.set_result(fn(*args))
            else:
                done.set_exception(BrokenProcessPool("a worker died"))
            self.chunks += 1
            return done

        def shutdown(self, wait=True, cancel_futures=False):
            pass

    for f in folders:
        (f / "curves.png").unlink()
    monkeypatch.setattr(plots, "ProcessPoolExecutor", Breaks)
    assert plots.plot_runs(folders, parallel=True) == [f / "curves.png" for f in folders]
    assert digests() == serial


def test_figure_workers_ignore_stops_from_their_first_instruction(monkeypatch):
    """A terminal's Ctrl-C goes to the whole process group: figure workers start with SIGINT
    and SIGTERM blocked (they printed KeyboardInterrupt tracebacks when it came while they
    imported), then ignore them; the parent's own mask is as it was."""
    import signal

    from bnexp import plots

    monkeypatch.setattr(plots, "_cores", lambda: 2)
    monkeypatch.setattr(plots, "FIGURES_PER_WORKER", 1)
    stops = {signal.SIGINT, signal.SIGTERM}
    masks = plots.draw_all(signal.pthread_sigmask, [(signal.SIG_BLOCK, [])] * 4, parallel=True)
    assert all(stops <= set(mask) for mask in masks), masks
    handlers = plots.draw_all(signal.getsignal, [(s,) for s in stops] * 2, parallel=True)
    assert set(handlers) == {signal.SIG_IGN}
    assert not stops & set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


WORKERS_SCRIPT = """
import faulthandler, os, signal, sys, threading, time
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test's view of a hang
# as started from a terminal: a suite started in the background (`cmd &` in a script) hands
# its processes SIGINT ignored, which Python then keeps
signal.signal(signal.SIGINT, signal.default_int_handler)
def elsewhere():  # a line on stdin: a Ctrl-C that the kernel hands to this thread
    if sys.stdin.readline():
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
threading.Thread(target=elsewhere, daemon=True).start()
from bnexp import plots
plots._cores = lambda: 2
plots.FIGURES_PER_WORKER = 1
print(os.getpid(), flush=True)
plots.draw_all(time.sleep, [(60,)] * 16, parallel=True)  # 4 chunks: 2 workers
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
@pytest.mark.parametrize("stop", ["SIGINT", "SIGINT elsewhere", "SIGKILL"])
def test_figure_workers_go_with_their_parent(stop):
    """Ctrl-C in the parent kills the workers at once (shutting the pool down waited for
    their figures, and could wait for ever), also where the kernel hands it to another
    thread than the main one (the main thread then waited for the next figures, a minute
    here); a parent killed outright takes them with it (they waited on their queue for
    ever)."""
    import signal
    import subprocess
    import time

    parent = subprocess.Popen([sys.executable, "-c", WORKERS_SCRIPT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        pid = int(parent.stdout.readline())
        children = Path(f"/proc/{pid}/task/{pid}/children")
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:  # two workers, started
            time.sleep(0.2)
            workers = [int(c) for c in children.read_text().split()
                       if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")]
        assert len(workers) == 2, workers
        time.sleep(2)  # they draw (sleep) now
        if stop == "SIGINT elsewhere":
            parent.stdin.write("\n")
            parent.stdin.flush()
        else:
            os.kill(pid, getattr(signal, stop))
        try:  # well before the 60 s of each worker's first figure
            parent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGUSR1)  # every thread's stack to its stderr
            time.sleep(1)
            _kill_all(parent, workers)  # they share its stderr: reading waits for them too
            pytest.fail(f"the parent did not stop; its threads:\n{parent.stderr.read()}")
        deadline = time.monotonic() + 10
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(workers)
        if stop != "SIGKILL":
            assert parent.stderr.read().count("Traceback") == 1  # the script's own only
    finally:
        _kill_all(parent, workers)


def _kill_all(parent, workers: list[int]) -> None:
    import signal

    parent.kill()
    for worker in _alive(workers):
        os.kill(worker, signal.SIGKILL)


def _alive(pids: list[int]) -> list[int]:
    """The processes of pids that still run (not zombies)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def test_plot_draws_the_whole_tree_in_one_pool_of_workers(experiment, tmp_path, monkeypatch):
    """`bnexp plot` hands every figure under the folder, the experiments' and the runs', to
    one pool of workers (rather than each experiment's few figures one after another in this
    process): the same PNG bytes as drawn one by one, and the same count."""
    import hashlib
    import shutil
    from concurrent.futures import ProcessPoolExecutor

    from bnexp import plots

    shutil.copytree(experiment, tmp_path / "r" / "g")

    def drawn():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((tmp_path / "r").rglob("*.png"))}

    monkeypatch.setattr(plots, "_cores", lambda: 1)
    serial = CliRunner().invoke(app, ["plot", str(tmp_path / "r")])
    assert serial.exit_code == 0 and "drew 11 figure(s)" in serial.stdout
    one_by_one = drawn()
    assert len(one_by_one) == 10  # 6 runs' curves, paper, overview, 2 cells' seed bands
    for path in one_by_one:
        path.unlink()
    pools = []

    class Recorded(ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append([])

        def submit(self, fn, draw, jobs):
            pools[-1] += [figure.__name__ for figure, _ in jobs]
            return super().submit(fn, draw, jobs)

    monkeypatch.setattr(plots, "_cores", lambda: 2)
    monkeypatch.setattr(plots, "FIGURES_PER_WORKER", 2)
    monkeypatch.setattr(plots, "ProcessPoolExecutor", Recorded)
    pooled = CliRunner().invoke(app, ["plot", str(tmp_path / "r")])
    assert pooled.exit_code == 0 and "drew 11 figure(s)" in pooled.stdout
    assert [sorted(set(pool)) + [len(pool)] for pool in pools] == [
        ["_paper", "plot_overview", "plot_run", "plot_seed_bands", 10]]
    assert drawn() == one_by_one


def test_files_named_passes_over_a_folder_that_vanishes_while_listed(tmp_path, monkeypatch):
    """A running sweep makes and removes a write-test folder in its results folder; `plot`
    walking that folder at the moment must not fail (Path.rglob raised FileNotFoundError)."""
    import os

    from bnexp.files import files_named

    (tmp_path / "e" / "r").mkdir(parents=True)
    (tmp_path / "e" / "r" / "summary.json").write_text("{}")
    vanishing = tmp_path / "e" / ".bnexp-write-test-x"
    vanishing.mkdir()
    real_scandir = os.scandir

    def scandir(path):  # the folder is gone by the time it is opened
        if str(path) == str(vanishing):
            vanishing.rmdir()
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert files_named(tmp_path, "summary.json") == [tmp_path / "e" / "r" / "summary.json"]
