"""A Bootstrap message -> the proxy's model: listeners, chains, clusters, admin.

Only the transparent-TCP subset is built. Every field a bootstrap sets falls
in one of three kinds, decided here message by message (`Fields.only`):

* built: it becomes part of the model (a listener's address, a filter
  chain's match, tcp_proxy's cluster, a cluster's endpoints, ...);
* ignored: only operational (stats_config, layered_runtime, a listener's
  buffer limit, ...): accepted, not acted on, and named once at start-up
  (`Config.ignored`);
* anything else changes where bytes go and is not built here (TLS, HTTP,
  other network filters, EDS or DNS clusters, health checks, ...): a
  ConfigError naming the field, so the proxy exits 1 as Envoy does on a
  config it cannot take. Nothing is dropped silently.

Envoy's own checks beyond its schema that the subset depends on are made
here too, with Envoy's verdict: a listener needs an address and a filter
chain; no two listeners share an address; cluster names are unique; an
ORIGINAL_DST cluster has lb_policy CLUSTER_PROVIDED and no load assignment;
two filter chains of a listener may not match the same connection
(`check_ambiguous`, and a value listed twice in one chain). Where Envoy
accepts and moves on, so does this: a second listener of the same name is
ignored (Envoy keeps the first); tcp_proxy naming an unknown cluster closes
its connections.

Names. The model's names name stats (`cluster.<name>.`, `chain.<name>.`)
and must be made of letters, digits and `_ . - |`; any other character of an
Envoy name becomes `_` (Envoy's stats turn `:` into `_` too). A listener
without a name is named by its address (`0.0.0.0_15001`). A filter chain is
named by its `name`; one without is `<listener>-<index>` (its default chain
`<listener>-default`); a name taken already (chain names are unique across
listeners, since they name stats) becomes `<listener>.<name>`, and then
`<listener>.<name>-<index>` if that is taken too.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Sequence
from typing import Any

from ..load import check_ambiguous
from ..logformat import compile_format
from ..model import (
    RESERVED_NAMES,
    AccessLog,
    Chain,
    Cluster,
    Endpoint,
    IPNetwork,
    Listener,
    Match,
    WeightedCluster,
)
from ..values import NAME, ConfigError, parse_address
from . import schema
from .formats import check_format

ENVOY_CONNECT_TIMEOUT = 5.0  # Cluster.connect_timeout's default
ENVOY_IDLE_TIMEOUT = 3600.0  # TcpProxy.idle_timeout's default
ENVOY_MAX_CONNECTIONS = 1024  # CircuitBreakers' default max_connections
SO_MARK = (1, 36)  # (SOL_SOCKET, SO_MARK) as a SocketOption's level and name

TCP_PROXY = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ORIGINAL_DST_FILTER = "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
RAW_BUFFER = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
FILE_LOG = "envoy.extensions.access_loggers.file.v3.FileAccessLog"
STREAM_LOGS = {"envoy.extensions.access_loggers.stream.v3.StdoutAccessLog": "/dev/stdout",
               "envoy.extensions.access_loggers.stream.v3.StderrAccessLog": "/dev/stderr"}

LB_POLICIES = {"ROUND_ROBIN": "round_robin", "LEAST_REQUEST": "least_request", "RANDOM": "random"}
DIRECTIONS = {0: "any", 1: "inbound", 2: "outbound"}  # TrafficDirection
SOURCE_TYPES = {0: "any", 1: "local", 2: "external"}  # FilterChainMatch.ConnectionSourceType

# Why a field that is not built is refused, for the one line that names it.
WHY = {
    "transport_socket": "TLS is not supported",
    "transport_socket_matches": "TLS is not supported",
    "transport_socket_matcher": "TLS is not supported",
    "health_checks": "health checks are not supported",
    "outlier_detection": "outlier detection is not supported",
    "server_names": "needs a TLS inspector, which the proxy does not have",
    "application_protocols": "needs a TLS or HTTP inspector, which the proxy does not have",
    "filter_chain_matcher": "the matcher API is not supported (filter_chain_match is)",
    "dynamic_resources": "xDS is not supported: write the resources under static_resources",
    "hds_config": "xDS is not supported",
    "eds_cluster_config": "xDS is not supported",
    "fcds_config": "xDS is not supported",
    "config_discovery": "xDS is not supported",
    "on_demand": "xDS is not supported",
    "tunneling_config": "tunneling over HTTP is not supported",
    "api_listener": "HTTP is not supported",
    "udp_listener_config": "UDP is not supported",
}


class Fields:
    """Which fields of each message the proxy builds, ignores or refuses (see the module docstring)."""

    def __init__(self) -> None:
        self.ignored: list[str] = []

    def only(self, msg: Any, where: str, built: Iterable[str] = (), ignored: Iterable[str] = (),
             why: str | None = None) -> None:
        """Every field set in `msg` must be built or ignored; the ignored are noted."""
        built, ignored = set(built), set(ignored)
        for field, _ in msg.ListFields():
            if field.name in built:
                continue
            path = join(where, field.name)
            if field.name in ignored:
                self.ignored.append(path)
            else:
                raise ConfigError(path, f"not supported ({WHY.get(field.name, why or _default_why(msg))})")

    def note(self, path: str, reason: str) -> None:
        self.ignored.append(f"{path} ({reason})")


def _default_why(msg: Any) -> str:
    return f"the proxy builds the transparent-TCP subset of {msg.DESCRIPTOR.full_name}; see README"


def join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def seconds(duration: Any) -> float:
    return int(duration.seconds) + int(duration.nanos) / 1e9


def type_name(packed: Any) -> str:
    return str(packed.type_url).rpartition("/")[2]


def _enum_name(msg: Any, field: str) -> str:
    """The name of an enum field's value (STATIC, ROUND_ROBIN, ...)."""
    return str(msg.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[getattr(msg, field)].name)


def model_name(name: str) -> str:
    """An Envoy name as a model name: characters other than letters, digits, _ . - | become _."""
    return "".join(c if NAME.fullmatch(c) else "_" for c in name)


# --- the whole bootstrap ---------------------------------------------------------------------

BOOTSTRAP_IGNORED = (
    "node_context_params", "stats_sinks", "deferred_stat_options", "stats_config", "stats_flush_interval",
    "stats_flush_on_admin", "stats_eviction_interval", "watchdog", "watchdogs", "tracing", "layered_runtime",
    "overload_manager", "enable_dispatcher_stats", "header_prefix", "stats_server_version_override",
    "use_tcp_for_dns_lookups", "dns_resolution_config", "typed_dns_resolver_config", "fatal_actions",
    "inline_headers", "perf_tracing_file_path", "default_regex_engine", "application_log_config",
    "grpc_async_client_manager_config", "memory_allocator_manager", "flags_path", "certificate_provider_instances",
)


class Built:
    """What a bootstrap makes of the model (the rest of Config comes from the command line)."""

    def __init__(self) -> None:
        self.listeners: tuple[Listener, ...] = ()
        self.clusters: tuple[Cluster, ...] = ()
        self.admin: tuple[str, int] | None = None  # None: no admin API, as Envoy without `admin`
        self.ignored: tuple[str, ...] = ()


def build(bootstrap: Any) -> Built:
    """The model's parts from a parsed and validated Bootstrap message."""
    fields = Fields()
    fields.only(bootstrap, "", built=("node", "static_resources", "admin", "cluster_manager", "dynamic_resources"),
                ignored=BOOTSTRAP_IGNORED)
    if bootstrap.HasField("dynamic_resources") and bootstrap.dynamic_resources.ListFields():
        fields.only(bootstrap.dynamic_resources, "dynamic_resources", why=WHY["dynamic_resources"])
    out = Built()
    if bootstrap.HasField("admin"):
        out.admin = _admin(bootstrap.admin, "admin", fields)
    default_bind = None
    if bootstrap.HasField("cluster_manager"):
        manager = bootstrap.cluster_manager
        fields.only(manager, "cluster_manager", built=("upstream_bind_config",),
                    ignored=("local_cluster_name", "outlier_detection", "load_stats_config",
                             "enable_deferred_cluster_creation"))
        if manager.HasField("upstream_bind_config"):
            default_bind = _bind(manager.upstream_bind_config, "cluster_manager.upstream_bind_config", fields)
    static = bootstrap.static_resources
    fields.only(static, "static_resources", built=("listeners", "clusters"), ignored=("secrets",))
    out.clusters = _clusters(static.clusters, "static_resources.clusters", default_bind, fields)
    out.listeners = _listeners(static.listeners, "static_resources.listeners",
                               {c.name: c for c in out.clusters}, fields)
    out.ignored = tuple(fields.ignored)
    return out


def _admin(admin: Any, where: str, fields: Fields) -> tuple[str, int] | None:
    fields.only(admin, where, built=("address",),
                ignored=("access_log", "access_log_path", "profile_path", "socket_options", "ignore_global_conn_limit",
                         "allow_paths"))
    if not admin.HasField("address"):
        return None  # Envoy starts no admin API without an address
    endpoint, _ = _address(admin.address, f"{where}.address", fields, allow_zero=True)
    return endpoint.host, endpoint.port


def _address(address: Any, where: str, fields: Fields, allow_zero: bool = False) -> tuple[Endpoint, bool]:
    """A socket address (IP and port) and its ipv4_compat."""
    fields.only(address, where, built=("socket_address",),
                why="only socket addresses (IP and port) are supported, not pipes or internal addresses")
    if not address.HasField("socket_address"):
        raise ConfigError(where, "address is necessary (a socket_address)")
    sock = address.socket_address
    at = f"{where}.socket_address"
    fields.only(sock, at, built=("address", "port_value", "ipv4_compat", "protocol"),
                why="named ports, resolvers and network namespaces are not supported")
    if sock.protocol != 0:
        raise ConfigError(f"{at}.protocol", "not supported (UDP is not supported)")
    try:
        host = str(ipaddress.ip_address(sock.address))
    except ValueError:
        raise ConfigError(f"{at}.address", f"malformed IP address: {sock.address}") from None
    port = int(sock.port_value)
    if port == 0 and not allow_zero:
        raise ConfigError(f"{at}.port_value", "0 is not supported here (a port the kernel picks; see README)")
    return Endpoint(host, port), bool(sock.ipv4_compat)


# --- clusters ----------------------------------------------------------------------------------

CLUSTER_BUILT = ("name", "type", "connect_timeout", "lb_policy", "load_assignment", "circuit_breakers",
                 "upstream_bind_config", "transport_socket", "original_dst_lb_config")
CLUSTER_IGNORED = (
    "alt_stat_name", "per_connection_buffer_limit_bytes", "max_requests_per_connection",
    "upstream_http_protocol_options", "common_http_protocol_options", "http_protocol_options",
    "http2_protocol_options", "typed_extension_protocol_options", "dns_refresh_rate", "dns_jitter",
    "dns_failure_refresh_rate", "respect_dns_ttl", "dns_lookup_family", "dns_resolvers", "use_tcp_for_dns_lookups",
    "dns_resolution_config", "typed_dns_resolver_config", "wait_for_warm_on_init", "cleanup_interval",
    "ring_hash_lb_config", "maglev_lb_config", "least_request_lb_config", "round_robin_lb_config",
    "common_lb_config", "metadata", "protocol_selection", "upstream_connection_options",
    "close_connections_on_host_health_failure", "ignore_health_on_host_removal", "lrs_server",
    "lrs_report_endpoint_metrics", "track_timeout_budgets", "track_cluster_stats", "preconnect_policy",
    "connection_pool_per_downstream_connection",
)


def _clusters(clusters: Sequence[Any], where: str, default_bind: tuple[str | None, int | None] | None,
              fields: Fields) -> tuple[Cluster, ...]:
    out: list[Cluster] = []
    seen: dict[str, str] = {}  # model name -> Envoy name
    for i, msg in enumerate(clusters):
        at = f"{where}[{i}]"
        if msg.name in seen.values():
            raise ConfigError(f"{at}.name", f"cluster manager: duplicate cluster '{msg.name}'")
        cluster = _cluster(msg, at, default_bind, fields)
        if cluster.name in seen:
            raise ConfigError(f"{at}.name", f"{msg.name!r} and {seen[cluster.name]!r} are both {cluster.name!r} "
                                            "as the proxy names clusters (see README)")
        seen[cluster.name] = msg.name
        out.append(cluster)
    return tuple(out)


def _cluster(msg: Any, where: str, default_bind: tuple[str | None, int | None] | None, fields: Fields) -> Cluster:
    fields.only(msg, where, built=CLUSTER_BUILT, ignored=CLUSTER_IGNORED)
    name = model_name(msg.name)
    if name in RESERVED_NAMES:
        raise ConfigError(f"{where}.name", f"{name!r} is a name the proxy keeps for its own (see README)")
    kind = _enum_name(msg, "type")
    if kind not in ("STATIC", "ORIGINAL_DST"):
        raise ConfigError(f"{where}.type", f"{kind} is not supported (STATIC and ORIGINAL_DST only; xDS and DNS "
                                           "are not)")
    original = kind == "ORIGINAL_DST"
    policy = _enum_name(msg, "lb_policy")
    if original and policy != "CLUSTER_PROVIDED":
        raise ConfigError(f"{where}.lb_policy", f"cluster: LB policy {policy} is not valid for Cluster type "
                                                "ORIGINAL_DST. Only 'CLUSTER_PROVIDED' is allowed with cluster type "
                                                "'ORIGINAL_DST'")
    if not original and policy == "CLUSTER_PROVIDED":
        raise ConfigError(f"{where}.lb_policy", f"cluster provided LB specified but cluster '{msg.name}' did not "
                                                "provide one")
    if not original and policy not in LB_POLICIES:
        raise ConfigError(f"{where}.lb_policy", f"{policy} is not supported (ROUND_ROBIN, LEAST_REQUEST, RANDOM)")
    if original and msg.HasField("load_assignment"):
        raise ConfigError(f"{where}.load_assignment", "ORIGINAL_DST clusters must have no load assignment configured")
    if msg.HasField("original_dst_lb_config"):
        fields.only(msg.original_dst_lb_config, f"{where}.original_dst_lb_config",
                    ignored=("use_http_header", "http_header_name"))
    if msg.HasField("transport_socket"):
        _raw_buffer(msg.transport_socket, f"{where}.transport_socket", fields)
    endpoints = () if original else _endpoints(msg.load_assignment, f"{where}.load_assignment", fields)
    source, mark = default_bind if default_bind is not None else (None, None)
    if msg.HasField("upstream_bind_config"):  # a cluster's own replaces the cluster manager's
        source, mark = _bind(msg.upstream_bind_config, f"{where}.upstream_bind_config", fields)
    return Cluster(
        name=name, endpoints=endpoints, kind="original_dst" if original else "static",
        lb_policy="round_robin" if original else LB_POLICIES[policy],
        connect_timeout=seconds(msg.connect_timeout) if msg.HasField("connect_timeout") else ENVOY_CONNECT_TIMEOUT,
        mark=mark, source_address=source,
        max_connections=_max_connections(msg, f"{where}.circuit_breakers", fields),
    )


def _max_connections(msg: Any, where: str, fields: Fields) -> int:
    """The default priority's max_connections, Envoy's 1024 if nothing says otherwise."""
    if not msg.HasField("circuit_breakers"):
        return ENVOY_MAX_CONNECTIONS
    breakers = msg.circuit_breakers
    fields.only(breakers, where, built=("thresholds",), ignored=("per_host_thresholds",))
    limit = None
    for i, threshold in enumerate(breakers.thresholds):
        at = f"{where}.thresholds[{i}]"
        if threshold.priority != 0 or limit is not None:  # Envoy takes the first DEFAULT one; HIGH is for HTTP
            fields.note(at, "not the first threshold of the default priority, which TCP uses")
            continue
        fields.only(threshold, at, built=("max_connections", "priority"),
                    ignored=("max_pending_requests", "max_requests", "max_retries", "retry_budget",
                             "track_remaining", "max_connection_pools"))
        limit = int(threshold.max_connections.value) if threshold.HasField("max_connections") \
            else ENVOY_MAX_CONNECTIONS
    return ENVOY_MAX_CONNECTIONS if limit is None else limit


def _endpoints(assignment: Any, where: str, fields: Fields) -> tuple[Endpoint, ...]:
    """A STATIC cluster's endpoints (none: Istio's BlackHoleCluster, every connection reset)."""
    fields.only(assignment, where, built=("cluster_name", "endpoints", "policy"))
    if assignment.HasField("policy"):
        fields.only(assignment.policy, f"{where}.policy",
                    ignored=("overprovisioning_factor", "endpoint_stale_after", "weighted_priority_health"))
    endpoints: list[Endpoint] = []
    weights: set[int] = set()
    for i, locality in enumerate(assignment.endpoints):
        at = f"{where}.endpoints[{i}]"
        fields.only(locality, at, built=("lb_endpoints", "priority"),
                    ignored=("locality", "metadata", "load_balancing_weight", "proximity"))
        if locality.priority != 0:
            raise ConfigError(f"{at}.priority", "not supported (priorities other than 0: failover needs health "
                                                "checks, which are not supported)")
        for j, lb_endpoint in enumerate(locality.lb_endpoints):
            here = f"{at}.lb_endpoints[{j}]"
            fields.only(lb_endpoint, here, built=("endpoint", "health_status", "load_balancing_weight"),
                        ignored=("metadata",))
            if lb_endpoint.health_status not in (0, 1):  # UNKNOWN, HEALTHY: Envoy routes to no other
                raise ConfigError(f"{here}.health_status", "not supported (only UNKNOWN and HEALTHY endpoints)")
            weights.add(int(lb_endpoint.load_balancing_weight.value) if lb_endpoint.HasField("load_balancing_weight")
                        else 1)
            endpoint = lb_endpoint.endpoint
            fields.only(endpoint, f"{here}.endpoint", built=("address",), ignored=("health_check_config", "hostname"))
            address, _ = _address(endpoint.address, f"{here}.endpoint.address", fields)
            endpoints.append(address)
    if len(weights) > 1:
        raise ConfigError(f"{where}.endpoints", "not supported (endpoints of different load_balancing_weight)")
    return tuple(endpoints)


def _bind(bind: Any, where: str, fields: Fields) -> tuple[str | None, int | None]:
    """upstream_bind_config: the source address, and SO_MARK among its socket options."""
    fields.only(bind, where, built=("source_address", "socket_options", "freebind"))
    if bind.HasField("freebind") and bind.freebind.value:
        raise ConfigError(f"{where}.freebind", "not supported (binding to an address the host does not have)")
    source = None
    if bind.HasField("source_address"):
        at = f"{where}.source_address"
        fields.only(bind.source_address, at, built=("address", "port_value", "protocol", "ipv4_compat"))
        if bind.source_address.port_value:
            raise ConfigError(f"{at}.port_value", "not supported (a fixed source port)")
        source = parse_address(bind.source_address.address, f"{at}.address")
    mark = None
    for i, option in enumerate(bind.socket_options):
        at = f"{where}.socket_options[{i}]"
        fields.only(option, at, built=("level", "name", "int_value", "state"), ignored=("description", "type"))
        if (option.level, option.name) != SO_MARK or option.WhichOneof("value") != "int_value":
            raise ConfigError(at, "not supported (of the socket options, only SO_MARK: level 1, name 36, int_value)")
        value = int(option.int_value)
        if not 0 <= value <= 0xFFFFFFFF:
            raise ConfigError(f"{at}.int_value", f"{value} is not a mark (0-0xffffffff)")
        mark = value or None
    return source, mark


def _raw_buffer(socket: Any, where: str, fields: Fields) -> None:
    """A transport socket is fine if it is the plain one (raw_buffer); TLS is not supported."""
    fields.only(socket, where, built=("name", "typed_config"))
    if not socket.HasField("typed_config") or type_name(socket.typed_config) != RAW_BUFFER:
        raise ConfigError(where, f"not supported ({WHY['transport_socket']}; only raw_buffer)")


# --- listeners ---------------------------------------------------------------------------

LISTENER_BUILT = ("name", "address", "additional_addresses", "stat_prefix", "filter_chains", "use_original_dst",
                  "default_filter_chain", "listener_filters", "traffic_direction", "bind_to_port", "transparent",
                  "freebind")
LISTENER_IGNORED = (
    "per_connection_buffer_limit_bytes", "metadata", "drain_type", "listener_filters_timeout",
    "continue_on_listener_filters_timeout", "tcp_fast_open_queue_length", "connection_balance_config", "reuse_port",
    "enable_reuse_port", "access_log", "tcp_backlog_size", "max_connections_to_accept_per_socket_event",
    "ignore_global_conn_limit", "bypass_overload_manager",
)


class _Names:
    """Chain names, unique across listeners (see the module docstring)."""

    def __init__(self) -> None:
        self.taken: set[str] = set(RESERVED_NAMES)

    def chain(self, listener: str, name: str, fallback: str) -> str:
        if not name:
            candidate = f"{listener}-{fallback}"
        else:
            candidate = model_name(name)
            if candidate in self.taken:
                candidate = f"{listener}.{candidate}"
        if candidate in self.taken:
            candidate = f"{candidate}-{fallback}"
        self.taken.add(candidate)
        return candidate


def _listeners(listeners: Sequence[Any], where: str, clusters: dict[str, Cluster],
               fields: Fields) -> tuple[Listener, ...]:
    out: list[Listener] = []
    names: dict[str, int] = {}
    addresses: dict[Endpoint, str] = {}
    chain_names = _Names()
    for i, msg in enumerate(listeners):
        at = f"{where}[{i}]"
        if msg.name and msg.name in names:
            fields.note(at, f"a second listener named {msg.name!r}: Envoy keeps the first, "
                            f"{where}[{names[msg.name]}]")
            continue
        listener = _listener(msg, at, clusters, fields, chain_names)
        for address in listener.addresses:
            if address in addresses and addresses[address] != listener.name:
                raise ConfigError(f"{at}.address", f"error adding listener: '{listener.name}' has duplicate address "
                                                   f"'{address}' as existing listener")
            addresses[address] = listener.name
        if msg.name:
            names[msg.name] = i
        out.append(listener)
    return tuple(out)


def _listener(msg: Any, where: str, clusters: dict[str, Cluster], fields: Fields, names: _Names) -> Listener:
    fields.only(msg, where, built=LISTENER_BUILT, ignored=LISTENER_IGNORED)
    for flag in ("transparent", "freebind"):
        if msg.HasField(flag) and getattr(msg, flag).value:
            raise ConfigError(f"{where}.{flag}", "not supported (the proxy is reached by REDIRECT, not TPROXY)")
    if not msg.HasField("address"):
        raise ConfigError(f"{where}.address", f"error adding listener named '{msg.name}': address is necessary")
    first, compat = _address(msg.address, f"{where}.address", fields)
    endpoints, v4_on_v6 = [first], compat and first.host == "::"
    for i, extra in enumerate(msg.additional_addresses):
        at = f"{where}.additional_addresses[{i}]"
        fields.only(extra, at, built=("address",), why="socket options are not supported")
        endpoint, compat = _address(extra.address, f"{at}.address", fields)
        endpoints.append(endpoint)
        v4_on_v6 = v4_on_v6 or (compat and endpoint.host == "::")
    name = model_name(msg.name) if msg.name else model_name(str(first))
    original_dst = _listener_filters(msg.listener_filters, f"{where}.listener_filters", fields)
    if not msg.filter_chains and not msg.HasField("default_filter_chain"):
        raise ConfigError(f"{where}.filter_chains", f"error adding listener '{first}': no filter chains specified")
    chains = tuple(_chain(fc, f"{where}.filter_chains[{i}]", name, names.chain(name, fc.name, str(i)), clusters,
                          fields) for i, fc in enumerate(msg.filter_chains))
    _check_duplicates(msg.filter_chains, f"{where}.filter_chains")
    check_ambiguous(chains, f"{where}.filter_chains")
    default = None
    if msg.HasField("default_filter_chain"):
        fc = msg.default_filter_chain
        default = _chain(fc, f"{where}.default_filter_chain", name, names.chain(name, fc.name, "default"), clusters,
                         fields)
    return Listener(
        name=name, addresses=tuple(endpoints), chains=chains, default_chain=default, original_dst=original_dst,
        hand_off=bool(msg.use_original_dst.value), bind=msg.bind_to_port.value if msg.HasField("bind_to_port")
        else True, direction=DIRECTIONS[msg.traffic_direction], v4_on_v6=v4_on_v6,
        stat_prefix=msg.stat_prefix or None,
    )


def _listener_filters(filters: Sequence[Any], where: str, fields: Fields) -> bool:
    """Whether the original_dst listener filter is there (the only one supported)."""
    for i, listener_filter in enumerate(filters):
        at = f"{where}[{i}]"
        fields.only(listener_filter, at, built=("name", "typed_config"))
        if not listener_filter.HasField("typed_config"):
            raise ConfigError(at, f"Didn't find a registered implementation for '{listener_filter.name}' with type "
                                  "URL: ''")
        if type_name(listener_filter.typed_config) != ORIGINAL_DST_FILTER:
            raise ConfigError(at, f"not supported (listener filter {listener_filter.name!r}: of the listener "
                                  "filters, only envoy.filters.listener.original_dst)")
        fields.only(schema.unpack(listener_filter.typed_config, f"{at}.typed_config"), f"{at}.typed_config")
    return bool(filters)


def _check_duplicates(chains: Sequence[Any], where: str) -> None:
    """A value listed twice in one chain's match is overlapping rules to Envoy."""
    for i, fc in enumerate(chains):
        m = fc.filter_chain_match
        lists = {"prefix_ranges": [_cidr(c, "") for c in m.prefix_ranges],
                 "source_prefix_ranges": [_cidr(c, "") for c in m.source_prefix_ranges],
                 "direct_source_prefix_ranges": [_cidr(c, "") for c in m.direct_source_prefix_ranges],
                 "source_ports": list(m.source_ports)}
        for key, values in lists.items():
            if len(set(values)) != len(values):
                raise ConfigError(f"{where}[{i}].filter_chain_match.{key}",
                                  "multiple filter chains with overlapping matching rules are defined")


def _cidr(cidr: Any, where: str) -> IPNetwork:
    """A CidrRange as Envoy reads it: host bits dropped, a length past the family's clamped."""
    try:
        address = ipaddress.ip_address(cidr.address_prefix)
    except ValueError:
        raise ConfigError(f"{where}.address_prefix", f"malformed IP address: {cidr.address_prefix}") from None
    length = min(int(cidr.prefix_len.value), address.max_prefixlen)
    return ipaddress.ip_network(f"{address}/{length}", strict=False)


def _match(m: Any, where: str, fields: Fields) -> Match:
    fields.only(m, where, built=("destination_port", "prefix_ranges", "direct_source_prefix_ranges", "source_type",
                                 "source_prefix_ranges", "source_ports", "transport_protocol"))
    if m.transport_protocol not in ("", "raw_buffer"):
        raise ConfigError(f"{where}.transport_protocol", f"{m.transport_protocol!r} is not supported (it needs a TLS "
                                                         "inspector, which the proxy does not have; raw_buffer is)")
    return Match(
        ports=(int(m.destination_port.value),) if m.HasField("destination_port") else (),
        destinations=tuple(_cidr(c, f"{where}.prefix_ranges[{i}]") for i, c in enumerate(m.prefix_ranges)),
        sources=tuple(_cidr(c, f"{where}.source_prefix_ranges[{i}]") for i, c in enumerate(m.source_prefix_ranges)),
        direct_sources=tuple(_cidr(c, f"{where}.direct_source_prefix_ranges[{i}]")
                             for i, c in enumerate(m.direct_source_prefix_ranges)),
        source_ports=tuple(sorted({int(p) for p in m.source_ports})),
        source_type=SOURCE_TYPES[m.source_type],
        transport_protocol=m.transport_protocol,
    )


# --- a filter chain: tcp_proxy --------------------------------------------------------------

TCP_PROXY_BUILT = ("stat_prefix", "cluster", "weighted_clusters", "idle_timeout", "access_log",
                   "max_connect_attempts", "upstream_connect_mode")
TCP_PROXY_IGNORED = ("backoff_options", "hash_policy", "access_log_flush_interval", "flush_access_log_on_connected",
                     "access_log_options")


def _chain(fc: Any, where: str, listener: str, name: str, clusters: dict[str, Cluster], fields: Fields) -> Chain:
    fields.only(fc, where, built=("filter_chain_match", "filters", "transport_socket", "name"),
                ignored=("metadata", "transport_socket_connect_timeout"))
    if fc.HasField("transport_socket"):
        _raw_buffer(fc.transport_socket, f"{where}.transport_socket", fields)
    match = _match(fc.filter_chain_match, f"{where}.filter_chain_match", fields)
    if not fc.filters:  # Envoy closes a connection whose chain has no network filter
        return Chain(name=name, match=match, action="reject")
    for i, network_filter in enumerate(fc.filters):
        at = f"{where}.filters[{i}]"
        fields.only(network_filter, at, built=("name", "typed_config"))
        if not network_filter.HasField("typed_config"):
            raise ConfigError(at, f"Didn't find a registered implementation for '{network_filter.name}' with type "
                                  "URL: ''")
        kind = type_name(network_filter.typed_config)
        if kind != TCP_PROXY:
            what = "HTTP filters are not supported" if "http_connection_manager" in kind else \
                "of the network filters, only envoy.filters.network.tcp_proxy"
            raise ConfigError(at, f"not supported (network filter {network_filter.name!r}: {what})")
        if i != len(fc.filters) - 1:
            raise ConfigError(at, f"terminal filter named {network_filter.name} of type "
                                  "envoy.filters.network.tcp_proxy must be the last filter in a network filter chain")
    at = f"{where}.filters[0].typed_config"
    return _tcp_proxy(schema.unpack(fc.filters[0].typed_config, at), at, name, match, clusters, fields)


def _tcp_proxy(tcp: Any, where: str, name: str, match: Match, clusters: dict[str, Cluster], fields: Fields) -> Chain:
    fields.only(tcp, where, built=TCP_PROXY_BUILT, ignored=TCP_PROXY_IGNORED)
    if tcp.upstream_connect_mode != 0:
        raise ConfigError(f"{where}.upstream_connect_mode", "not supported (only IMMEDIATE)")
    weighted: tuple[WeightedCluster, ...] = ()
    if tcp.HasField("weighted_clusters"):
        picks = []
        for i, pick in enumerate(tcp.weighted_clusters.clusters):
            at = f"{where}.weighted_clusters.clusters[{i}]"
            fields.only(pick, at, built=("name", "weight"), why="metadata_match needs subsets, which are not "
                                                                "supported")
            picks.append(WeightedCluster(model_name(pick.name), int(pick.weight)))
        weighted = tuple(picks)
        wanted = [(f"{where}.weighted_clusters.clusters[{i}].name", p.name) for i, p in enumerate(weighted)]
    else:
        wanted = [(f"{where}.cluster", model_name(tcp.cluster))]
    missing = [(path, cluster) for path, cluster in wanted if cluster not in clusters]
    common = dict(name=name, match=match, stat_prefix=tcp.stat_prefix,
                  idle_timeout=_idle(tcp), max_connect_attempts=int(tcp.max_connect_attempts.value)
                  if tcp.HasField("max_connect_attempts") else 1,
                  access_logs=tuple(_access_log(log, f"{where}.access_log[{i}]", fields)
                                    for i, log in enumerate(tcp.access_log)))
    if missing:  # Envoy takes it, and closes each connection for want of a cluster
        for path, cluster in missing:
            fields.note(path, f"no cluster is named {cluster!r}: the chain's connections are closed, as Envoy's")
        return Chain(action="reject", **common)
    first = weighted[0].name if weighted else model_name(tcp.cluster)
    return Chain(action="cluster", cluster=first, weighted=weighted, **common)


def _idle(tcp: Any) -> float:
    """Envoy's default when unset; 0 (disabled, Envoy's 0s) is the model's "never" too."""
    return seconds(tcp.idle_timeout) if tcp.HasField("idle_timeout") else ENVOY_IDLE_TIMEOUT


def _access_log(log: Any, where: str, fields: Fields) -> AccessLog:
    """tcp_proxy's access_log: Envoy's file logger (or stdout/stderr) with a text format."""
    fields.only(log, where, built=("name", "typed_config"), ignored=("filter",))
    if not log.HasField("typed_config"):
        raise ConfigError(where, f"Didn't find a registered implementation for '{log.name}' with type URL: ''")
    at = f"{where}.typed_config"
    kind = type_name(log.typed_config)
    config = schema.unpack(log.typed_config, at)
    if kind in STREAM_LOGS:
        fields.only(config, at, built=("log_format",))
        path = STREAM_LOGS[kind]
    elif kind == FILE_LOG:
        fields.only(config, at, built=("path", "format", "log_format"), ignored=("json_format", "typed_json_format"))
        path = config.path
    else:
        raise ConfigError(at, f"not supported (access logger {kind}: the file, stdout and stderr ones are)")
    fmt = None
    if kind == FILE_LOG and config.format:
        fmt = config.format
    if config.HasField("log_format"):
        fmt = _format_string(config.log_format, f"{at}.log_format", fields)
    if fmt is not None:
        check_format(fmt, at)  # Envoy's verdict first, then whether the data path can write it
        try:
            compile_format(fmt)
        except ValueError as exc:
            raise ConfigError(at, f"not supported ({exc})") from None
    return AccessLog(path=path, format=fmt)


def _format_string(sfs: Any, where: str, fields: Fields) -> str | None:
    """A SubstitutionFormatString's text (None: JSON, which is not built; Envoy's default format then)."""
    fields.only(sfs, where, built=("text_format", "text_format_source"),
                ignored=("json_format", "omit_empty_values", "content_type", "formatters", "json_format_options"))
    if sfs.WhichOneof("format") == "text_format":
        return str(sfs.text_format)
    if sfs.WhichOneof("format") == "text_format_source":
        return _data_source(sfs.text_format_source, f"{where}.text_format_source", fields)
    return None


def _data_source(source: Any, where: str, fields: Fields) -> str:
    fields.only(source, where, built=("filename", "inline_bytes", "inline_string", "environment_variable"),
                ignored=("watched_directory",))
    which = source.WhichOneof("specifier")
    if which == "inline_string":
        return str(source.inline_string)
    if which == "inline_bytes":
        return bytes(source.inline_bytes).decode("utf-8", "replace")
    if which == "environment_variable":
        value = os.environ.get(source.environment_variable)
        if value is None:
            raise ConfigError(f"{where}.environment_variable", f"environment variable {source.environment_variable!r}"
                                                               " does not exist")
        return value
    if which == "filename":
        try:
            with open(source.filename, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise ConfigError(f"{where}.filename", f"cannot read {source.filename}: {exc.strerror}") from None
    return ""


def node_with(node: dict[str, Any], cluster: str = "", node_id: str = "", zone: str = "") -> dict[str, Any]:
    """The node as Envoy's local info has it: --service-cluster, --service-node, --service-zone win."""
    node = dict(node)
    if cluster:
        node["cluster"] = cluster
    if node_id:
        node["id"] = node_id
    if zone:
        node["locality"] = {**node.get("locality", {}), "zone": zone}
    return node

