from pathlib import Path

import pytest
from pydantic import ValidationError

from bnexp.config import ConfigError, ExperimentSpec, RunConfig, expand_grid, with_seeds
from bnexp.experiment_file import validate_spec

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_lessons():
    spec = ExperimentSpec(name="x")
    assert spec.layers == (784, 100, 100, 100, 10)
    assert spec.batch_size == 60 and spec.eval_every == 500 and spec.steps == 50_000
    assert spec.batch_norm == (False, True)


def test_grid_is_the_product_and_bn_is_the_pairing():
    spec = validate_spec({"name": "g", "grid": {"lr": [0.01, 1], "activation": ["relu", "sigmoid"],
                                                "batch_norm": [False, True]}}, "mem")
    runs = expand_grid(spec)
    assert len(runs) == 4
    assert {(r.lr, r.activation) for r in runs} == {(0.01, "relu"), (0.01, "sigmoid"),
                                                   (1.0, "relu"), (1.0, "sigmoid")}
    assert all(r.batch_norm == (False, True) for r in runs)


def test_run_id_is_deterministic_and_config_sensitive():
    a = RunConfig(experiment="e", lr=1.0)
    assert a.run_id("cpu") == RunConfig(experiment="e", lr=1.0).run_id("cpu")
    assert a.run_id("cpu") != RunConfig(experiment="e", lr=2.0).run_id("cpu")
    assert a.run_id("cpu") != a.run_id("cuda")
    assert a.run_id("cpu").startswith("relu-lr1-init0.05-seed0-")
    assert a.run_id("cpu") == RunConfig(experiment="e", lr=1.0, checkpoint_every=7).run_id("cpu")


def test_with_seeds_repeats_every_comparison():
    spec = validate_spec({"name": "g", "seed": 3, "grid": {"lr": [1, 2]}}, "mem")
    runs = expand_grid(with_seeds(spec, 3))
    assert sorted((r.lr, r.seed) for r in runs) == [(1, 3), (1, 4), (1, 5), (2, 3), (2, 4), (2, 5)]


def test_bn_needs_two_examples_per_batch():
    with pytest.raises(ConfigError, match="batch_size"):
        validate_spec({"name": "x", "batch_size": 1}, "mem")
    validate_spec({"name": "x", "batch_size": 1, "batch_norm": [False]}, "mem")


def test_options_the_convnet_lacks_are_errors_not_ignored():
    with pytest.raises(ConfigError, match="dropout needs arch mlp"):
        validate_spec({"name": "x", "arch": "convnet", "dropout": 0.5}, "mem")
    validate_spec({"name": "x", "arch": "convnet"}, "mem")


def test_dtype_is_a_result_setting_that_keeps_float32_run_ids():
    from bnexp.config import result_fields_of

    f32 = RunConfig(experiment="x")
    f64 = RunConfig(experiment="x", dtype="float64")
    tf32 = RunConfig(experiment="x", dtype="tf32")
    assert len({f32.run_id("cuda"), f64.run_id("cuda"), tf32.run_id("cuda")}) == 3
    # Folders written before dtype existed hold no dtype key: they still match float32 runs.
    on_disk = {k: v for k, v in f32.model_dump(mode="json").items() if k != "dtype"}
    assert result_fields_of(on_disk) == f32.result_fields()
    assert result_fields_of(f64.model_dump(mode="json")) != f32.result_fields()
    with pytest.raises(ValidationError):
        RunConfig(experiment="x", dtype="float16")
