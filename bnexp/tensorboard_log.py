"""TensorBoard event files beside a run's metrics (the optional `tensorboard` extra).

Each run folder gets `tb/`: one TensorBoard run with a scalar per model and metric
(`plain/val_acc`, `bn/train_loss`, ...) at every evaluation, and the run's settings in the
HParams view, so `tensorboard --logdir results` compares a whole sweep. A resumed or
retrained run discards its earlier events (purge from step 0) and writes its rows again,
so TensorBoard never shows a step twice.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from bnexp.config import RunConfig

INSTALL_HINT = "pip install 'bnexp[tensorboard]'"
METRICS = ("val_acc", "train_acc", "train_loss")


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def hparams_of(run: RunConfig) -> dict[str, float | str | bool]:
    """The run's settings that TensorBoard's HParams view can show (plain scalars)."""
    out: dict[str, float | str | bool] = {}
    for key, value in run.model_dump(mode="json").items():
        if isinstance(value, bool | int | float | str) and key != "description":
            out[key] = value
        elif isinstance(value, list) and key == "batch_norm":
            out[key] = ",".join(str(v).lower() for v in value)
    return out


class RunLog:
    """Live TensorBoard scalars of one run; log(models) after every evaluation."""

    def __init__(self, folder: Path, run: RunConfig):
        self.folder, self.run = folder, run
        self._writer = None
        self._written: dict[str, int] = {}  # model -> rows already written

    def log(self, models) -> None:
        if self._writer is None:
            self._open(models)
        for model in models:
            start = self._written.get(model.name, 0)
            for i in range(start, len(model.steps)):
                for metric in METRICS:
                    value = getattr(model, metric)[i]
                    if not math.isnan(value):
                        self._writer.add_scalar(f"{model.name}/{metric}", value, model.steps[i])
            self._written[model.name] = len(model.steps)
        self._writer.flush()

    def _open(self, models) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step 0: events of an earlier, interrupted or replaced attempt are discarded
        self._writer = SummaryWriter(str(self.folder / "tb"), purge_step=0)
        metrics = {f"{m.name}/{metric}": math.nan for m in models for metric in METRICS}
        for summary in hparams(hparams_of(self.run), metrics):
            self._writer.file_writer.add_summary(summary)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
