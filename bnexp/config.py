"""Typed experiment configuration: the settings of a run and of a grid, their checks, and
grid expansion. Reading files and applying overrides: experiment_file.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

ACTIVATIONS = ("relu", "sigmoid", "tanh", "elu", "leaky_relu")
DATASETS = ("mnist", "fashion-mnist")
ENGINES = ("population", "reference")
DEVICES = ("auto", "cpu", "cuda")
GRID_AXES = ("lr", "activation", "init_scale", "init", "batch_norm", "seed", "steps",
             "batch_size", "bn_decay", "bn_scale", "bn_position", "bn_impl", "dropout", "clip",
             "norm", "arch")
# A grid larger than this is almost always a typo (e.g. a range pasted as a list): it needs --yes.
LARGE_GRID_RUNS = 1_000
MAX_RUNS = 100_000  # even with --yes: each run is a folder of files
# Bounds that keep a typo from asking for years of training or terabytes of weights.
MAX_STEPS = 10**8
TRAIN_EXAMPLES = 55_000  # MNIST and Fashion-MNIST: 60,000 training images less 5,000 validation
MAX_WIDTH = 65_536
MAX_PARAMETERS = 50_000_000  # per network
IMAGE_PIXELS, CLASSES = 784, 10
NON_RESULT_FIELDS = ("checkpoint_every", "description")

# Strict: true is not 1 and 1.5 is not a step count (YAML and pydantic would both convert).
PositiveFloat = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
Steps = Annotated[int, Strict(), Field(gt=0, le=MAX_STEPS)]
BatchSize = Annotated[int, Strict(), Field(gt=0, le=TRAIN_EXAMPLES)]
Width = Annotated[int, Strict(), Field(gt=0, le=MAX_WIDTH)]
Flag = Annotated[bool, Strict()]
Seed = Annotated[int, Strict(), Field(ge=0, lt=2**63)]
# A plain folder name: no path separators, no leading dot (so never "." or ".."), short.
PlainName = Annotated[str, Field(min_length=1, max_length=100,
                                 pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
Activation = Literal["relu", "sigmoid", "tanh", "elu", "leaky_relu"]
InitScheme = Literal["normal", "xavier_uniform", "xavier_normal", "he_uniform", "he_normal"]
Decay = Annotated[float, Strict(), Field(gt=0, lt=1)]
DropoutRate = Annotated[float, Strict(), Field(ge=0, lt=1)]
ClipMode = Literal["none", "value", "norm"]
BnPosition = Literal["before", "after"]
Norm = Literal["batch", "layer", "group"]
Arch = Literal["mlp", "convnet"]


class ConfigError(Exception):
    """One or more problems in a configuration; each line names the file and key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class Settings(_Strict):
    """The settings of one comparison; the defaults are the BN lesson's."""

    dataset: Literal["mnist", "fashion-mnist"] = "mnist"
    # mlp: layers below. convnet: two 5x5 conv layers (conv_channels), 2x2 max-pooling after
    # each, one fully connected output layer; its norm acts per channel over batch, H and W.
    arch: Arch = "mlp"
    layers: tuple[Width, ...] = (784, 100, 100, 100, 10)
    conv_channels: tuple[Annotated[Width, Field(le=1024)], Annotated[Width, Field(le=1024)]] = (
        16, 32)
    activation: Activation = "relu"
    lr: PositiveFloat = 0.01
    init: InitScheme = "normal"
    init_scale: PositiveFloat = 0.05  # std of the N(0, init_scale^2) initial weights (normal)
    steps: Steps = 50_000
    # Training length in examples instead of steps (equal data for different batch sizes):
    # when set, steps = ceil(examples / batch_size).
    examples: Annotated[int, Strict(), Field(gt=0, le=MAX_STEPS * 60)] | None = None
    batch_size: BatchSize = 60
    eval_every: Steps = 500
    seed: Seed = 0
    # The variants trained side by side from identical weights and batches.
    batch_norm: tuple[Flag, ...] = Field((False, True), validate_default=True)
    # The normaliser of the "batch_norm: true" variant: batch norm, or the batch-independent
    # layer norm or group norm (group_norm_groups groups) for comparison.
    norm: Norm = "batch"
    group_norm_groups: Width = 10
    bn_decay: Decay = 0.99  # running averages: population = decay * population + (1-decay) * batch
    bn_scale: Flag = True  # learn gamma; false keeps it at 1
    bn_position: BnPosition = "before"  # batch norm before or after the activation
    bn_impl: Literal["torch", "manual"] = "torch"  # reference engine: nn.BatchNorm1d or by hand
    dropout: DropoutRate = 0.0  # after each hidden layer's activation (and BN)
    clip: ClipMode = "none"  # gradient clipping: elementwise by value, or by each model's norm
    clip_threshold: PositiveFloat = 1.0
    # Record the 15/50/85th percentiles of one hidden unit's activation input at every
    # evaluation (the BN paper's Figure 1): unit index in layer track_layer (-1 = last hidden).
    track_unit: Annotated[int, Strict(), Field(ge=0)] | None = None
    track_layer: Annotated[int, Strict()] = Field(-1, validate_default=True)
    eval_split: Literal["validation", "test"] = "validation"  # the split of the curves
    analyses: tuple[Literal["inference_modes"], ...] = ()  # run on the final models
    engine: Literal["population", "reference"] = "population"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Arithmetic of both engines. float64 is for exact comparisons (tests, the reference oracle);
    # float32 is what the lesson and the paper used; tf32 is float32 with matrix products and
    # convolutions in TF32 on the tensor cores of an Ampere or newer GPU (CUDA only).
    dtype: Literal["float32", "float64", "tf32"] = "float32"
    # Save a resumable checkpoint at the first evaluation after every this many steps.
    checkpoint_every: Steps = 5_000

    @field_validator("layers")
    @classmethod
    def _layers_shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) < 2:
            raise ValueError("needs at least an input and an output size, e.g. [784, 100, 10]")
        if v[0] != IMAGE_PIXELS or v[-1] != CLASSES:
            raise ValueError(f"the first size must be {IMAGE_PIXELS} (28x28 images) and the "
                             f"last {CLASSES} (classes), e.g. [784, 100, 10]")
        parameters = sum(a * b + b for a, b in zip(v[:-1], v[1:]))
        if len(v) > 32 or parameters > MAX_PARAMETERS:
            raise ValueError(f"{len(v) - 1} layers with {parameters:,} parameters; at most 31 "
                             f"layers and {MAX_PARAMETERS:,} parameters")
        return v

    @field_validator("track_layer")
    @classmethod
    def _tracked_unit_exists(cls, v: int, info: ValidationInfo) -> int:
        layers, unit = info.data.get("layers"), info.data.get("track_unit")
        if layers is None or unit is None:
            return v
        hidden = layers[1:-1]
        if not -len(hidden) <= v < len(hidden):
            raise ValueError(f"no hidden layer {v}: the network has {len(hidden)}")
        if unit >= hidden[v]:
            raise ValueError(f"track_unit {unit} is not below the layer's width {hidden[v]}")
        return v

    @field_validator("batch_norm", mode="before")
    @classmethod
    def _bn_list(cls, v: Any) -> Any:
        if isinstance(v, bool):
            return (v,)
        if isinstance(v, (list, tuple)):
            if not v:
                raise ValueError("needs at least one of false, true")
        return v

    @field_validator("batch_norm")
    @classmethod
    def _bn_batch(cls, v: tuple[bool, ...], info: ValidationInfo) -> tuple[bool, ...]:
        if len(set(v)) != len(v):  # booleans by now: any YAML value could be unhashable
            raise ValueError("lists a variant twice")
        if True in v and info.data.get("batch_size", 2) < 2:
            raise ValueError("batch norm needs batch_size of at least 2")
        return v


def steps_for(examples: int, batch_size: int) -> int:
    """The steps that see examples at batch_size: ceil(examples / batch_size)."""
    return -(-examples // batch_size)


def _derive_steps(data: Any) -> Any:
    """examples -> steps, before validation (steps then holds the derived value)."""
    if isinstance(data, dict) and isinstance(data.get("examples"), int) and isinstance(
            data.get("batch_size", 60), int) and data.get("batch_size", 60) > 0:
        data = {**data, "steps": steps_for(data["examples"], data.get("batch_size", 60))}
    return data


class RunConfig(Settings):
    """One fully resolved comparison: the unit that gets a results folder."""

    experiment: PlainName
    description: str = ""  # the experiment file's, kept for reports (not a result setting)

    @model_validator(mode="before")
    @classmethod
    def _steps_from_examples(cls, data: Any) -> Any:
        return _derive_steps(data)

    @model_validator(mode="after")
    def _arch_options(self) -> RunConfig:
        problems = []
        if self.arch == "convnet":
            if self.layers[0] != 784 or self.layers[-1] != 10:
                problems.append("arch convnet reads 28x28 images into 10 classes")
            if self.track_unit is not None or self.analyses:
                problems.append("track_unit and analyses need arch mlp")
            if self.dropout:
                problems.append("dropout needs arch mlp (the ConvNet has no dropout)")
        if self.norm == "group" and True in self.batch_norm:
            widths = self.layers[1:-1] if self.arch == "mlp" else self.conv_channels
            if any(w % self.group_norm_groups for w in widths):
                problems.append(f"group_norm_groups {self.group_norm_groups} must divide "
                                f"every width {list(widths)}")
            elif self.arch == "mlp" and any(w == self.group_norm_groups for w in widths):
                problems.append(f"group_norm_groups {self.group_norm_groups} puts one unit in "
                                f"each group of a layer {self.group_norm_groups} wide, which "
                                "normalises to 0 whatever the input; use fewer groups")
        if (self.norm == "layer" and True in self.batch_norm and self.arch == "mlp"
                and 1 in self.layers[1:-1]):
            problems.append("layer norm of a hidden layer 1 unit wide normalises it to 0 "
                            "whatever the input; widen the layer or use norm batch")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def result_fields(self) -> dict:
        """The resolved settings that can change results (what run_id and reuse depend on)."""
        return result_fields_of(self.model_dump(mode="json"))

    def run_id(self, device: str) -> str:
        """Deterministic folder name: readable prefix plus a hash of the resolved config."""
        payload = self.result_fields()
        payload["device"] = device
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]
        init = f"init{self.init_scale:g}" if self.init == "normal" else self.init
        extra = "".join([f"-{self.arch}" if self.arch != "mlp" else "",
                         f"-{self.norm}norm" if self.norm != "batch" else "",
                         f"-bs{self.batch_size}" if self.batch_size != 60 else ""])
        return f"{self.activation}-lr{self.lr:g}-{init}{extra}-seed{self.seed}-{digest}"


class GridAxes(_Strict):
    lr: list[PositiveFloat] | None = None
    activation: list[Activation] | None = None
    init_scale: list[PositiveFloat] | None = None
    init: list[InitScheme] | None = None
    batch_norm: list[Flag] | None = None
    seed: list[Seed] | None = None
    steps: list[Steps] | None = None
    batch_size: list[BatchSize] | None = None
    bn_decay: list[Decay] | None = None
    bn_scale: list[Flag] | None = None
    bn_position: list[BnPosition] | None = None
    bn_impl: list[Literal["torch", "manual"]] | None = None
    dropout: list[DropoutRate] | None = None
    clip: list[ClipMode] | None = None
    norm: list[Norm] | None = None
    arch: list[Arch] | None = None

    @field_validator("*")
    @classmethod
    def _non_empty(cls, v: list | None) -> list | None:
        if v is not None and not v:
            raise ValueError("an axis needs at least one value")
        if v is not None and len(set(v)) != len(v):
            raise ValueError("lists a value twice")
        return v


class ExperimentSpec(Settings):
    """A YAML file: a name, base settings and an optional grid over some of them."""

    name: PlainName  # the results folder: results/<name>/
    description: str = ""
    grid: GridAxes = GridAxes()


def format_loc(loc: tuple) -> str:
    """A validation error's location as a key path, e.g. grid.lr.1 ('(top level)' if none)."""
    return ".".join(str(p) for p in loc) if loc else "(top level)"


def setting_problem(key: str, value: object) -> str | None:
    """Why value can never be a run's setting key (None if it can be one)."""
    field = RunConfig.model_fields[key]
    kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    try:
        TypeAdapter(kind).validate_python(value)
    except ValidationError as exc:
        return exc.errors()[0]["msg"]
    return None


def result_fields_of(config: dict) -> dict:
    """The entries of a resolved config (as a plain mapping) that can change results."""
    out = {k: v for k, v in config.items() if k not in NON_RESULT_FIELDS}
    if out.get("dtype") == "float32":  # the default: run_ids from before dtype existed stay valid
        del out["dtype"]
    return out


def grid_size(spec: ExperimentSpec) -> int:
    size = 1
    for axis in GRID_AXES:
        values = getattr(spec.grid, axis)
        if values is not None and axis != "batch_norm":
            size *= len(values)
    return size


def expand_grid(spec: ExperimentSpec) -> list[RunConfig]:
    """The runs of an experiment: the product of its grid axes over its base settings.

    The batch_norm axis does not multiply runs: its values are the paired variants trained
    inside every run from the same initial weights and mini-batches.
    """
    base = spec.model_dump(exclude={"name", "grid"})
    if spec.grid.batch_norm is not None:
        base["batch_norm"] = tuple(spec.grid.batch_norm)
    axes = [a for a in GRID_AXES if a != "batch_norm" and getattr(spec.grid, a) is not None]
    runs = []
    for values in itertools.product(*(getattr(spec.grid, a) for a in axes)):
        runs.append(RunConfig(**{**base, **dict(zip(axes, values))}, experiment=spec.name))
    return runs


def with_seeds(spec: ExperimentSpec, n: int) -> ExperimentSpec:
    """Repeat every comparison with n seeds, counting up from the spec's base seed."""
    grid = spec.grid.model_copy(update={"seed": list(range(spec.seed, spec.seed + n))})
    return spec.model_copy(update={"grid": grid})
