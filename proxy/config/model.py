"""The configuration as data: frozen dataclasses, one value per run.

Everything the proxy does is decided by one `Config` built at start-up
(load.py) and never changed after. The defaults here are the design note's
numbers and Envoy's or Istio's where those have one.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The design note's numbers: the init step and the proxy must agree on them.
DEFAULT_PORT = 5001  # ISTIO_PROXY_PORT
PROXY_UID = 1337  # ISTIO_PROXY_UID
# inbound_source "127.0.0.6": Istio's InboundPassthroughBindIpv4 and InboundPassthroughBindIpv6
INBOUND_PASSTHROUGH_V4 = "127.0.0.6"
INBOUND_PASSTHROUGH_V6 = "::6"
DEFAULT_MARK = 0x1  # ISTIO_SO_MARK
NET_CLS_ID = 0x100001  # ISTIO_NET_CLS_ID
DEFAULT_CONNECT_TIMEOUT = 5.0  # Envoy's cluster connect_timeout default
DEFAULT_CLEANUP_INTERVAL = 5.0  # Envoy's cluster cleanup_interval default (ORIGINAL_DST hosts)
DEFAULT_IDLE_TIMEOUT = 3600.0  # Envoy's tcp_proxy idle_timeout default
DEFAULT_DRAIN_TIMEOUT = 5.0  # Istio's terminationDrainDuration default
DEFAULT_ADMIN_ADDRESS = "127.0.0.1"
DEFAULT_ADMIN_PORT = 15000  # Istio's Envoy admin port
MAX_CONCURRENCY = 64
MAX_CONNECTIONS = 100_000_000  # a ceiling for the connection limits: beyond it, a typo
DEFAULT_DRAIN_TIME = 600.0  # Envoy's --drain-time-s default
DRAIN_STRATEGIES = ("gradual", "immediate")  # Envoy's --drain-strategy

ACTIONS = ("original", "cluster", "reject", "close")
DIRECTIONS = ("any", "inbound", "outbound")
LOOPS = ("uvloop", "asyncio")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")  # Envoy's (-l); trace logs as debug
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


LB_POLICIES = ("round_robin", "random", "least_request")
CLUSTER_KINDS = ("static", "original_dst")
SOURCE_TYPES = ("any", "local", "external")  # Envoy's ANY, SAME_IP_OR_LOOPBACK, EXTERNAL
TRANSPORT_PROTOCOLS = ("", "raw_buffer")  # without a TLS inspector every connection is raw_buffer

# Names the proxy gives things of its own; a configured chain or cluster may not take them.
ORIGINAL_DST = "original_dst"  # the cluster of `action: original` (Envoy's ORIGINAL_DST type)
RESERVED_NAMES = ("passthrough", "blackhole", ORIGINAL_DST)


@dataclass(frozen=True)
class Cluster:
    """A named set of upstream endpoints (Envoy's STATIC cluster), or a
    cluster whose one endpoint is each connection's original destination
    (kind original_dst: Envoy's ORIGINAL_DST, Istio's PassthroughCluster)."""

    name: str
    endpoints: tuple[Endpoint, ...]  # none: every connection is reset (Istio's BlackHoleCluster)
    kind: str = "static"  # with original_dst, endpoints is empty
    lb_policy: str = "round_robin"
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    mark: int | None = None  # overrides Config.mark for this cluster's sockets
    source_address: str | None = None  # bind the upstream sockets to this address
    max_connections: int | None = None  # the circuit breaker (Envoy's default threshold is 1024)
    # original_dst: how often hosts with no open connection that were not picked since the
    # last sweep leave /clusters (Envoy's cleanup_interval)
    cleanup_interval: float = DEFAULT_CLEANUP_INTERVAL


@dataclass(frozen=True)
class Match:
    """What a chain matches on; an empty tuple / "any" / "" matches everything.
    Each criterion is Envoy's FilterChainMatch field of the same meaning
    (datapath/chains.py has the precedence), but for `direction`, which is ours."""

    ports: tuple[int, ...] = ()  # destination_port (Envoy takes one per chain; we take a list)
    destinations: tuple[IPNetwork, ...] = ()  # prefix_ranges
    sources: tuple[IPNetwork, ...] = ()  # source_prefix_ranges
    direction: str = "any"
    source_ports: tuple[int, ...] = ()
    direct_sources: tuple[IPNetwork, ...] = ()  # direct_source_prefix_ranges
    source_type: str = "any"
    transport_protocol: str = ""


class WeightedCluster(NamedTuple):
    name: str
    weight: int


@dataclass(frozen=True)
class AccessLog:
    """One access log of a chain (Envoy's file access logger): `format` is an
    Envoy format string (%START_TIME% ...), or None for Envoy's default."""

    path: str
    format: str | None = None


@dataclass(frozen=True)
class Chain:
    """A filter chain: what it matches, and where its connections go (Envoy's tcp_proxy)."""

    name: str
    match: Match = field(default_factory=Match)
    action: str = "original"  # original | cluster | reject (a RST) | close (as Envoy closes what it cannot route)
    cluster: str | None = None  # action cluster: the cluster (or the first of `weighted`)
    weighted: tuple[WeightedCluster, ...] = ()  # action cluster: pick one by weight per connection
    stat_prefix: str | None = None  # tcp_proxy's stats, tcp.<stat_prefix>.*
    idle_timeout: float | None = None  # None: Config.idle_timeout; 0: never (Envoy's 0s)
    max_connect_attempts: int | None = None  # None: every endpoint of the cluster once
    access_logs: tuple[AccessLog, ...] = ()
    # what Envoy's %FILTER_CHAIN_NAME% prints for it, when that is not `name`: a
    # bootstrap's own name ("" if it has none) of a chain the model had to rename
    # (names are unique across listeners here, and limited to letters, digits, _ . - |)
    log_name: str | None = None


# The chain a connection gets when no configured chain matches it. Istio calls
# the same thing PassthroughCluster; Envoy, the default filter chain.
PASSTHROUGH = Chain(name="passthrough", action="original")
BLACKHOLE = Chain(name="blackhole", action="reject")


@dataclass(frozen=True)
class Listener:
    """A logical listener (Envoy's Listener): where it listens, and its filter chains.

    The redirected port is a listener with `original_dst` (it reads
    SO_ORIGINAL_DST; chains match on that destination). A plain listener for
    proxy-aware apps has none, and one chain to its cluster.
    """

    name: str
    addresses: tuple[Endpoint, ...]  # the first names its stats, unless stat_prefix does
    chains: tuple[Chain, ...] = ()
    default_chain: Chain | None = None  # None: a connection no chain matches is closed
    original_dst: bool = False  # Envoy's original_dst listener filter
    hand_off: bool = False  # Envoy's use_original_dst: to the listener of the original destination
    bind: bool = True  # Envoy's bind_to_port: false for one that only takes hand-offs
    direction: str = "any"  # Envoy's traffic_direction; any: told by the original destination
    v4_on_v6: bool = False  # "::" takes IPv4 too (Envoy's ipv4_compat)
    max_connections: int | None = None  # open at once; past it new ones are reset (datapath/limits.py)
    stat_prefix: str | None = None  # Envoy's stat_prefix: its stats are listener.<stat_prefix>.*


def redirect_listener(port: int = DEFAULT_PORT, addresses: tuple[str, ...] = ("::",),
                      chains: tuple[Chain, ...] = (), default_action: str = "original",
                      max_connections: int | None = None) -> Listener:
    """The redirected port as the short form of our YAML writes it (port, addresses, chains)."""
    return Listener(
        name="redirect", addresses=tuple(Endpoint(a, port) for a in addresses), chains=chains,
        default_chain=PASSTHROUGH if default_action == "original" else BLACKHOLE, original_dst=True,
        v4_on_v6="::" in addresses and "0.0.0.0" not in addresses, max_connections=max_connections,
    )


def plain_listener(name: str, address: str, port: int, cluster: str, max_connections: int | None = None) -> Listener:
    """A plain listener as our YAML's plain_listeners write it: every connection to `cluster`."""
    return Listener(name=name, addresses=(Endpoint(address, port),),
                    default_chain=Chain(name=f"plain.{name}", action="cluster", cluster=cluster),
                    max_connections=max_connections)


DEFAULT_TPROXY_MARK = 0x539  # Istio's INBOUND_TPROXY_MARK (1337)


@dataclass(frozen=True)
class Config:
    listeners: tuple[Listener, ...] = (redirect_listener(),)
    clusters: tuple[Cluster, ...] = ()
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
    splice: str = "auto"  # bulk directions move by splice(2) (datapath/splice.py), or never
    # Inbound by TPROXY (iptables/redirect.sh --inbound-mode tproxy): the redirected
    # listeners take IP_TRANSPARENT, the original destination of a TPROXY'd connection is
    # its local address, and the connection to the app comes from the client's address
    # with tproxy_mark (Envoy's original_src). Needs CAP_NET_ADMIN.
    inbound_mode: str = "redirect"
    tproxy_mark: int = DEFAULT_TPROXY_MARK
    # REDIRECT mode: the source of the proxy's connections to the app ("127.0.0.6": ::6 for IPv6)
    inbound_source: str = "pod-ip"
    # The admin API (proxy/admin). admin_port None: no admin API (our YAML's
    # `admin_port: 0`, or a bootstrap without `admin`); 0: a port the kernel
    # picks (Envoy's port_value 0; our YAML's `admin_port: ephemeral`). A
    # non-loopback address needs admin_allow_remote: the API is
    # unauthenticated and can stop the proxy.
    admin_address: str = DEFAULT_ADMIN_ADDRESS
    admin_port: int | None = DEFAULT_ADMIN_PORT
    admin_allow_remote: bool = False
    admin_hosts: tuple[str, ...] = ()  # names a request's Host may carry besides the address and localhost
    # connections open at once in the whole proxy; past it new ones are reset (Envoy's
    # global_downstream_max_connections; datapath/limits.py); None: no limit
    max_connections: int | None = None
    admin_address_path: str | None = None  # write the bound admin address here (Envoy's --admin-address-path)
    # Logging beyond level and format: an spdlog pattern for every line
    # (Envoy's --log-format; control/envoylog.py), and levels of single loggers
    # (ours, by name: Envoy's --component-log-level, translated).
    log_pattern: str | None = None
    logger_levels: tuple[tuple[str, str], ...] = ()
    # Envoy's drain of /drain_listeners (--drain-time-s, --drain-strategy); our
    # own drain on SIGTERM is drain_timeout.
    drain_time: float = DEFAULT_DRAIN_TIME
    drain_strategy: str = "gradual"
    # From an Envoy bootstrap (config/envoy), for the admin API's /config_dump
    # and /server_info; None for our YAML. `bootstrap` is the bootstrap as
    # loaded (the file with --config-yaml merged over it) in Envoy's JSON form
    # (proto field names); `envoy_node` is its node as Envoy's local info has it
    # (--service-cluster, --service-node and --service-zone applied);
    # `command_line` is Envoy's admin.v3.CommandLineOptions as /server_info
    # prints it; `ignored` names the operational fields the proxy accepted and
    # does not act on (logged once at start-up).
    bootstrap: Mapping[str, Any] | None = field(default=None, compare=False)
    envoy_node: Mapping[str, Any] | None = field(default=None, compare=False)
    command_line: Mapping[str, Any] | None = field(default=None, compare=False)
    ignored: tuple[str, ...] = ()

    def cluster(self, name: str) -> Cluster:
        return next(c for c in self.clusters if c.name == name)

    @property
    def redirect(self) -> Listener | None:
        """The first listener of redirected traffic (the one ISTIO_PROXY_PORT names)."""
        return next((listener for listener in self.listeners if listener.original_dst), None)

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration as plain data (what `check` prints; load reads it back)."""
        plain: dict[str, Any] = _plain(self)
        # our YAML's spelling of the admin port: 0 is "off", "ephemeral" the kernel's choice
        plain["admin_port"] = {None: 0, 0: "ephemeral"}.get(self.admin_port, self.admin_port)
        return plain


def _plain(value: Any, top: bool = True) -> Any:
    """Plain data for `value`; below the top level, fields at their default are left out."""
    if isinstance(value, Endpoint):
        return str(value)
    if isinstance(value, WeightedCluster):
        return {"name": value.name, "weight": value.weight}
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name), False) for f in dataclasses.fields(value)
                if top or not _is_default(f, getattr(value, f.name))}
    if isinstance(value, tuple):
        return [_plain(v, False) for v in value]
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    return value


def _is_default(f: dataclasses.Field[Any], value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return bool(value == f.default)
    if f.default_factory is not dataclasses.MISSING:
        return bool(value == f.default_factory())
    return False
