"""Our YAML -> the model, with the environment and flags on top, validated once.

Four sources feed the configuration, in this order of precedence (highest first):

1. command-line flags (`--port`, `--mark`, ...), for one run;
2. the design note's environment variables (`ISTIO_PROXY_PORT`,
   `ISTIO_SO_MARK`), the contract the init step and the proxy share in a pod;
3. the config file (`--config proxy.yaml`);
4. built-in defaults (the design note's numbers, model.py).

A file that is an Envoy bootstrap (a top-level key such as
`static_resources`, `admin` or `node`) is read by the other front end,
config/envoy; flags and the environment then set only what a bootstrap
does not say (the loop, the log format, ...), never a listener's port.

The file has a short form and a long one. The short form writes the
redirected port's listener as top-level keys (`port`, `addresses`, `chains`,
`default_action`) plus `plain_listeners`; the long form writes every
listener out (`listeners:`), with what an Envoy bootstrap can say too, and is
what `check` prints (Config.to_dict) and what a worker is handed. `--port`
and ISTIO_PROXY_PORT change the short form's port; a file in the long form
names its own ports.

A bad value from any source is a `ConfigError` whose text names where it came
from: `proxy.yaml:12: chains[2].match.ports[0]: 70000 is not a port`, or
`ISTIO_PROXY_PORT: 'abc' is not a port`, or `--mark: ...`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from functools import partial
from typing import Any

from .envoy import from_bootstrap, is_bootstrap
from .logformat import compile_format
from .model import (
    ACTIONS,
    BLACKHOLE,
    CLUSTER_KINDS,
    DEFAULT_CLEANUP_INTERVAL,
    DEFAULT_CONNECT_TIMEOUT,
    DIRECTIONS,
    LB_POLICIES,
    PASSTHROUGH,
    RESERVED_NAMES,
    SOURCE_TYPES,
    TRANSPORT_PROTOCOLS,
    AccessLog,
    Chain,
    Cluster,
    Config,
    Listener,
    Match,
    WeightedCluster,
    plain_listener,
    redirect_listener,
)
from .source import items, line_for, mapping, read_file, unique
from .values import (
    ENVIRONMENT,
    OPTIONAL,
    SETTINGS,
    SHORT_FORM,
    ConfigError,
    parse_address,
    parse_bool,
    parse_choice,
    parse_connections,
    parse_duration,
    parse_endpoint,
    parse_mark,
    parse_name,
    parse_network,
    parse_path,
    parse_port,
    parse_text,
    short,
)

SHORT_KEYS = (*SHORT_FORM, "chains", "plain_listeners")
TOP_KEYS = (*SETTINGS, *SHORT_KEYS, "listeners", "clusters")

Overrides = dict[str, tuple[Any, str]]  # short-form key -> (value, where it came from)


def load(path: str | None = None, *, env: Mapping[str, str] | None = None,
         flags: Mapping[str, Any] | None = None) -> Config:
    """Build the effective Config: built-in < file < environment < flags."""
    settings: dict[str, Any] = {}
    short_form: Overrides = {}
    for var, key in ENVIRONMENT.items():
        value = (os.environ if env is None else env).get(var)
        if value not in (None, ""):
            _override(key, value, var, settings, short_form)
    for key, value in (flags or {}).items():
        if value is not None:
            _override(key, value, "--" + key.replace("_", "-"), settings, short_form)
    if path is None:
        config = _build({}, short_form)
    else:
        data, lines = read_file(path)
        if is_bootstrap(data):  # Envoy's bootstrap (config/envoy): it names its own listeners
            for key, (_, where) in short_form.items():
                raise ConfigError("", f"{where} sets the short form's {key}, but {path} is an Envoy bootstrap, "
                                      "which names its listeners' addresses", source=where)
            return dataclasses.replace(from_bootstrap(data, lines, path), **settings)
        try:
            config = _build({} if data is None else data, short_form)
        except ConfigError as exc:
            if exc.source is not None:  # an environment variable or a flag, not the file
                raise
            raise ConfigError(exc.where, exc.message, source=path, line=line_for(exc.where, lines)) from None
    return dataclasses.replace(config, **settings)


def _override(key: str, value: Any, where: str, settings: dict[str, Any], short_form: Overrides) -> None:
    if key in SHORT_FORM:
        short_form[key] = (SHORT_FORM[key](value, where), where)
    else:
        settings[key] = SETTINGS[key](value, where)


def from_data(data: Any) -> Config:
    """A Config from plain data as `Config.to_dict()` writes it (how a worker
    gets its supervisor's effective configuration, see control/worker.py)."""
    return _build(data, {})


# --- the file's top level ------------------------------------------------------------

def _build(data: Any, short_overrides: Overrides) -> Config:
    top = mapping(data, "", TOP_KEYS)
    settings = {key: SETTINGS[key](value, key) for key, value in top.items()
                if key in SETTINGS and not (value is None and key in OPTIONAL)}
    clusters = items(top, "clusters", "", _cluster)
    unique([c.name for c in clusters], "clusters", "cluster")
    known = {c.name for c in clusters}
    if "listeners" in top:
        for key in SHORT_KEYS:
            if key in top:
                raise ConfigError(key, "belongs to the short form; with `listeners`, write it in its listener")
        for key, (_, where) in short_overrides.items():
            raise ConfigError("", f"{where} sets the short form's {key}, but the file writes its listeners out "
                                  "(`listeners`): set it there", source=where)
        listeners = items(top, "listeners", "", partial(_listener, clusters=known))
    else:
        listeners = _short_form(top, short_overrides, known)
    unique([listener.name for listener in listeners], "listeners", "listener")
    _check_listeners(listeners)
    return Config(listeners=listeners, clusters=clusters, **settings)


def _short_form(top: dict[Any, Any], overrides: Overrides, clusters: set[str]) -> tuple[Listener, ...]:
    """The redirected port's listener from the top-level keys, then the plain listeners."""
    shorthand = {key: SHORT_FORM[key](top[key], key) for key in SHORT_FORM if key in top}
    shorthand.update({key: value for key, (value, _) in overrides.items()})
    chains = items(top, "chains", "", partial(_chain, clusters=clusters))
    _check_chains(chains, "chains")
    plain = items(top, "plain_listeners", "", partial(_plain_listener, clusters=clusters))
    limit = shorthand.pop("redirect_max_connections", None)
    return (redirect_listener(chains=chains, max_connections=limit, **shorthand), *plain)


def _check_chains(chains: tuple[Chain, ...], where: str) -> None:
    unique([c.name for c in chains], where, "chain")
    for i, chain in enumerate(chains):
        if chain.name in RESERVED_NAMES:
            raise ConfigError(f"{where}[{i}].name", f"{chain.name!r} is the name of one of the proxy's own "
                                                    f"(reserved: {', '.join(RESERVED_NAMES)})")
    check_ambiguous(chains, where)


def _check_listeners(listeners: tuple[Listener, ...]) -> None:
    """Two listeners may not bind the same address and port; chain names are
    unique across listeners (they name stats)."""
    bound: dict[tuple[str, int], int] = {}
    named: dict[str, int] = {}
    for i, listener in enumerate(listeners):
        for address in listener.addresses if listener.bind else ():
            if (address.host, address.port) in bound:
                j = bound[address.host, address.port]
                raise ConfigError(f"listeners[{i}].addresses", f"{address} is bound by listeners[{j}] "
                                                               f"({listeners[j].name!r}) too")
            bound[address.host, address.port] = i
        defaults = () if listener.default_chain in (None, PASSTHROUGH, BLACKHOLE) else (listener.default_chain,)
        for chain in (*listener.chains, *defaults):
            if chain.name in named and named[chain.name] != i:
                raise ConfigError(f"listeners[{i}].chains", f"chain {chain.name!r} is also a chain of "
                                                             f"{listeners[named[chain.name]].name!r}")
            named[chain.name] = i


# --- listeners, chains, clusters -------------------------------------------------------

LISTENER_KEYS = ("name", "addresses", "chains", "default_chain", "original_dst", "hand_off", "bind", "direction",
                 "v4_on_v6", "max_connections", "stat_prefix")


def _listener(value: Any, where: str, clusters: set[str]) -> Listener:
    raw = mapping(value, where, LISTENER_KEYS, ("name", "addresses"))
    addresses = items(raw, "addresses", where, parse_endpoint)
    if not addresses:
        raise ConfigError(f"{where}.addresses", "needs at least one address")
    chains = items(raw, "chains", where, partial(_chain, clusters=clusters))
    _check_chains(chains, f"{where}.chains")
    default = raw.get("default_chain")
    flags = {key: parse_bool(raw[key], f"{where}.{key}") for key in ("original_dst", "hand_off", "bind", "v4_on_v6")
             if key in raw}
    return Listener(
        name=parse_name(raw["name"], f"{where}.name"), addresses=addresses, chains=chains,
        default_chain=None if default is None else _default_chain(default, f"{where}.default_chain", clusters),
        direction=parse_choice(DIRECTIONS)(raw.get("direction", "any"), f"{where}.direction"),
        stat_prefix=None if raw.get("stat_prefix") is None else parse_text(raw["stat_prefix"], f"{where}.stat_prefix"),
        max_connections=_connections(raw, where), **flags,
    )


def _default_chain(value: Any, where: str, clusters: set[str]) -> Chain:
    """A listener's default chain: any chain, or the proxy's own passthrough or blackhole."""
    chain = _chain(value, where, clusters)
    if chain.name in RESERVED_NAMES and chain not in (PASSTHROUGH, BLACKHOLE):
        raise ConfigError(f"{where}.name", f"{chain.name!r} is the name of one of the proxy's own chains")
    if chain.match != Match():
        raise ConfigError(f"{where}.match", "a default chain takes what no chain matched: it has no match")
    return chain


def _plain_listener(value: Any, where: str, clusters: set[str]) -> Listener:
    raw = mapping(value, where, ("name", "address", "port", "cluster", "max_connections"), ("name", "port", "cluster"))
    cluster = raw["cluster"]
    if not isinstance(cluster, str) or cluster not in clusters:
        raise ConfigError(f"{where}.cluster", f"unknown cluster {cluster!r}")
    return plain_listener(
        name=parse_name(raw["name"], f"{where}.name"),
        address=parse_address(raw.get("address", "127.0.0.1"), f"{where}.address"),
        port=parse_port(raw["port"], f"{where}.port"),
        cluster=cluster, max_connections=_connections(raw, where),
    )


def _connections(raw: dict[Any, Any], where: str) -> int | None:
    """A listener's max_connections (Envoy's listener connection limit), if it has one."""
    value = raw.get("max_connections")
    return None if value is None else parse_connections(value, f"{where}.max_connections")


CHAIN_KEYS = ("name", "match", "action", "cluster", "weighted", "stat_prefix", "idle_timeout",
              "max_connect_attempts", "access_logs", "log_name")


def _chain(value: Any, where: str, clusters: set[str]) -> Chain:
    raw = mapping(value, where, CHAIN_KEYS, ("name",))
    name = parse_name(raw["name"], f"{where}.name")
    routed = raw.get("cluster") is not None or bool(raw.get("weighted"))
    action = parse_choice(ACTIONS)(raw.get("action", "cluster" if routed else "original"), f"{where}.action")
    weighted = items(raw, "weighted", where, partial(_weighted, clusters=clusters))
    cluster = raw.get("cluster")
    if cluster is not None and not isinstance(cluster, str):
        raise ConfigError(f"{where}.cluster", f"{short(cluster)} is not a cluster name")
    if action == "cluster":
        if weighted:
            if cluster is not None and cluster != weighted[0].name:
                raise ConfigError(f"{where}.cluster", "with `weighted`, leave `cluster` out")
            cluster = weighted[0].name
        elif cluster is None:
            raise ConfigError(f"{where}.cluster", "is required when action is cluster")
        if cluster not in clusters:
            raise ConfigError(f"{where}.cluster", f"unknown cluster {cluster!r}")
    elif routed:
        raise ConfigError(f"{where}.cluster", f"is only allowed with action cluster, not {action}")
    attempts = raw.get("max_connect_attempts")
    return Chain(
        name=name, match=_match(raw.get("match"), f"{where}.match"), action=action, cluster=cluster,
        weighted=weighted,
        stat_prefix=None if raw.get("stat_prefix") is None else parse_text(raw["stat_prefix"], f"{where}.stat_prefix"),
        idle_timeout=None if raw.get("idle_timeout") is None else _chain_idle(raw["idle_timeout"],
                                                                               f"{where}.idle_timeout"),
        max_connect_attempts=None if attempts is None else _positive(attempts, f"{where}.max_connect_attempts"),
        access_logs=items(raw, "access_logs", where, _access_log),
        log_name=None if raw.get("log_name") is None else _log_name(raw["log_name"], f"{where}.log_name"),
    )


def _log_name(value: Any, where: str) -> str:
    """A chain's name in access logs: any string, also an empty one (Envoy's unnamed chain)."""
    if not isinstance(value, str):
        raise ConfigError(where, f"{short(value)} is not a string")
    return value


def _weighted(value: Any, where: str, clusters: set[str]) -> WeightedCluster:
    raw = mapping(value, where, ("name", "weight"), ("name", "weight"))
    if raw["name"] not in clusters:
        raise ConfigError(f"{where}.name", f"unknown cluster {raw['name']!r}")
    return WeightedCluster(raw["name"], _positive(raw["weight"], f"{where}.weight"))


def _access_log(value: Any, where: str) -> AccessLog:
    raw = mapping(value, where, ("path", "format"), ("path",))
    fmt = raw.get("format")
    if fmt is not None:
        fmt = parse_text(fmt, f"{where}.format")
        try:
            compile_format(fmt)
        except ValueError as exc:
            raise ConfigError(f"{where}.format", str(exc)) from None
    return AccessLog(parse_path(raw["path"], f"{where}.path"), fmt)


def _chain_idle(value: Any, where: str) -> float:
    """A chain's idle timeout; 0 turns it off, as in Envoy's tcp_proxy."""
    if value in (0, "0", "0s"):
        return 0.0
    return parse_duration(value, where)


def _positive(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 0xFFFFFFFF:
        raise ConfigError(where, f"{short(value)} is not a positive whole number")
    return value


MATCH_KEYS = ("ports", "destinations", "sources", "direction", "source_ports", "direct_sources", "source_type",
              "transport_protocol")


def _match(value: Any, where: str) -> Match:
    m = mapping({} if value is None else value, where, MATCH_KEYS)
    return Match(
        ports=tuple(sorted(set(items(m, "ports", where, parse_port)))),
        destinations=items(m, "destinations", where, parse_network),
        sources=items(m, "sources", where, parse_network),
        direction=parse_choice(DIRECTIONS)(m.get("direction", "any"), f"{where}.direction"),
        source_ports=tuple(sorted(set(items(m, "source_ports", where, parse_port)))),
        direct_sources=items(m, "direct_sources", where, parse_network),
        source_type=parse_choice(SOURCE_TYPES)(m.get("source_type", "any"), f"{where}.source_type"),
        transport_protocol=parse_choice(TRANSPORT_PROTOCOLS)(m.get("transport_protocol", ""),
                                                             f"{where}.transport_protocol"),
    )


CLUSTER_KEYS = ("name", "endpoints", "kind", "lb_policy", "connect_timeout", "mark", "source_address",
                "max_connections", "cleanup_interval")


def _cluster(value: Any, where: str) -> Cluster:
    raw = mapping(value, where, CLUSTER_KEYS, ("name",))
    name = parse_name(raw["name"], f"{where}.name")
    if name in RESERVED_NAMES:
        raise ConfigError(f"{where}.name", f"{name!r} is the name of one of the proxy's own "
                                           f"(reserved: {', '.join(RESERVED_NAMES)})")
    kind = parse_choice(CLUSTER_KINDS)(raw.get("kind", "static"), f"{where}.kind")
    endpoints = items(raw, "endpoints", where, parse_endpoint)
    if kind == "original_dst" and endpoints:
        raise ConfigError(f"{where}.endpoints", "a cluster of kind original_dst has no endpoints of its own")
    if kind == "static" and raw.get("endpoints") is None:
        raise ConfigError(f"{where}.endpoints", "is required (an empty list: every connection is reset)")
    limit = raw.get("max_connections")
    return Cluster(
        name=name, endpoints=endpoints, kind=kind,
        lb_policy=parse_choice(LB_POLICIES)(raw.get("lb_policy", "round_robin"), f"{where}.lb_policy"),
        connect_timeout=parse_duration(raw.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT), f"{where}.connect_timeout"),
        mark=parse_mark(raw["mark"], f"{where}.mark") if raw.get("mark") is not None else None,
        source_address=None if raw.get("source_address") is None else parse_address(raw["source_address"],
                                                                                      f"{where}.source_address"),
        max_connections=None if limit is None else _positive(limit, f"{where}.max_connections"),
        cleanup_interval=parse_duration(raw.get("cleanup_interval", DEFAULT_CLEANUP_INTERVAL),
                                        f"{where}.cleanup_interval"),
    )


# --- ambiguity -------------------------------------------------------------------------------

def check_ambiguous(chains: tuple[Chain, ...], where: str = "chains") -> None:
    """Two chains that match the same connections are an error.

    Like Envoy, compare the chains' match criteria element by element: a chain
    listing ports [80, 443] collides with another listing [443] when the rest
    of their criteria are equal, since a connection to 443 could pick either.
    An empty list is one element of its own ("any"), which only another
    empty list equals.

    Each criterion is indexed on its own (element -> the chains naming it), so
    the check costs the sum of the lists' lengths, never their product.
    """
    seen: dict[tuple[str, object], set[int]] = {}  # (criterion, element) -> chains naming it
    for i, chain in enumerate(chains):
        same: set[int] | None = None
        for criterion, elements in _criteria(chain.match):
            keys = [(criterion, e) for e in elements or (None,)]
            sharing = set().union(*(seen.get(key, ()) for key in keys))
            same = sharing if same is None else same & sharing
            for key in keys:
                seen.setdefault(key, set()).add(i)
        if same:
            j = max(same)
            raise ConfigError(f"{where}[{i}].match", f"matches the same connections as {where}[{j}] "
                                                     f"({chains[j].name!r}); two chains with the same match are "
                                                     "ambiguous")


def _criteria(m: Match) -> tuple[tuple[str, tuple[object, ...]], ...]:
    """Every criterion of a match as a list of elements (a single value is a list of one)."""
    return (("port", m.ports), ("dst", m.destinations), ("src", m.sources), ("direction", (m.direction,)),
            ("source_port", m.source_ports), ("direct_src", m.direct_sources), ("source_type", (m.source_type,)),
            ("transport", (m.transport_protocol,)))
