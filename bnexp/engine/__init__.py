"""Training engines: the fused population engine and the plain reference engine."""

from bnexp.engine.common import (
    ModelResult,
    RunResult,
    group_runs,
    resolve_device,
    variant_name,
)
from bnexp.engine.population import train_population
from bnexp.engine.reference import train_reference

__all__ = [
    "ModelResult",
    "RunResult",
    "group_runs",
    "resolve_device",
    "train_population",
    "train_reference",
    "variant_name",
]
