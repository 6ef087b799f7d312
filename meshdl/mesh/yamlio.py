"""Reading mesh YAML/JSON files with errors that name the file and line, and
small parsers for the numbers in them (FLOP/s, byte sizes, watts)."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from meshdl.errors import TopologyError

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*([0-9.eE+-]+)\s*([a-zA-Z]*)\s*$")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode,
                       deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable key {key!r}", key_node.start_mark) from None
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (duplicate device or field; each may "
                            "appear once)", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _construct_mapping)


def read_data(path: Path) -> Any:
    """Parse a .yaml/.yml/.json file; TopologyError names the file and line on failure."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TopologyError(f"{path}: file not found; check the path") from None
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read ({exc})") from exc
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise TopologyError(f"{path}:{exc.lineno}:{exc.colno}: JSON syntax error: "
                                f"{exc.msg}; fix the file at that line") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark, ctx = exc.problem_mark or exc.context_mark, exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = exc.problem or exc.context or "invalid YAML"
        if ctx is not None and mark is not None and ctx.line != mark.line and exc.context:
            problem += f" ({exc.context} at line {ctx.line + 1}, column {ctx.column + 1})"
        raise TopologyError(f"{where}: YAML error: {problem}; fix the file there") from None
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path}: YAML error: {exc}") from None


def number(value: Any, what: str) -> float:
    """A finite float from an int, float or numeric string ("4.0e9": YAML 1.1 reads it
    as a string)."""
    if isinstance(value, bool):
        raise TopologyError(f"{what} is {value!r}; expected a number")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TopologyError(f"{what} is {value!r}; expected a number") from None
    if not math.isfinite(out):
        raise TopologyError(f"{what} is {value!r}; expected a finite number")
    return out


def size_bytes(value: Any, what: str) -> int:
    """Bytes from a number or a string with a unit: "512 MiB", "4GiB", "1.5 GB"."""
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else None
        if not m or unit not in _SIZE_UNITS:
            raise TopologyError(f"{what} is {value!r}; give bytes or a size such as "
                                "'512 MiB' (units: KB MB GB KiB MiB GiB)")
        return int(round(number(m.group(1), what) * _SIZE_UNITS[unit]))
    return int(round(number(value, what)))


def require_mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TopologyError(f"{what} must be a mapping (key: value), got "
                            f"{type(value).__name__}")
    return value


def check_keys(data: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise TopologyError(f"{what}: unknown field(s) {', '.join(unknown)}; allowed: "
                            f"{', '.join(sorted(allowed))}")
