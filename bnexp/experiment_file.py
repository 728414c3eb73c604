"""Experiment files: YAML read (bounded, see safe_yaml), `--set` overrides applied, and the
result validated into an ExperimentSpec with every problem reported at once.

Precedence is defaults -> YAML -> ``--set key=value`` overrides. Every problem found in a
file is collected and reported together, each with the file (or the override) and the key it
concerns.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bnexp import safe_yaml
from bnexp.config import (
    LARGE_GRID_RUNS,
    MAX_RUNS,
    ConfigError,
    ExperimentSpec,
    GridAxes,
    RunConfig,
    expand_grid,
    format_loc,
    grid_size,
    steps_for,
    with_seeds,
)


def _format_error(source: str, err: dict) -> str:
    loc = format_loc(err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "literal_error":
        msg = f"{msg}, got {err['input']!r}"
    elif err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif err["type"] == "model_type":
        msg = "expected a mapping of keys to values"
    elif err["type"] == "string_pattern_mismatch":
        msg = ("must be a plain name of letters, digits, '_', '.' and '-' that starts with a "
               f"letter or digit, got {err['input']!r}")
    key = err["loc"][0] if len(err["loc"]) == 1 else None
    if (isinstance(err.get("input"), list) and key in GridAxes.model_fields
            and typing.get_origin(ExperimentSpec.model_fields[key].annotation) is not tuple):
        msg += f" (to compare several values, list them under grid:, e.g. grid: {{{key}: [...]}})"
    return f"{source}: {loc}: {msg}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {text}: expected KEY=VALUE, e.g. --set lr=0.5"])
    try:
        value = safe_yaml.parse(raw) if raw.strip() else None
    except safe_yaml.YamlError as exc:
        raise ConfigError([f"--set {text}: {exc}"]) from None
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of raw with each `a.b=value` override applied."""
    out = json.loads(json.dumps(raw))
    parsed = [parse_override(text) for text in overrides]
    set_steps = any(path in (["steps"], ["grid", "steps"]) for path, _ in parsed)
    for path, value in parsed:
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
        # A base value given on the command line wins over a grid axis of the same name.
        if len(path) == 1 and isinstance(out.get("grid"), dict):
            out["grid"].pop(path[0], None)
        # examples on the command line replace the file's steps (it sets them); steps on the
        # command line beside the file's examples stay an error: that file fixes a budget.
        if path == ["examples"] and value is not None and not set_steps:
            out.pop("steps", None)
            if isinstance(out.get("grid"), dict):
                out["grid"].pop("steps", None)
    return out


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping of plain values (bounded; see safe_yaml), every failure a one-line
    ConfigError."""
    try:
        data = safe_yaml.parse(safe_yaml.read_text(path))
    except safe_yaml.YamlError as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: (top level): expected a mapping of keys to values"])
    return data


def _conflicts(raw: dict, source: str) -> list[str]:
    """Settings that contradict each other before validation can see them."""
    grid = raw.get("grid") if isinstance(raw.get("grid"), dict) else {}
    if raw.get("examples") is not None and ("steps" in raw or "steps" in grid):
        return [f"{source}: examples: sets steps to ceil(examples / batch_size); give steps "
                "or examples, not both (on the command line, --set examples=N replaces a "
                "file's steps)"]
    return []


def _origin(loc: tuple, source: str, origins: list[tuple[tuple, str]]) -> str:
    """Where a value came from: the command-line override that set it, else the file."""
    where = tuple(str(p) for p in loc)
    for path, label in reversed(origins):  # the last override of a key is the one in force
        # the override set that key, or something inside it (--set lr.x=5 makes lr a mapping)
        if where[:len(path)] == path or (where and path[:len(where)] == where):
            return label
    return source


def validate_spec(raw: dict, source: str, allow_large: bool = False, seeds: int | None = None,
                  origins: list[tuple[tuple, str]] = ()) -> ExperimentSpec:
    """Validate a raw mapping (with seeds: repeated over that many seeds), raising ConfigError
    with every problem at once. origins names the command-line overrides, (key path, label),
    so that their problems are reported as theirs, not the file's."""
    problems = _conflicts(raw, source)
    origins = list(origins)

    def formatted(errors: list) -> list[str]:
        return [_format_error(_origin(e["loc"], source, origins), e) for e in errors]

    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(problems + formatted(exc.errors())) from None
    if problems:
        raise ConfigError(problems)
    n = grid_size(spec)
    if seeds is not None:  # checked before the seed list is built: --seeds may be huge
        n = n // len(spec.grid.seed or [0]) * seeds
        if spec.seed + seeds > 2**63:
            raise ConfigError([f"{source}: seed: {spec.seed} + --seeds {seeds} passes 2^63"])
    if n > MAX_RUNS:
        raise ConfigError([f"{source}: grid: {n:,} runs is more than {MAX_RUNS:,}; "
                           "split the grid"])
    if n > LARGE_GRID_RUNS and not allow_large:
        raise ConfigError([f"{source}: grid: {n:,} runs is more than {LARGE_GRID_RUNS:,}; "
                           f"pass --yes to run up to {MAX_RUNS:,}"])
    if seeds is not None:
        spec = with_seeds(spec, seeds)
    try:  # combinations of valid values can still be invalid together
        expand_grid(spec)
    except ValidationError as exc:
        raise ConfigError(sorted(set(formatted(exc.errors())))) from None
    return spec


def load_spec(path: Path, overrides: list[str] = (), allow_large: bool = False,
              seeds: int | None = None, labels: dict[str, str] | None = None,
              ) -> ExperimentSpec:
    """Read, override and validate one experiment file (repeated over seeds where given).

    labels names overrides that came from options other than --set ("steps=5" -> "--steps 5").
    """
    file = read_yaml(path)
    paths = [tuple(parse_override(text)[0]) for text in overrides]
    raw = follow_shortened_steps(file, apply_overrides(file, list(overrides)), paths)
    origins = [(key, (labels or {}).get(text, f"--set {text}"))
               for key, text in zip(paths, overrides)]
    return validate_spec(raw, str(path), allow_large, seeds, origins)


# A run shortened on the command line is evaluated at least this many times (when neither the
# file nor an override sets eval_every): 300 steps at the default 500 would give two points.
MIN_EVALUATIONS = 10


def follow_shortened_steps(file: dict, raw: dict, overridden: list[tuple[str, ...]]) -> dict:
    """raw with eval_every = min(default, ceil(steps / MIN_EVALUATIONS)) where an override
    (overridden: the key paths they set) set the base steps, or examples (steps then counted
    at the largest batch size), and nothing set eval_every."""
    steps = raw.get("steps")
    if ("examples",) in overridden and type(raw.get("examples")) is int:
        steps = _fewest_steps(raw)
    shortened = ("steps",) in overridden or ("examples",) in overridden
    explicit = ("eval_every",) in overridden or (
        "eval_every" in file
        or (isinstance(file.get("grid"), dict) and "eval_every" in file["grid"]))
    if not shortened or explicit or type(steps) is not int or steps < 1:
        return raw
    default = RunConfig.model_fields["eval_every"].default
    return {**raw, "eval_every": min(default, -(-steps // MIN_EVALUATIONS))}


def _fewest_steps(raw: dict) -> int | None:
    """ceil(examples / batch_size) at the largest batch size raw gives (None if unclear)."""
    grid = raw.get("grid") if isinstance(raw.get("grid"), dict) else {}
    sizes = grid.get("batch_size", [raw.get("batch_size", RunConfig.model_fields["batch_size"]
                                             .default)])
    if not isinstance(sizes, list) or not sizes or any(type(b) is not int or b < 1
                                                       for b in sizes):
        return None
    return steps_for(raw["examples"], max(sizes))
