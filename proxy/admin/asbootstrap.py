"""The model as an Envoy v3 bootstrap (plain data), for a proxy started from our own YAML. Pure.

A proxy started from an Envoy bootstrap dumps that bootstrap as it was read
(`Config.bootstrap`). One started from our YAML has none, so /config_dump
writes the model the way a bootstrap would say the same thing, and tools
that read Envoy's dump (istioctl proxy-config) find listeners, chains and
clusters where they look for them:

    listener                 -> Listener: address, additional_addresses (ipv4_compat on a dual-stack "::"),
                                the original_dst listener filter, use_original_dst, bind_to_port,
                                traffic_direction, stat_prefix
    chain                    -> FilterChain: filter_chain_match and one tcp_proxy; a chain with
                                several ports is one filter chain per port (Envoy takes one port a chain),
                                named <chain>:<port>
    action original          -> tcp_proxy to the cluster `original_dst` (type ORIGINAL_DST)
    action reject            -> tcp_proxy to the cluster `blackhole` (STATIC, no endpoints: Istio's
                                BlackHoleCluster, which resets as the proxy's reject does)
    cluster                  -> Cluster: STATIC or ORIGINAL_DST, lb_policy, connect_timeout, endpoints,
                                circuit_breakers (max_connections), upstream_bind_config (source address,
                                SO_MARK: the cluster's mark, else the global one), cleanup_interval
                                (ORIGINAL_DST, when not Envoy's 5 s)
    admin_address/admin_port -> admin.address

What Envoy has no field for is left out: a chain's `direction` (ours), the
connection limits, the bypass cgroup.
"""

from __future__ import annotations

from typing import Any

from ..config import DEFAULT_CLEANUP_INTERVAL, ORIGINAL_DST, Chain, Cluster, Config, Endpoint, Listener
from ..config.model import DEFAULT_IDLE_TIMEOUT

BLACKHOLE_CLUSTER = "blackhole"
TYPE = "type.googleapis.com/"
TCP_PROXY = TYPE + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ORIGINAL_DST_FILTER = TYPE + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
FILE_LOG = TYPE + "envoy.extensions.access_loggers.file.v3.FileAccessLog"
LB_POLICIES = {"round_robin": "ROUND_ROBIN", "random": "RANDOM", "least_request": "LEAST_REQUEST"}
SOURCE_TYPES = {"local": "SAME_IP_OR_LOOPBACK", "external": "EXTERNAL"}
SO_MARK = {"level": "1", "name": "36"}  # SOL_SOCKET, SO_MARK (int64 fields: strings in JSON)


def duration(seconds: float) -> str:
    """Seconds as protobuf's JSON Duration ("5s", "0.250s")."""
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"


def socket_address(endpoint: Endpoint, ipv4_compat: bool = False) -> dict[str, Any]:
    address: dict[str, Any] = {"address": endpoint.host, "port_value": endpoint.port}
    if ipv4_compat:
        address["ipv4_compat"] = True
    return {"socket_address": address}


def bootstrap(config: Config) -> dict[str, Any]:
    """The bootstrap that says what `config` says, as far as Envoy's fields can."""
    listeners = [_listener(listener, config) for listener in config.listeners]
    used = {cluster for listener in listeners for chain in _chains_of(listener)
            for cluster in _clusters_of(chain)}
    clusters = [_cluster(cluster, config) for cluster in config.clusters]
    if ORIGINAL_DST in used:
        clusters.append({"name": ORIGINAL_DST, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                         "connect_timeout": duration(config.connect_timeout)})
    if BLACKHOLE_CLUSTER in used:
        clusters.append({"name": BLACKHOLE_CLUSTER, "type": "STATIC",
                         "connect_timeout": duration(config.connect_timeout)})
    out: dict[str, Any] = {"node": {}, "static_resources": {"listeners": listeners, "clusters": clusters}}
    if config.admin_port is not None:
        out["admin"] = {"address": socket_address(Endpoint(config.admin_address, config.admin_port))}
    return out


def _chains_of(listener: dict[str, Any]) -> list[dict[str, Any]]:
    default = [listener["default_filter_chain"]] if "default_filter_chain" in listener else []
    return [*listener.get("filter_chains", []), *default]


def _clusters_of(chain: dict[str, Any]) -> list[str]:
    config = chain["filters"][0]["typed_config"]
    if "cluster" in config:
        return [config["cluster"]]
    return [c["name"] for c in config["weighted_clusters"]["clusters"]]


def _listener(listener: Listener, config: Config) -> dict[str, Any]:
    first, *rest = listener.addresses
    out: dict[str, Any] = {
        "name": listener.name,
        "address": socket_address(first, listener.v4_on_v6 and first.host == "::"),
    }
    if listener.stat_prefix:
        out["stat_prefix"] = listener.stat_prefix
    out["filter_chains"] = [c for chain in listener.chains for c in _filter_chains(chain, config)]
    if listener.hand_off:
        out["use_original_dst"] = True
    if not listener.bind:
        out["bind_to_port"] = False
    if listener.original_dst:
        out["listener_filters"] = [{"name": "envoy.filters.listener.original_dst",
                                    "typed_config": {"@type": ORIGINAL_DST_FILTER}}]
    if listener.direction != "any":
        out["traffic_direction"] = listener.direction.upper()
    if listener.default_chain is not None:
        out["default_filter_chain"] = _filter_chains(listener.default_chain, config, match=False)[0]
    if rest:
        out["additional_addresses"] = [{"address": socket_address(a, listener.v4_on_v6 and a.host == "::")}
                                       for a in rest]
    return out


def _filter_chains(chain: Chain, config: Config, match: bool = True) -> list[dict[str, Any]]:
    """One filter chain per destination port (Envoy's match takes one)."""
    filters = [{"name": "envoy.filters.network.tcp_proxy", "typed_config": _tcp_proxy(chain, config)}]
    if not match:
        return [{"filters": filters, "name": chain.name}]
    ports = chain.match.ports or (None,)
    out = []
    for port in ports:
        criteria = _match(chain, port)
        name = chain.name if len(ports) == 1 else f"{chain.name}:{port}"
        out.append({**({"filter_chain_match": criteria} if criteria else {}), "filters": filters, "name": name})
    return out


def _prefixes(networks: tuple[Any, ...]) -> list[dict[str, Any]]:
    return [{"address_prefix": str(n.network_address), "prefix_len": n.prefixlen} for n in networks]


def _match(chain: Chain, port: int | None) -> dict[str, Any]:
    m = chain.match
    out: dict[str, Any] = {}
    if port is not None:
        out["destination_port"] = port
    if m.destinations:
        out["prefix_ranges"] = _prefixes(m.destinations)
    if m.direct_sources:
        out["direct_source_prefix_ranges"] = _prefixes(m.direct_sources)
    if m.source_type in SOURCE_TYPES:
        out["source_type"] = SOURCE_TYPES[m.source_type]
    if m.sources:
        out["source_prefix_ranges"] = _prefixes(m.sources)
    if m.source_ports:
        out["source_ports"] = list(m.source_ports)
    if m.transport_protocol:
        out["transport_protocol"] = m.transport_protocol
    return out


def _tcp_proxy(chain: Chain, config: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"@type": TCP_PROXY, "stat_prefix": chain.stat_prefix or chain.name}
    if chain.action == "original":
        out["cluster"] = ORIGINAL_DST
    elif chain.action == "reject":
        out["cluster"] = BLACKHOLE_CLUSTER
    elif chain.weighted:
        out["weighted_clusters"] = {"clusters": [{"name": w.name, "weight": w.weight} for w in chain.weighted]}
    else:
        out["cluster"] = chain.cluster
    idle = config.idle_timeout if chain.idle_timeout is None else chain.idle_timeout
    if idle != DEFAULT_IDLE_TIMEOUT:
        out["idle_timeout"] = duration(idle)
    if chain.max_connect_attempts is not None:
        out["max_connect_attempts"] = chain.max_connect_attempts
    if chain.access_logs:
        out["access_log"] = [
            {"name": "envoy.access_loggers.file",
             "typed_config": {"@type": FILE_LOG, "path": log.path,
                              **({"log_format": {"text_format_source": {"inline_string": log.format}}}
                                 if log.format is not None else {})}}
            for log in chain.access_logs]
    return out


def _cluster(cluster: Cluster, config: Config) -> dict[str, Any]:
    original = cluster.kind == "original_dst"
    out: dict[str, Any] = {
        "name": cluster.name,
        "type": "ORIGINAL_DST" if original else "STATIC",
        "connect_timeout": duration(cluster.connect_timeout),
        "lb_policy": "CLUSTER_PROVIDED" if original else LB_POLICIES[cluster.lb_policy],
    }
    if not original and cluster.endpoints:
        out["load_assignment"] = {"cluster_name": cluster.name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": socket_address(e)}} for e in cluster.endpoints]}]}
    if original and cluster.cleanup_interval != DEFAULT_CLEANUP_INTERVAL:
        out["cleanup_interval"] = duration(cluster.cleanup_interval)
    if cluster.max_connections is not None:
        out["circuit_breakers"] = {"thresholds": [{"max_connections": cluster.max_connections}]}
    mark = cluster.mark if cluster.mark is not None else config.mark
    bind: dict[str, Any] = {}
    if cluster.source_address is not None:
        bind["source_address"] = {"address": cluster.source_address, "port_value": 0}
    if mark is not None:
        bind["socket_options"] = [{**SO_MARK, "int_value": str(mark), "state": "STATE_PREBIND"}]
    if bind:
        out["upstream_bind_config"] = bind
    return out
