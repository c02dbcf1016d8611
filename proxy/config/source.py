"""Reading a configuration file: YAML (JSON is YAML too) with the line of every
value, and the small checks every loader makes of plain data (a mapping with
known keys, a list of items each parsed with its own path).

An error is a ConfigError whose `where` is the field path
(`chains[2].match.ports[0]`); `line_for` finds the line to name for it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import yaml

from .values import ConfigError, as_list

T = TypeVar("T")


def read_file(path: str) -> tuple[Any, dict[str, int]]:
    """A file's data and the line of every value by its field path."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError("", f"cannot read config: {exc.strerror}", source=path) from None
    return read_yaml(text, path)


def read_yaml(text: str, source: str, loader: type[yaml.SafeLoader] = yaml.SafeLoader,
              duplicates: bool = False) -> tuple[Any, dict[str, int]]:
    """Parse YAML and remember the line of every value by its field path.

    A key given twice in one mapping is an error, unless `duplicates`
    (Envoy's reading: the last one wins).
    """
    try:
        root = yaml.compose(text, Loader=loader)
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
        problem = ", ".join(p for p in parts if p) or str(exc).splitlines()[0]
        raise ConfigError("", f"not valid YAML: {problem}", source=source, line=line) from None
    lines: dict[str, int] = {}

    active: set[int] = set()  # the nodes on the current path: an alias back to one is a cycle

    def walk(node: yaml.Node, where: str) -> None:
        line = node.start_mark.line + 1
        lines[where] = line
        if id(node) in active:
            raise ConfigError(where, "a YAML alias that refers to itself", source=source, line=line)
        active.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, child in node.value:
                name = join(where, str(key.value))
                if key.value in seen and not duplicates:
                    raise ConfigError(name, "duplicate key", source=source, line=key.start_mark.line + 1)
                seen.add(key.value)
                walk(child, name)
        elif isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                walk(child, f"{where}[{i}]")
        active.discard(id(node))

    if root is not None:
        walk(root, "")
    return data, lines


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
