"""Reading YAML from people and from disk without letting it crash or exhaust the machine.

PyYAML's safe loader still builds dates, bytes and sets, reads `yes`/`on` as true, keeps the
last of two equal keys, lets aliases expand a small file into billions of values or into a
structure that contains itself, and recurses once per level of nesting. Configs here need
none of that: mappings, lists, strings, numbers, true/false and null, within fixed bounds.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 1 << 20  # an experiment file is a few hundred bytes
MAX_VALUES = 100_000  # values after alias expansion (a billion-laughs file stops here)
MAX_DEPTH = 64  # nesting levels
MAX_INT_DIGITS = 30  # well past any step count or seed; Python refuses to parse 4,300


class YamlError(Exception):
    """A problem with a YAML text, worded for the user (without the file name)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader for plain data: YAML 1.2 booleans, no timestamps, no exotic tags."""


# Implicit types: drop timestamps (a date stays text) and YAML 1.1's yes/no/on/off booleans.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:bool")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _unsupported(loader: _Loader, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None, None, f"the tag {node.tag} is not supported here (plain values only)",
        node.start_mark)


for _tag in ("timestamp", "binary", "set", "omap", "pairs"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _unsupported)
_Loader.add_constructor(None, _unsupported)  # any unknown tag, e.g. !!python/object


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    digits = sum(c.isdigit() for c in node.value)
    if digits > MAX_INT_DIGITS:
        raise yaml.constructor.ConstructorError(
            None, None, f"an integer of {digits} digits is too large", node.start_mark)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: later keys may override
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain name", key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is given twice (also on line "
                f"{seen[key].start_mark.line + 1})", key_node.start_mark)
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)

# libyaml's parser, ~8x faster, under the same resolvers and constructors: for the files
# bnexp wrote itself (a run's config.yaml, read back for every table and figure). Its
# composer recurses in C, where deep nesting overflows the stack instead of raising
# RecursionError, so it only reads texts that cannot nest deeper than FAST_MAX_NESTING.
_FastLoader = None
if getattr(yaml, "__with_libyaml__", False):
    class _FastLoader(yaml.CSafeLoader):
        yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers
        yaml_constructors = _Loader.yaml_constructors

FAST_MAX_NESTING = 256  # levels; a C level takes ~0.3 KiB of the stack
_NESTING = "[{-:?"  # every level of nesting is opened by one of these


def _check_bounds(data: Any) -> None:
    """Count values as if aliases were copied; refuse cycles, deep nesting and bombs."""
    count = 0
    stack: list[tuple[Any, int, frozenset[int]]] = [(data, 0, frozenset())]
    while stack:
        value, depth, path = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise YamlError(f"expands to more than {MAX_VALUES:,} values (aliases?)")
        if depth > MAX_DEPTH:
            raise YamlError(f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, (dict, list)):
            if id(value) in path:
                raise YamlError("an alias refers to a value that contains it")
            children = value.values() if isinstance(value, dict) else value
            inner = path | {id(value)}
            stack.extend((child, depth + 1, inner) for child in children)


def _fast(text: str) -> bool:
    return (_FastLoader is not None
            and sum(text.count(c) for c in _NESTING) < FAST_MAX_NESTING)


def parse(text: str, written: bool = False) -> Any:
    """Plain data from a YAML text; YamlError says what is wrong and where.

    written: a file bnexp wrote (and someone may have edited): read with libyaml where it
    is safe to, the same data; any problem is worded by the pure-Python reader as always.
    """
    if written and _fast(text):
        try:
            data = yaml.load(text, Loader=_FastLoader)  # noqa: S506 - a CSafeLoader
        except Exception:  # any problem: worded below, by the reader of everything else
            pass
        else:
            _check_bounds(data)
            return data
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise YamlError(f"invalid YAML at {where}{exc.problem or exc.context}") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        raise YamlError(f"invalid YAML at line {line}, column {column}: the character "
                        f"U+{exc.character:04X} is not allowed in YAML") from None
    except yaml.YAMLError as exc:
        raise YamlError(f"invalid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise YamlError(f"nested more than {MAX_DEPTH} levels deep") from None
    except (ValueError, OverflowError) as exc:
        raise YamlError(f"a value cannot be read ({exc})") from None
    _check_bounds(data)
    return data


def read_text(path: Path) -> str:
    """The text of a regular file of at most MAX_FILE_BYTES; YamlError otherwise.

    Checked before opening: opening a named pipe would block, /dev/zero never ends.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise YamlError("file not found") from None
    except OSError as exc:
        raise YamlError(f"cannot read file ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise YamlError("is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise YamlError("is not a regular file (a pipe or device?)")
    if info.st_size > MAX_FILE_BYTES:
        raise YamlError(f"is {info.st_size:,} bytes; an experiment file has at most "
                        f"{MAX_FILE_BYTES:,}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise YamlError(f"cannot read file ({exc.strerror or exc})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise YamlError(f"is larger than {MAX_FILE_BYTES:,} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise YamlError("is not UTF-8 text") from None
