"""TensorBoard output, read back with TensorBoard's own event reader."""

import csv

import pytest
from typer.testing import CliRunner

from bnexp.cli import app

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

FAST = ["--set", "steps=40", "--set", "eval_every=20", "--device", "cpu"]


def read_events(folder):
    events = EventAccumulator(str(folder / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return events


def test_tensorboard_scalars_and_hparams_match_the_metrics(tiny_mnist, monkeypatch, tmp_path):
    monkeypatch.setenv("BNEXP_DATA_DIR", str(tiny_mnist))
    path = tmp_path / "e.yaml"
    path.write_text("name: tb\nlr: 0.3\ngrid:\n  activation: [relu, sigmoid]\n")
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["sweep", str(path), "--out", str(out), "--tensorboard",
                                      *FAST])
    assert result.exit_code == 0, result.output
    folders = sorted(p.parent for p in out.glob("tb/*/summary.json"))
    assert len(folders) == 2
    for folder in folders:
        events = read_events(folder)
        tags = set(events.Tags()["scalars"])
        assert {"plain/val_acc", "bn/val_acc", "bn/train_acc", "plain/train_loss"} <= tags
        with open(folder / "metrics.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["model"] == "bn"]
        scalars = events.Scalars("bn/val_acc")
        assert [s.step for s in scalars] == [int(r["step"]) for r in rows] == [0, 20, 40]
        assert [round(s.value, 6) for s in scalars] == [round(float(r["val_acc"]), 6)
                                                         for r in rows]
        loss = events.Scalars("bn/train_loss")
        assert [s.step for s in loss] == [20, 40], "no loss before the first step"
        content = events.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/session_start_info"]).session_start_info
        assert start.hparams["lr"].number_value == 0.3
        assert start.hparams["activation"].string_value in ("relu", "sigmoid")
        experiment = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/experiment"]).experiment
        assert "bn/val_acc" in {m.name.tag for m in experiment.metric_infos}
    # retraining replaces the events: every step shows once
    again = CliRunner().invoke(app, ["sweep", str(path), "--out", str(out), "--tensorboard",
                                     "--force", *FAST])
    assert again.exit_code == 0, again.output
    steps = [s.step for s in read_events(folders[0]).Scalars("plain/val_acc")]
    assert steps == [0, 20, 40]


def test_tensorboard_without_the_package_is_a_clear_error(monkeypatch, tmp_path):
    from bnexp import tensorboard_log

    monkeypatch.setattr(tensorboard_log, "available", lambda: False)
    path = tmp_path / "e.yaml"
    path.write_text("name: tb\n")
    result = CliRunner().invoke(app, ["run", str(path), "--tensorboard", *FAST])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: --tensorboard: the tensorboard package is not "
                                     "installed (pip install 'bnexp[tensorboard]')")
