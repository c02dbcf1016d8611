"""Reading a configuration document, YAML or JSON, within limits.

Whatever a file holds, reading it costs bounded time and memory and ends in
plain data or in one ConfigError that names the file and, where it can, the
line. The limits, all checked before any value is used:

* size: at most `max_bytes` are read;
* encoding: UTF-8 (a BOM is allowed); anything else is named with its offset;
* depth: nesting deeper than `max_depth` stops the parser where it is
  (PyYAML's composer and json's decoder recurse: 500 levels would be a
  RecursionError);
* values: at most `max_values` nodes are made, counted while parsing, and
  the document with every YAML alias expanded may hold no more (the alias
  budget: a 386-byte alias bomb expands to billions of values, and every
  walk over the data, ours included, would expand it); an alias that
  refers to itself is refused too;
* scalars Python cannot make (an integer of 5,000 digits, 2001-13-45 as a
  date) are a ConfigError at their line, not a ValueError from the parser;
* duplicate keys.

YAML keeps the line of every value by its field path (`chains[2].match.ports[0]`),
so later errors can name it. JSON is YAML too; `parse_json` reads it with
the json module instead (no lines), for a loader that wants JSON's rules.

Every loader reads through here: source.read_file (our config, and the
bootstrap loaders beside it) and inject's manifests, each with the `Limits`
it needs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from .values import ConfigError


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 1 << 20  # 1 MiB
    max_depth: int = 64
    max_values: int = 50_000


LIMITS = Limits()


@dataclass(frozen=True)
class Document:
    """Parsed data and the line of each of its values by field path (source.line_for finds one)."""

    data: Any
    lines: dict[str, int] = field(default_factory=dict)


def read_text(path: str, limits: Limits = LIMITS) -> str:
    """A file's text: at most `max_bytes`, UTF-8."""
    return decode(read_bytes(path, limits), path)


def read_bytes(path: str, limits: Limits = LIMITS, what: str = "a config file") -> bytes:
    """A file's bytes: at most `max_bytes`; `what` names the file in the error past it."""
    try:
        with open(path, "rb") as f:
            raw = f.read(limits.max_bytes + 1)
    except OSError as exc:
        raise ConfigError("", f"cannot read config: {exc.strerror}", source=path) from None
    except ValueError as exc:  # a NUL in the path
        raise ConfigError("", f"cannot read config: {exc}", source=repr(path)) from None
    if len(raw) > limits.max_bytes:
        raise ConfigError("", f"larger than {limits.max_bytes} bytes: not {what}", source=path)
    return raw


def decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError("", f"not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})",
                          source=source, line=line) from None


# --- YAML ------------------------------------------------------------------------------

def parse_yaml(text: str, source: str, limits: Limits = LIMITS,
               loader: type[yaml.SafeLoader] = yaml.SafeLoader, duplicates: bool = False) -> Document:
    """One YAML document (an empty one is None); `duplicates`: a key given twice
    keeps its last value (Envoy's reading) instead of being an error."""
    try:
        parser = _limited(loader, limits)(text)  # the reader checks every character here
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    try:
        node = parser.get_single_node()
        if node is None:
            return Document(None)
        lines = _lines(node, source, duplicates)
        return Document(parser.construct_document(node), lines)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    finally:
        parser.dispose()


def parse_yaml_stream(text: str, source: str, limits: Limits = LIMITS,
                      loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Iterator[Document]:
    """Every document of a YAML stream, each within `limits` (the size limit is for the whole)."""
    if len(text.encode()) > limits.max_bytes:
        raise ConfigError("", f"larger than {limits.max_bytes} bytes", source=source)
    try:
        parser = _limited(loader, limits)(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    try:
        while True:
            try:
                if not parser.check_node():
                    return
                node = parser.get_node()
                if node is None:
                    return
                yield Document(parser.construct_document(node), _lines(node, source))
            except yaml.YAMLError as exc:
                raise _yaml_error(exc, source) from None
    finally:
        parser.dispose()


class Refused(yaml.MarkedYAMLError):
    """Valid YAML, perhaps, but beyond the limits."""


def _refused(problem: str, mark: yaml.Mark | None) -> Refused:
    return Refused(None, None, problem, mark)


def _yaml_error(exc: yaml.YAMLError, source: str) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark else None
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    problem = ", ".join(p for p in parts if p) or str(exc).splitlines()[0]
    return ConfigError("", problem if isinstance(exc, Refused) else f"not valid YAML: {problem}",
                       source=source, line=line)


def _limited(loader: type[yaml.SafeLoader], limits: Limits) -> type[yaml.SafeLoader]:
    """`loader` that keeps to `limits` while it composes and constructs."""

    class Limited(loader):  # type: ignore[valid-type,misc]
        def compose_document(self) -> yaml.Node:
            self._depth, self._values = 0, 0
            node: yaml.Node = super().compose_document()
            _measure(node, limits)
            return node

        def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
            self._depth += 1
            self._values += 1
            if self._depth > limits.max_depth:
                raise _refused(f"nested deeper than {limits.max_depth} levels", self.peek_event().start_mark)
            if self._values > limits.max_values:
                raise _refused(f"more than {limits.max_values} values", self.peek_event().start_mark)
            try:
                node: yaml.Node = super().compose_node(parent, index)
                return node
            finally:
                self._depth -= 1

        def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
            try:
                return super().construct_object(node, deep)
            except (ValueError, OverflowError) as exc:  # int("5000 digits"), a 13th month, ...
                if node.tag == "tag:yaml.org,2002:int":
                    raise _refused(f"{_short_scalar(node)} is too long for an integer", node.start_mark) from None
                raise ConstructorError(None, None, f"cannot read {_short_scalar(node)}: {exc}",
                                       node.start_mark) from None

    return Limited


def _short_scalar(node: yaml.Node) -> str:
    if not isinstance(node, yaml.ScalarNode):
        return "this value"
    value = str(node.value)
    return repr(value) if len(value) <= 20 else f"{value[:17]!r}... ({len(value)} characters)"


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _measure(root: yaml.Node, limits: Limits) -> None:
    """The document with its aliases expanded: within max_values and max_depth, no cycle.

    Each node is measured once (an alias reuses its node's figures), in
    document order: an alias always names a node already measured, or one
    still open above it (a cycle), so this recursion is never deeper than
    the composer's own.
    """
    figures: dict[int, tuple[int, int]] = {}  # id(node) -> (values with aliases expanded, height)
    open_nodes: set[int] = set()

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in open_nodes:
            raise ComposerError(None, None, "a YAML alias that refers to itself", node.start_mark)
        known = figures.get(key)
        if known is None:
            open_nodes.add(key)
            values, height = 1, 0
            for child in _children(node):
                child_values, child_height = measure(child, depth + 1)
                values, height = values + child_values, max(height, child_height + 1)
                if values > limits.max_values:
                    raise _refused(f"more than {limits.max_values} values once its YAML aliases are expanded "
                                   "(an alias bomb?)", node.start_mark)
            open_nodes.discard(key)
            known = figures[key] = (values, height)
        if depth + known[1] > limits.max_depth:
            raise _refused(f"nested deeper than {limits.max_depth} levels once its YAML aliases are expanded",
                           node.start_mark)
        return known

    measure(root, 1)


def _lines(root: yaml.Node, source: str, duplicates: bool = False) -> dict[str, int]:
    """The line of every value by its field path; a duplicate key is an error unless `duplicates`.
    (_measure has bounded the walk: aliases are walked into, as the data holds them.)"""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, where: str) -> None:
        lines[where] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, child in node.value:
                name = _join(where, str(key.value) if isinstance(key, yaml.ScalarNode) else "?")
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen and not duplicates:
                        raise ConfigError(name, "duplicate key", source=source, line=key.start_mark.line + 1)
                    seen.add(key.value)
                walk(child, name)
        elif isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                walk(child, f"{where}[{i}]")

    walk(root, "")
    return lines


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# --- JSON ------------------------------------------------------------------------------

def parse_json(text: str, source: str, limits: Limits = LIMITS) -> Document:
    """One JSON document (no line numbers: json keeps none)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for key, value in items:
            if key in data:
                raise ConfigError(key, "duplicate key", source=source)
            data[key] = value
        return data

    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise ConfigError("", f"not valid JSON: {exc.msg}", source=source, line=exc.lineno) from None
    except RecursionError:
        raise ConfigError("", f"nested deeper than {limits.max_depth} levels", source=source) from None
    except ValueError:  # int() of 5,000 digits
        raise ConfigError("", "an integer too long to read", source=source) from None
    _check_json(data, source, limits)
    return Document(data)


def _check_json(data: Any, source: str, limits: Limits) -> None:
    """Depth and number of values of parsed JSON (no aliases there: a plain count)."""
    values = 0
    todo: list[tuple[Any, int]] = [(data, 1)]
    while todo:
        item, depth = todo.pop()
        values += 1
        if depth > limits.max_depth:
            raise ConfigError("", f"nested deeper than {limits.max_depth} levels", source=source)
        if values > limits.max_values:
            raise ConfigError("", f"more than {limits.max_values} values", source=source)
        if isinstance(item, dict):
            todo.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            todo.extend((v, depth + 1) for v in item)
