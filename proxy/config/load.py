"""The proxy's configuration: YAML in, frozen dataclasses out, validated once.

Everything the proxy does is decided by one `Config` value built at start-up.
Three sources feed it, in this order of precedence (highest first):

1. command-line flags (`--port`, `--mark`, ...), for one run;
2. the design note's environment variables (`ISTIO_PROXY_PORT`,
   `ISTIO_SO_MARK`), the contract the init step and the proxy share in a pod;
3. the config file (`--config proxy.yaml`);
4. built-in defaults (the design note's numbers).

A bad value from any source is a `ConfigError` whose text names where it came
from: `proxy.yaml:12: chains[2].match.ports[0]: 70000 is not a port`, or
`ISTIO_PROXY_PORT: 'abc' is not a port`, or `--mark: ...`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import yaml

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORT = 5001  # ISTIO_PROXY_PORT
DEFAULT_CONNECT_TIMEOUT = 5.0  # Envoy's cluster connect_timeout default
DEFAULT_IDLE_TIMEOUT = 3600.0  # Envoy's tcp_proxy idle_timeout default
DEFAULT_DRAIN_TIMEOUT = 5.0  # Istio's terminationDrainDuration default
DEFAULT_ADMIN_ADDRESS = "127.0.0.1"
DEFAULT_ADMIN_PORT = 15000  # Istio's Envoy admin port
MAX_CONCURRENCY = 64

ACTIONS = ("original", "cluster", "reject")
DIRECTIONS = ("any", "inbound", "outbound")
LOOPS = ("uvloop", "asyncio")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
SPLICE_MODES = ("auto", "off")


class ConfigError(Exception):
    """A configuration value that cannot be used; str() is the one-line message."""

    def __init__(self, where: str, message: str, *, source: str | None = None, line: int | None = None):
        self.where, self.message, self.source, self.line = where, message, source, line
        prefix = ""
        if source:
            prefix = f"{source}:{line}: " if line else f"{source}: "
        super().__init__(f"{prefix}{where}: {message}" if where else f"{prefix}{message}")


# --- the configuration, as data ---------------------------------------------------

class Endpoint(NamedTuple):
    """An address and port. A tuple: made for every connection (its original
    destination), so it should be cheap to make and small to keep."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Cluster:
    """A named set of static endpoints, used round robin."""

    name: str
    endpoints: tuple[Endpoint, ...]
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    mark: int | None = None  # overrides Config.mark for this cluster's sockets


@dataclass(frozen=True)
class Match:
    """What a chain matches on; an empty tuple / "any" matches everything."""

    ports: tuple[int, ...] = ()
    destinations: tuple[IPNetwork, ...] = ()
    sources: tuple[IPNetwork, ...] = ()
    direction: str = "any"


@dataclass(frozen=True)
class Chain:
    name: str
    match: Match = field(default_factory=Match)
    action: str = "original"
    cluster: str | None = None


@dataclass(frozen=True)
class PlainListener:
    """An extra listener for proxy-aware apps: no original destination, one cluster."""

    name: str
    address: str
    port: int
    cluster: str


@dataclass(frozen=True)
class Config:
    port: int = DEFAULT_PORT
    addresses: tuple[str, ...] = ("::",)
    mark: int | None = None
    cgroup: str | None = None
    loop: str = "uvloop"
    concurrency: int = 1  # worker processes (Envoy's --concurrency); 1: this process serves itself
    log_format: str = "text"
    log_level: str = "info"
    access_log: str = "stderr"
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    splice: str = "auto"  # bulk directions move by splice(2) (proxy/splice.py), or never
    default_action: str = "original"
    clusters: tuple[Cluster, ...] = ()
    chains: tuple[Chain, ...] = ()
    plain_listeners: tuple[PlainListener, ...] = ()
    # The admin API (proxy/admin.py); port 0 turns it off. A non-loopback
    # address needs admin_allow_remote: the API is unauthenticated and can stop the proxy.
    admin_address: str = DEFAULT_ADMIN_ADDRESS
    admin_port: int = DEFAULT_ADMIN_PORT
    admin_allow_remote: bool = False

    def cluster(self, name: str) -> Cluster:
        return next(c for c in self.clusters if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration as plain data (what `check` prints)."""
        return _plain(self)


def _plain(value: Any) -> Any:
    if isinstance(value, Endpoint):
        return str(value)
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    return value


# --- value parsers: each takes (value, where) and raises ConfigError(where, ...) ----

def parse_port(value: Any, where: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) <= 5:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(where, f"{value!r} is not a port")
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ConfigError(where, f"{value} is not a port ({low}-65535)")
    return value


def parse_concurrency(value: Any, where: str) -> int:
    """1 to MAX_CONCURRENCY worker processes (an int, or its digits in a string from a flag)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENCY:
        raise ConfigError(where, f"{_short(value)} is not a number of workers (1-{MAX_CONCURRENCY})")
    return value


def parse_access_log(value: Any, where: str) -> str:
    """stderr, stdout, off or a file path; YAML reads a bare off as false."""
    return "off" if value is False else parse_text(value, where)


def parse_splice(value: Any, where: str) -> str:
    """auto or off; YAML reads a bare off as false (and on as true), so those count too."""
    if value is False or value is True:
        return "auto" if value else "off"
    return parse_choice(SPLICE_MODES)(value, where)


def parse_mark(value: Any, where: str) -> int:
    """An SO_MARK value: an integer or a string in any base Python reads (0x1)."""
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise ConfigError(where, f"{value!r} is not a mark (an integer such as 0x1)") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 0xFFFFFFFF:
        raise ConfigError(where, f"{value!r} is not a mark (1-0xffffffff)")
    return value


MAX_DURATION = 365 * 86400.0  # a year: anything longer is a typo, or NaN/inf
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any, where: str) -> float:
    """Seconds as a number, or a string such as 250ms, 5s, 2m, 1h."""
    if isinstance(value, bool):
        raise ConfigError(where, f"{value!r} is not a duration")
    try:
        if isinstance(value, (int, float)):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION.match(value)):
            seconds = float(m.group(1)) * _UNIT[m.group(2)]
        else:
            raise ConfigError(where, f"{value!r} is not a duration (e.g. 5s, 250ms, 1h)")
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ConfigError(where, f"{_short(value)} is not a duration of at most {MAX_DURATION // 86400:g} days")
    if seconds <= 0:
        raise ConfigError(where, f"{value!r} must be positive")
    return seconds


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_network(value: Any, where: str) -> IPNetwork:
    if not isinstance(value, str):
        raise ConfigError(where, f"{value!r} is not a CIDR")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ConfigError(where, f"{value!r} is not a CIDR ({exc})") from None


def parse_address(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(where, f"{value!r} is not an IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(where, f"{value!r} is not an IP address") from None


def parse_endpoint(value: Any, where: str) -> Endpoint:
    """`198.51.100.10:80` or `[2001:db8::10]:80`."""
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(where, f"{value!r} is not an endpoint (HOST:PORT, [V6]:PORT)")
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(where, f"{value!r}: write an IPv6 endpoint as [ADDRESS]:PORT")
    return Endpoint(parse_address(host, where), parse_port(port, where))


def parse_choice(choices: tuple[str, ...]) -> Callable[[Any, str], str]:
    def parse(value: Any, where: str) -> str:
        if value not in choices:
            raise ConfigError(where, f"{value!r} is not one of {', '.join(choices)}")
        return value
    return parse


def parse_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        raise ConfigError(where, f"{value!r} is not a name (letters, digits, _ . -)")
    return value


def parse_text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(where, f"{value!r} is not a non-empty string")
    return value


def parse_bool(value: Any, where: str) -> bool:
    """true/false in YAML; also the strings true, false, 1, 0, yes, no (flags, env)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ConfigError(where, f"{value!r} is not a boolean (true or false)")


def parse_admin_port(value: Any, where: str) -> int:
    return parse_port(value, where, allow_zero=True)


def parse_addresses(value: Any, where: str) -> tuple[str, ...]:
    items = _list(value, where)
    if not items:
        raise ConfigError(where, "needs at least one address")
    return tuple(parse_address(v, f"{where}[{i}]") for i, v in enumerate(items))


# Top-level settings that flags and env vars may also set: name -> parser.
SETTINGS: dict[str, Callable[[Any, str], Any]] = {
    "port": parse_port,
    "addresses": parse_addresses,
    "mark": parse_mark,
    "cgroup": parse_text,
    "loop": parse_choice(LOOPS),
    "concurrency": parse_concurrency,
    "log_format": parse_choice(LOG_FORMATS),
    "log_level": parse_choice(LOG_LEVELS),
    "access_log": parse_access_log,
    "connect_timeout": parse_duration,
    "idle_timeout": parse_duration,
    "drain_timeout": parse_duration,
    "splice": parse_splice,
    "default_action": parse_choice(("original", "reject")),
    "admin_address": parse_address,
    "admin_port": parse_admin_port,
    "admin_allow_remote": parse_bool,
}

# Settings whose absence means "off": `mark: null` in a file is the same as no mark.
OPTIONAL = ("mark", "cgroup")

# The design note's environment variables the proxy honours.
ENVIRONMENT = {"ISTIO_PROXY_PORT": "port", "ISTIO_SO_MARK": "mark"}


# --- the file: YAML with line numbers ----------------------------------------------

def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise ConfigError(where, f"expected a list, got {type(value).__name__}")
    return value


def _mapping(value: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
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
    clusters = tuple(_cluster(c, f"clusters[{i}]") for i, c in enumerate(_list(top.get("clusters", []), "clusters")))
    _unique([c.name for c in clusters], "clusters", "cluster")
    known = {c.name for c in clusters}
    chains = tuple(_chain(c, f"chains[{i}]", known) for i, c in enumerate(_list(top.get("chains", []), "chains")))
    _unique([c.name for c in chains], "chains", "chain")
    check_ambiguous(chains)
    plain = tuple(
        _plain_listener(p, f"plain_listeners[{i}]", known)
        for i, p in enumerate(_list(top.get("plain_listeners", []), "plain_listeners"))
    )
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
    endpoints = tuple(
        parse_endpoint(e, f"{where}.endpoints[{i}]") for i, e in enumerate(_list(raw["endpoints"], f"{where}.endpoints"))
    )
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
    m = raw.get("match")
    m = _mapping({} if m is None else m, f"{where}.match", ("ports", "destinations", "sources", "direction"))
    match = Match(
        ports=tuple(sorted({parse_port(p, f"{where}.match.ports[{i}]") for i, p in enumerate(_list(m.get("ports", []), f"{where}.match.ports"))})),
        destinations=tuple(parse_network(d, f"{where}.match.destinations[{i}]") for i, d in enumerate(_list(m.get("destinations", []), f"{where}.match.destinations"))),
        sources=tuple(parse_network(s, f"{where}.match.sources[{i}]") for i, s in enumerate(_list(m.get("sources", []), f"{where}.match.sources"))),
        direction=parse_choice(DIRECTIONS)(m.get("direction", "any"), f"{where}.match.direction"),
    )
    action = parse_choice(ACTIONS)(raw.get("action", "cluster" if "cluster" in raw else "original"), f"{where}.action")
    cluster = raw.get("cluster")
    if cluster is not None and not isinstance(cluster, str):
        raise ConfigError(f"{where}.cluster", f"{_short(cluster)} is not a cluster name")
    if action == "cluster":
        if cluster is None:
            raise ConfigError(f"{where}.cluster", "is required when action is cluster")
        if cluster not in clusters:
            raise ConfigError(f"{where}.cluster", f"unknown cluster {cluster!r}")
    elif cluster is not None:
        raise ConfigError(f"{where}.cluster", f"is only allowed with action cluster, not {action}")
    return Chain(name=name, match=match, action=action, cluster=cluster)


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
    """
    seen: dict[tuple, int] = {}
    for i, chain in enumerate(chains):
        m = chain.match
        for port in m.ports or (None,):
            for dst in m.destinations or (None,):
                for src in m.sources or (None,):
                    key = (port, dst, src, m.direction)
                    if key in seen and seen[key] != i:
                        j = seen[key]
                        raise ConfigError(
                            f"chains[{i}].match",
                            f"matches the same connections as chains[{j}] ({chains[j].name!r}); "
                            "two chains with the same match are ambiguous",
                        )
                    seen[key] = i


# --- putting the sources together ----------------------------------------------------

def load(path: str | None = None, *, env: Mapping[str, str] | None = None, flags: Mapping[str, Any] | None = None) -> Config:
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
    gets its supervisor's effective configuration, see workers.py)."""
    config = _build(data)
    _check_listeners(config)
    return config


def _check_listeners(config: Config) -> None:
    for i, plain in enumerate(config.plain_listeners):
        if plain.port == config.port:
            raise ConfigError(f"plain_listeners[{i}].port", f"{plain.port} is the redirected port itself")
