"""Reading a configuration file: YAML (JSON is YAML too) with the line of every
value, within limits (document.py), and the small checks every loader makes
of plain data (a mapping with known keys, a list of items each parsed with
its own path).

An error is a ConfigError whose `where` is the field path
(`chains[2].match.ports[0]`); `line_for` finds the line to name for it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import yaml

from .document import LIMITS, Limits, parse_yaml, read_text
from .values import ConfigError, as_list

T = TypeVar("T")


def read_file(path: str, limits: Limits = LIMITS) -> tuple[Any, dict[str, int]]:
    """A file's data and the line of every value by its field path, read within `limits`
    (size, encoding, depth, values with YAML aliases expanded: document.py)."""
    return read_yaml(read_text(path, limits), path, limits)


def read_yaml(text: str, source: str, limits: Limits = LIMITS, loader: type[yaml.SafeLoader] = yaml.SafeLoader,
              duplicates: bool = False) -> tuple[Any, dict[str, int]]:
    """Parse YAML within `limits` and remember the line of every value by its field path.

    A key given twice in one mapping is an error, unless `duplicates`
    (Envoy's reading: the last one wins).
    """
    document = parse_yaml(text, source, limits, loader=loader, duplicates=duplicates)
    return document.data, document.lines


def line_for(where: str, lines: Mapping[str, int]) -> int | None:
    """The line of the innermost known field of a path such as chains[2].match.ports[0]."""
    while where:
        if where in lines:
            return lines[where]
        shorter = re.sub(r"(\.[^.\[\]]*|\[\d+\]|^[^.\[\]]+)$", "", where)
        if shorter == where:  # not a path this function knows how to shorten
            return None
        where = shorter
    return None


def mapping(value: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise ConfigError(where, f"expected a mapping, got {type(value).__name__}")
    for key in value:
        if key not in allowed:
            raise ConfigError(join(where, str(key)), f"unknown key (allowed: {', '.join(allowed)})")
    for key in required:
        if key not in value:
            raise ConfigError(join(where, key), "is required")
    return value


def join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def items(raw: dict[Any, Any], key: str, where: str, parse: Callable[[Any, str], T]) -> tuple[T, ...]:
    """The list under `key` (empty if absent), each item parsed with its own path."""
    where = join(where, key)
    return tuple(parse(item, f"{where}[{i}]") for i, item in enumerate(as_list(raw.get(key, []), where)))


def unique(names: list[str], where: str, what: str) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(f"{where}[{i}].name", f"{what} {name!r} is already defined at {where}[{seen[name]}]")
        seen[name] = i
