"""A corpus of bad input: each gives exit code 2, one clear line per problem naming the file
and key, no traceback, and leaves everything already in results/ exactly as it was."""

import os
from pathlib import Path

import pytest
from conftest import write_flat_gz_mnist, write_tiny_mnist
from typer.testing import CliRunner

from bnexp.cli import app

CORPUS = sorted((Path(__file__).parent / "malformed").glob("*.yaml"))


def expected_fragment(path: Path) -> str:
    first = path.read_bytes().split(b"\n")[0].decode()
    assert first.startswith("# expect: ")
    return first.removeprefix("# expect: ")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    """A results folder that already holds finished work."""
    out = tmp_path / "results"
    run = out / "earlier" / "relu-lr1-init0.05-seed0-00000000"
    run.mkdir(parents=True)
    (run / "summary.json").write_text('{"models": {}}')
    (run / "config.yaml").write_text("name: earlier\n")
    (out / "README.md").write_text("keep me\n")
    return out


def assert_clean_failure(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
@pytest.mark.parametrize("command", ["run", "sweep", "validate"])
def test_malformed_file(path, command, results_dir, tiny_mnist, monkeypatch):
    monkeypatch.setenv("BNEXP_DATA_DIR", str(tiny_mnist))
    before = snapshot(results_dir)
    args = [command, str(path)] + ([] if command == "validate" else ["--out", str(results_dir)])
    result = CliRunner().invoke(app, args)
    assert_clean_failure(result, str(path), expected_fragment(path))
    assert snapshot(results_dir) == before


GOOD = "name: ok\nsteps: 20\neval_every: 10\ndevice: cpu\n"


def corrupt_data(root: Path) -> Path:
    write_tiny_mnist(root)
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])  # truncated
    return root


def flat_bad_gzip(root: Path) -> Path:
    flat, _ = write_flat_gz_mnist(root)
    (flat / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    return flat


@pytest.mark.parametrize("case", ["missing data", "corrupt data", "broken gzip",
                                  "unwritable results", "missing file", "folder as file",
                                  "bad --set", "bad --set value", "cuda without gpu"])
def test_other_bad_input(case, results_dir, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    experiment = tmp_path / "ok.yaml"
    experiment.write_text(GOOD)
    data = {"missing data": lambda: tmp_path / "no-data-here",
            "corrupt data": lambda: corrupt_data(tmp_path / "corrupt"),
            "broken gzip": lambda: flat_bad_gzip(tmp_path / "gz")}.get(
        case, lambda: write_tiny_mnist(tmp_path / "fine"))()
    out = results_dir
    args = ["run", str(experiment), "--data-dir", str(data)]
    needles = []
    if case in ("missing data", "corrupt data", "broken gzip"):
        needles = ["mnist" if case != "broken gzip" else "train-labels", str(data)]
    elif case == "unwritable results":
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        out = blocker / "results"
        needles = [str(out), "not writable"]
    elif case == "missing file":
        args[1] = str(tmp_path / "nope.yaml")
        needles = ["nope.yaml", "file not found"]
    elif case == "folder as file":
        args[1] = str(tmp_path)
        needles = [str(tmp_path), "is a folder"]
    elif case == "bad --set":
        args += ["--set", "lr"]
        needles = ["--set lr", "KEY=VALUE"]
    elif case == "bad --set value":
        args += ["--set", "batch_size=-1"]
        needles = ["--set batch_size=-1: batch_size:"]  # the command line's problem, not the file's
    elif case == "cuda without gpu":
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        args += ["--device", "cuda"]
        needles = ["device:", "no CUDA GPU"]
    before = snapshot(results_dir)
    result = CliRunner().invoke(app, args + ["--out", str(out)])
    assert_clean_failure(result, *needles)
    assert snapshot(results_dir) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")
def test_a_results_folder_that_cannot_be_made_is_found_before_training(tmp_path, tiny_mnist):
    """/proc passes a permission check (for root, anything does) but takes no folders."""
    experiment = tmp_path / "ok.yaml"
    experiment.write_text(GOOD)
    out = "/proc/bnexp-test/results"
    result = CliRunner().invoke(app, ["run", str(experiment), "--data-dir", str(tiny_mnist),
                                      "--out", out])
    assert_clean_failure(result, out, "not writable", "cannot create anything in /proc")


def fifo(tmp_path: Path) -> str:
    path = tmp_path / "pipe.yaml"
    os.mkfifo(path)
    return str(path)


def big_file(tmp_path: Path) -> str:
    path = tmp_path / "big.yaml"
    path.write_text("name: x\n" + "# padding\n" * 200_000)
    return str(path)


HOSTILE = {
    # case: (file or a function of tmp_path making one, extra arguments, expected fragments)
    "dev zero": ("/dev/zero", [], ["/dev/zero", "not a regular file"]),
    "named pipe": (fifo, [], ["pipe.yaml", "not a regular file"]),
    "huge file": (big_file, [], ["big.yaml", "at most"]),
    "set name escapes": (None, ["--set", "name=.."], ["name:", "plain name"]),
    "set name absolute": (None, ["--set", "name=/tmp/x"], ["name:", "plain name"]),
    "set yaml bomb": (None, ["--set", "lr=!!binary aGk="], ["--set", "not supported"]),
    "steps beside examples": ("examples", ["--steps", "200"], ["examples:", "not both"]),
    "set huge steps": (None, ["--set", "steps=1000000000000"], ["steps:"]),
    "seed near 2^63": (None, ["--seed", "9223372036854775807", "--seeds-placeholder"],
                       ["seed:", "2^63"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_and_command_lines(case, results_dir, tmp_path, tiny_mnist, monkeypatch):
    monkeypatch.setenv("BNEXP_DATA_DIR", str(tiny_mnist))
    source, extra, needles = HOSTILE[case]
    if source is None:
        source = tmp_path / "ok.yaml"
        source.write_text(GOOD)
    elif source == "examples":
        source = tmp_path / "ex.yaml"
        source.write_text("name: ex\nexamples: 3000\ndevice: cpu\n")
    elif callable(source):
        source = source(tmp_path)
    command = "run"
    if "--seeds-placeholder" in extra:  # sweep only: --seeds
        command, extra = "sweep", [e for e in extra if e != "--seeds-placeholder"]
        extra = ["--set", f"seed={extra[1]}", "--seeds", "2"]
    before = snapshot(results_dir)
    result = CliRunner().invoke(app, [command, str(source), *extra, "--out", str(results_dir)])
    assert_clean_failure(result, *needles)
    assert snapshot(results_dir) == before
    assert not (results_dir.parent / "summary.md").exists(), "nothing written above --out"


@pytest.mark.parametrize("seeds, needle", [("2000", "pass --yes"), ("100000", "split the grid"),
                                           ("1000000000000000000", "less than or equal")])
def test_seeds_cannot_bypass_the_grid_guard(seeds, needle, results_dir, tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: g\ngrid:\n  lr: [0.1, 0.2]\n")
    result = CliRunner().invoke(app, ["sweep", str(path), "--seeds", seeds, "--dry-run",
                                      "--out", str(results_dir)])
    assert result.exit_code == 2 and needle in result.output + result.stderr, result.output
    assert "Traceback" not in result.output


def _outcome(text: str, written: bool) -> tuple:
    from bnexp import safe_yaml

    try:
        return ("data", safe_yaml.parse(text, written=written))
    except safe_yaml.YamlError as exc:
        return ("error", str(exc))


@pytest.mark.skipif(not __import__("yaml").__with_libyaml__, reason="PyYAML without libyaml")
def test_files_bnexp_wrote_read_the_same_through_libyaml(tmp_path):
    """config.yaml is read back with libyaml (faster): the corpus and a real config give the
    same data or the same worded error either way, and a real config takes the fast path."""
    from bnexp import results, safe_yaml
    from bnexp.config import RunConfig

    texts = [p.read_text(errors="replace") for p in CORPUS]
    results.write_config(tmp_path, RunConfig(experiment="x", description="a: [b], c - d? {e}"))
    yaml_text = (tmp_path / "config.yaml").read_text()
    texts.append(yaml_text)
    assert safe_yaml._fast(yaml_text)
    fast = sum(safe_yaml._fast(t) for t in texts)
    assert fast >= len(CORPUS) - 5, "the corpus exercises the fast path"
    for text in texts:
        assert _outcome(text, True) == _outcome(text, False), text[:200]


def test_a_deeply_nested_config_is_damaged_not_a_crash(tmp_path):
    """libyaml recurses in C: a config.yaml nested 100,000 deep read back on a thread with a
    small stack is a damaged run, not a segmentation fault."""
    import subprocess
    import sys

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("[" * 100_000 + "]" * 100_000)
    script = (
        "import sys, threading\n"
        "from pathlib import Path\n"
        "from bnexp.readback import DamagedRun, read_config\n"
        "threading.stack_size(256 * 1024)\n"
        "def read():\n"
        "    try:\n"
        "        read_config(Path(sys.argv[1]))\n"
        "    except DamagedRun as exc:\n"
        "        print(exc)\n"
        "t = threading.Thread(target=read)\n"
        "t.start()\n"
        "t.join()\n")
    done = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "config.yaml nested more than 64 levels deep"


@pytest.mark.parametrize("description", [
    "", " leading and trailing ", "a: b # not a comment", "'quoted' \"twice\"", "yes", "1e3",
    "é漢😀 \x85\u2028 line\nbreaks\tand tabs", "{[&anchor *alias !tag ? - |>]}", "x" * 3000,
    ("word: " * 40 + "\\") * 3])
def test_a_config_reads_back_as_written(tmp_path, description):
    """config.yaml (written by libyaml where PyYAML has it) reads back to the run's config
    for odd descriptions, and the shipped experiments' configs are PyYAML's own text."""
    import yaml

    from bnexp import results
    from bnexp.config import RunConfig, expand_grid
    from bnexp.experiment_file import load_spec
    from bnexp.readback import read_config

    run = RunConfig(experiment="x", description=description)
    results.write_config(tmp_path, run)
    assert read_config(tmp_path) == run.model_dump(mode="json")
    if description == "":
        shipped_files = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))
        for path in shipped_files[:6]:
            for shipped in expand_grid(load_spec(path, []))[:3]:
                results.write_config(tmp_path, shipped)
                assert (tmp_path / "config.yaml").read_text() == yaml.safe_dump(
                    shipped.model_dump(mode="json"), sort_keys=False)
