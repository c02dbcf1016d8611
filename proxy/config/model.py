"""The configuration as data: frozen dataclasses, one value per run.

Everything the proxy does is decided by one `Config` built at start-up
(load.py) and never changed after. The defaults here are the design note's
numbers and Envoy's or Istio's where those have one.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from typing import Any, NamedTuple

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The design note's numbers: the init step and the proxy must agree on them.
DEFAULT_PORT = 5001  # ISTIO_PROXY_PORT
PROXY_UID = 1337  # ISTIO_PROXY_UID
DEFAULT_MARK = 0x1  # ISTIO_SO_MARK
NET_CLS_ID = 0x100001  # ISTIO_NET_CLS_ID
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


def hostport(host: str, port: int) -> str:
    """An address as Envoy writes one (Address::asString): 192.0.2.1:80, [2001:db8::1]:80."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Endpoint(NamedTuple):
    """An address and port. A tuple: made for every connection (its original
    destination), so it should be cheap to make and small to keep."""

    host: str
    port: int

    def __str__(self) -> str:
        return hostport(self.host, self.port)


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
        plain: dict[str, Any] = _plain(self)
        return plain


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

