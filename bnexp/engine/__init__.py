"""Training engines: the fused population engine and the plain reference engine."""

from bnexp.engine.common import (
    ModelResult,
    RunResult,
    group_runs,
    resolve_device,
    variant_name,
)
from bnexp.engine.population import population_can_train, train_population
from bnexp.engine.reference import together_key, train_reference, train_references


def effective_engine(run) -> str:
    """The engine a run trains on: the population engine where it can express the run."""
    if run.engine == "population" and population_can_train(run):
        return "population"
    return "reference"


__all__ = [
    "ModelResult",
    "RunResult",
    "effective_engine",
    "group_runs",
    "resolve_device",
    "together_key",
    "train_population",
    "train_reference",
    "train_references",
    "variant_name",
]
