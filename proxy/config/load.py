"""Building the effective configuration from its sources, validated once.

Four sources feed it, in this order of precedence (highest first):

1. command-line flags (`--port`, `--mark`, ...), for one run;
2. the design note's environment variables (`ISTIO_PROXY_PORT`,
   `ISTIO_SO_MARK`), the contract the init step and the proxy share in a pod;
3. the config file (`--config proxy.yaml`);
4. built-in defaults (the design note's numbers, model.py).

A bad value from any source is a `ConfigError` whose text names where it came
from: `proxy.yaml:12: chains[2].match.ports[0]: 70000 is not a port`, or
`ISTIO_PROXY_PORT: 'abc' is not a port`, or `--mark: ...`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, TypeVar

import yaml

from .model import ACTIONS, DEFAULT_CONNECT_TIMEOUT, DIRECTIONS, Chain, Cluster, Config, Match, PlainListener
from .values import (
    ENVIRONMENT,
    OPTIONAL,
    SETTINGS,
    ConfigError,
    as_list,
    parse_address,
    parse_choice,
    parse_duration,
    parse_endpoint,
    parse_mark,
    parse_name,
    parse_network,
    parse_port,
    short,
)

T = TypeVar("T")


# --- the file: YAML with line numbers ----------------------------------------------

def _mapping(value: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise ConfigError(where, f"expected a mapping, got {type(value).__name__}")
    for key in value:
        if key not in allowed:
            raise ConfigError(_join(where, str(key)), f"unknown key (allowed: {', '.join(allowed)})")
    for key in required:
        if key not in value:
            raise ConfigError(_join(where, key), "is required")
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _read_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and remember the line of every value by its field path."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
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
                name = _join(where, str(key.value))
                if key.value in seen:
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


def _line_for(where: str, lines: Mapping[str, int]) -> int | None:
    """The line of the innermost known field of a path such as chains[2].match.ports[0]."""
    while where:
        if where in lines:
            return lines[where]
        where = re.sub(r"(\.[^.\[\]]*|\[\d+\])$", "", where)
    return None


def _build(data: Any) -> Config:
    top = _mapping(data, "", tuple(SETTINGS) + ("clusters", "chains", "plain_listeners"))
    settings = {key: SETTINGS[key](value, key) for key, value in top.items()
                if key in SETTINGS and not (value is None and key in OPTIONAL)}
    clusters = _items(top, "clusters", "", _cluster)
    _unique([c.name for c in clusters], "clusters", "cluster")
    known = {c.name for c in clusters}
    chains = _items(top, "chains", "", partial(_chain, clusters=known))
    _unique([c.name for c in chains], "chains", "chain")
    check_ambiguous(chains)
    plain = _items(top, "plain_listeners", "", partial(_plain_listener, clusters=known))
    _unique([p.name for p in plain], "plain_listeners", "listener")
    return Config(**settings, clusters=clusters, chains=chains, plain_listeners=plain)


def _unique(names: list[str], where: str, what: str) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(f"{where}[{i}].name", f"{what} {name!r} is already defined at {where}[{seen[name]}]")
        seen[name] = i


def _cluster(value: Any, where: str) -> Cluster:
    raw = _mapping(value, where, ("name", "endpoints", "connect_timeout", "mark"), ("name", "endpoints"))
    endpoints = _items(raw, "endpoints", where, parse_endpoint)
    if not endpoints:
        raise ConfigError(f"{where}.endpoints", "needs at least one endpoint")
    return Cluster(
        name=parse_name(raw["name"], f"{where}.name"),
        endpoints=endpoints,
        connect_timeout=parse_duration(raw.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT), f"{where}.connect_timeout"),
        mark=parse_mark(raw["mark"], f"{where}.mark") if raw.get("mark") is not None else None,
    )


def _chain(value: Any, where: str, clusters: set[str]) -> Chain:
    raw = _mapping(value, where, ("name", "match", "action", "cluster"), ("name",))
    name = parse_name(raw["name"], f"{where}.name")
    action = parse_choice(ACTIONS)(raw.get("action", "cluster" if "cluster" in raw else "original"), f"{where}.action")
    cluster = raw.get("cluster")
    if cluster is not None and not isinstance(cluster, str):
        raise ConfigError(f"{where}.cluster", f"{short(cluster)} is not a cluster name")
    if action == "cluster":
        if cluster is None:
            raise ConfigError(f"{where}.cluster", "is required when action is cluster")
        if cluster not in clusters:
            raise ConfigError(f"{where}.cluster", f"unknown cluster {cluster!r}")
    elif cluster is not None:
        raise ConfigError(f"{where}.cluster", f"is only allowed with action cluster, not {action}")
    return Chain(name=name, match=_match(raw.get("match"), f"{where}.match"), action=action, cluster=cluster)


def _match(value: Any, where: str) -> Match:
    m = _mapping({} if value is None else value, where, ("ports", "destinations", "sources", "direction"))
    return Match(
        ports=tuple(sorted(set(_items(m, "ports", where, parse_port)))),
        destinations=_items(m, "destinations", where, parse_network),
        sources=_items(m, "sources", where, parse_network),
        direction=parse_choice(DIRECTIONS)(m.get("direction", "any"), f"{where}.direction"),
    )


def _items(raw: dict[Any, Any], key: str, where: str, parse: Callable[[Any, str], T]) -> tuple[T, ...]:
    """The list under `key` (empty if absent), each item parsed with its own path."""
    where = _join(where, key)
    return tuple(parse(item, f"{where}[{i}]") for i, item in enumerate(as_list(raw.get(key, []), where)))


def _plain_listener(value: Any, where: str, clusters: set[str]) -> PlainListener:
    raw = _mapping(value, where, ("name", "address", "port", "cluster"), ("name", "port", "cluster"))
    cluster = raw["cluster"]
    if not isinstance(cluster, str) or cluster not in clusters:
        raise ConfigError(f"{where}.cluster", f"unknown cluster {cluster!r}")
    return PlainListener(
        name=parse_name(raw["name"], f"{where}.name"),
        address=parse_address(raw.get("address", "127.0.0.1"), f"{where}.address"),
        port=parse_port(raw["port"], f"{where}.port"),
        cluster=cluster,
    )


def check_ambiguous(chains: tuple[Chain, ...]) -> None:
    """Two chains that match the same (port, destination, source, direction) are an error.

    Like Envoy, compare the chains' match criteria element by element: a chain
    listing ports [80, 443] collides with another listing [443] when the rest
    of their criteria are equal, since a connection to 443 could pick either.
    An empty list is one element of its own ("any"), which only another
    empty list equals.

    Each criterion is indexed on its own (element -> the chains naming it), so
    the check costs the sum of the lists' lengths, never their product.
    """
    seen: dict[tuple[str, str, object], set[int]] = {}  # (direction, criterion, element) -> chains
    for i, chain in enumerate(chains):
        m = chain.match
        criteria = (("port", m.ports), ("dst", m.destinations), ("src", m.sources))
        same: set[int] | None = None
        for criterion, elements in criteria:
            keys = [(m.direction, criterion, e) for e in elements or (None,)]
            sharing = set().union(*(seen.get(key, ()) for key in keys))
            same = sharing if same is None else same & sharing
            for key in keys:
                seen.setdefault(key, set()).add(i)
        if same:
            j = max(same)
            raise ConfigError(f"chains[{i}].match", f"matches the same connections as chains[{j}] "
                              f"({chains[j].name!r}); two chains with the same match are ambiguous")


# --- putting the sources together ----------------------------------------------------

def load(path: str | None = None, *, env: Mapping[str, str] | None = None,
         flags: Mapping[str, Any] | None = None) -> Config:
    """Build the effective Config: built-in < file < environment < flags."""
    config = Config()
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError("", f"cannot read config: {exc.strerror}", source=path) from None
        data, lines = _read_yaml(text, path)
        try:
            config = _build({} if data is None else data)
        except ConfigError as exc:
            raise ConfigError(exc.where, exc.message, source=path, line=_line_for(exc.where, lines)) from None
    overrides: dict[str, Any] = {}
    for var, key in ENVIRONMENT.items():
        value = (os.environ if env is None else env).get(var)
        if value not in (None, ""):
            overrides[key] = SETTINGS[key](value, var)
    for key, value in (flags or {}).items():
        if value is not None:
            overrides[key] = SETTINGS[key](value, "--" + key.replace("_", "-"))
    config = dataclasses.replace(config, **overrides)
    _check_listeners(config)
    return config


def from_data(data: Any) -> Config:
    """A Config from plain data as `Config.to_dict()` writes it (how a worker
    gets its supervisor's effective configuration, see control/worker.py)."""
    config = _build(data)
    _check_listeners(config)
    return config


def _check_listeners(config: Config) -> None:
    for i, plain in enumerate(config.plain_listeners):
        if plain.port == config.port:
            raise ConfigError(f"plain_listeners[{i}].port", f"{plain.port} is the redirected port itself")
