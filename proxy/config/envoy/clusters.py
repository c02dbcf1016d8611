"""Envoy's clusters -> the model's: STATIC and ORIGINAL_DST, their endpoints,
balancing, connect timeout, circuit breaker, source address and SO_MARK.

A STATIC cluster without endpoints is Istio's BlackHoleCluster: every
connection to it is reset (and counted as upstream_cx_none_healthy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..model import DEFAULT_CLEANUP_INTERVAL, RESERVED_NAMES, Cluster, Endpoint
from ..values import ConfigError, parse_address
from .fields import Fields, enum_name, model_name, raw_buffer, seconds, socket_address

ENVOY_CONNECT_TIMEOUT = 5.0  # Cluster.connect_timeout's default
ENVOY_MAX_CONNECTIONS = 1024  # CircuitBreakers' default max_connections
SO_MARK = (1, 36)  # (SOL_SOCKET, SO_MARK) as a SocketOption's level and name

LB_POLICIES = {"ROUND_ROBIN": "round_robin", "LEAST_REQUEST": "least_request", "RANDOM": "random"}

CLUSTER_BUILT = ("name", "type", "connect_timeout", "lb_policy", "load_assignment", "circuit_breakers",
                 "upstream_bind_config", "transport_socket", "original_dst_lb_config", "cleanup_interval")
CLUSTER_IGNORED = (
    "alt_stat_name", "per_connection_buffer_limit_bytes", "max_requests_per_connection",
    "upstream_http_protocol_options", "common_http_protocol_options", "http_protocol_options",
    "http2_protocol_options", "typed_extension_protocol_options", "dns_refresh_rate", "dns_jitter",
    "dns_failure_refresh_rate", "respect_dns_ttl", "dns_lookup_family", "dns_resolvers", "use_tcp_for_dns_lookups",
    "dns_resolution_config", "typed_dns_resolver_config", "wait_for_warm_on_init",
    "ring_hash_lb_config", "maglev_lb_config", "least_request_lb_config", "round_robin_lb_config",
    "common_lb_config", "metadata", "protocol_selection", "upstream_connection_options",
    "close_connections_on_host_health_failure", "ignore_health_on_host_removal", "lrs_server",
    "lrs_report_endpoint_metrics", "track_timeout_budgets", "track_cluster_stats", "preconnect_policy",
    "connection_pool_per_downstream_connection",
)


def clusters(clusters: Sequence[Any], where: str, default_bind: tuple[str | None, int | None] | None,
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
    kind = enum_name(msg, "type")
    if kind not in ("STATIC", "ORIGINAL_DST"):
        raise ConfigError(f"{where}.type", f"{kind} is not supported (STATIC and ORIGINAL_DST only; xDS and DNS "
                                           "are not)")
    original = kind == "ORIGINAL_DST"
    policy = enum_name(msg, "lb_policy")
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
        raw_buffer(msg.transport_socket, f"{where}.transport_socket", fields)
    endpoints = () if original else _endpoints(msg.load_assignment, f"{where}.load_assignment", fields)
    source, mark = default_bind if default_bind is not None else (None, None)
    if msg.HasField("upstream_bind_config"):  # a cluster's own replaces the cluster manager's
        source, mark = bind_config(msg.upstream_bind_config, f"{where}.upstream_bind_config", fields)
    return Cluster(
        name=name, endpoints=endpoints, kind="original_dst" if original else "static",
        lb_policy="round_robin" if original else LB_POLICIES[policy],
        connect_timeout=seconds(msg.connect_timeout) if msg.HasField("connect_timeout") else ENVOY_CONNECT_TIMEOUT,
        mark=mark, source_address=source,
        max_connections=_max_connections(msg, f"{where}.circuit_breakers", fields),
        cleanup_interval=(seconds(msg.cleanup_interval) if msg.HasField("cleanup_interval")
                          else DEFAULT_CLEANUP_INTERVAL),
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
            address, _ = socket_address(endpoint.address, f"{here}.endpoint.address", fields)
            endpoints.append(address)
    if len(weights) > 1:
        raise ConfigError(f"{where}.endpoints", "not supported (endpoints of different load_balancing_weight)")
    return tuple(endpoints)


def bind_config(bind: Any, where: str, fields: Fields) -> tuple[str | None, int | None]:
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
