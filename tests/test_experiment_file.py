from pathlib import Path

import pytest

from bnexp.config import ConfigError, expand_grid
from bnexp.experiment_file import apply_overrides, load_spec, validate_spec

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_shipped_experiment_validates(path: Path):
    spec = load_spec(path)
    assert expand_grid(spec)
    assert path.read_text().startswith("# bnexp "), "each file opens with the command that runs it"
    assert spec.name == path.stem


def test_all_problems_reported_at_once_with_file_and_key(tmp_path):
    path = write(tmp_path, "name: x\nlr: -1\nactivation: swish\nstepz: 5\nbatch_size: 0\n")
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    problems = info.value.problems
    assert len(problems) == 4
    text = "\n".join(problems)
    for key in ("lr", "activation", "stepz", "batch_size"):
        assert f"{path}: {key}:" in text
    assert "unknown key" in text and "swish" in text


def test_grid_errors_name_the_axis(tmp_path):
    path = write(tmp_path, "name: x\ngrid:\n  lr: [0.1, 0]\n  colour: [red]\n  seed: []\n")
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    text = "\n".join(info.value.problems)
    assert "grid.lr.1:" in text and "grid.colour: unknown key" in text and "grid.seed:" in text


@pytest.mark.parametrize("text, fragment", [
    ("name: x\nlr: [1\n", "invalid YAML at line"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("lr: 1\n", "name: Field required"),
    ("name: x\nsteps: 1.5\n", "steps:"),
    ("name: x\nlayers: [784]\n", "layers:"),
    ("name: x\nbatch_norm: []\n", "batch_norm:"),
    ("name: 'a b'\n", "name:"),
    ("name: x\nlr: .nan\n", "lr:"),
])
def test_bad_files_give_clear_errors(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as info:
        load_spec(write(tmp_path, text))
    assert fragment in str(info.value)
    assert all(line.startswith(str(tmp_path)) for line in info.value.problems)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_grid_limit():
    raw = {"name": "g", "grid": {"lr": [i + 1 for i in range(200)], "seed": list(range(100))}}
    with pytest.raises(ConfigError, match="pass --yes"):
        validate_spec(raw, "mem")
    assert len(expand_grid(validate_spec(raw, "mem", allow_large=True))) == 20_000


def test_overrides_take_precedence_and_replace_grid_axes():
    raw = {"name": "g", "lr": 1, "grid": {"steps": [10, 20], "seed": [1, 2]}}
    out = apply_overrides(raw, ["lr=0.5", "steps=7", "grid.seed=[3]"])
    assert out["lr"] == 0.5 and out["grid"] == {"seed": [3]} and out["steps"] == 7
    assert raw["lr"] == 1, "the input mapping is not modified"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(raw, ["lr"])


def test_eval_every_follows_steps_shortened_on_the_command_line(tmp_path):
    """300 steps at the default eval_every of 500 would draw two points as a 'curve'."""
    plain = write(tmp_path, "name: e\nsteps: 50000\n")
    assert load_spec(plain, ["steps=300"]).eval_every == 30
    assert load_spec(plain, ["steps=7"]).eval_every == 1
    assert load_spec(plain, ["steps=20000"]).eval_every == 500, "never coarser than the default"
    assert load_spec(plain, []).eval_every == 500
    assert load_spec(plain, ["steps=300", "eval_every=100"]).eval_every == 100
    explicit = write(tmp_path, "name: e\nsteps: 50000\neval_every: 250\n")
    assert load_spec(explicit, ["steps=300"]).eval_every == 250, "the file's choice stands"
    examples = write(tmp_path, "name: e\nsteps: 50000\ngrid:\n  batch_size: [10, 100]\n")
    runs = expand_grid(load_spec(examples, ["examples=3000"]))
    assert [(r.steps, r.eval_every) for r in runs] == [(300, 3), (30, 3)], (
        "examples given on the command line shorten too: counted at the largest batch")


def test_examples_on_the_command_line_replace_the_files_steps(tmp_path):
    """--set examples=N switches a file that gives steps (a base value and an axis) to an
    examples budget; steps set on the command line too, or a file's examples beside --steps,
    stay an error."""
    path = write(tmp_path, "name: x\nsteps: 500\nbatch_size: 60\ngrid:\n  steps: [100, 200]\n"
                           "  lr: [0.1, 1]\n")
    runs = expand_grid(load_spec(path, ["examples=3000"]))
    assert [(r.lr, r.steps, r.examples) for r in runs] == [(0.1, 50, 3000), (1.0, 50, 3000)]
    for overrides in (["examples=3000", "steps=10"], ["steps=10", "examples=3000"],
                      ["grid.steps=[1, 2]", "examples=3000"]):
        with pytest.raises(ConfigError, match="not both"):
            load_spec(path, overrides)
    budget = write(tmp_path, "name: x\nexamples: 3000\n")
    with pytest.raises(ConfigError, match="not both"):
        load_spec(budget, ["steps=10"])


def test_a_list_outside_grid_is_pointed_to_grid_where_a_list_cannot_go(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_spec(write(tmp_path, "name: x\nlr: [0.1, 1]\n"))
    assert info.value.problems == [f"{tmp_path / 'exp.yaml'}: lr: Input should be a valid number "
                                   "(to compare several values, list them under grid:, e.g. "
                                   "grid: {lr: [...]})"]
    with pytest.raises(ConfigError) as info:  # batch_norm takes its list at the top level
        load_spec(write(tmp_path, "name: x\nbatch_size: 1\nbatch_norm: [false, true]\n"))
    assert "under grid:" not in " ".join(info.value.problems)


def test_an_override_that_reshapes_a_key_is_named_as_the_problem(tmp_path):
    path = write(tmp_path, "name: x\nlr: 1\nnorm: group\ngroup_norm_groups: 7\n")
    with pytest.raises(ConfigError) as info:
        load_spec(path, ["lr.x=5", "grid=5"])
    assert sorted(info.value.problems) == [
        "--set grid=5: grid: expected a mapping of keys to values",
        "--set lr.x=5: lr: Input should be a valid number",
    ]
    with pytest.raises(ConfigError) as info:  # a problem of the whole file stays the file's
        load_spec(path, ["lr=0.5"])
    assert info.value.problems == [f"{path}: (top level): group_norm_groups 7 must divide "
                                   "every width [100, 100, 100]"]
