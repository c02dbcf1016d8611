"""A Bootstrap message -> the proxy's model: listeners, chains, clusters, admin.

This module reads the bootstrap's top level and the admin address, and hands
the rest to clusters.py, listeners.py and tcp_proxy.py (fields.py has what
they share). Only the transparent-TCP subset is built. Every field a bootstrap sets falls
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

from typing import Any

from ..model import Cluster, Listener
from .clusters import bind_config, clusters
from .fields import WHY, Fields, socket_address
from .listeners import inbound_mode, listeners

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
        self.inbound_mode = "redirect"  # tproxy: a transparent listener with original_src (listeners.py)
        self.tproxy_mark: int | None = None


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
            default_bind = bind_config(manager.upstream_bind_config, "cluster_manager.upstream_bind_config", fields)
    static = bootstrap.static_resources
    fields.only(static, "static_resources", built=("listeners", "clusters"), ignored=("secrets",))
    out.clusters = clusters(static.clusters, "static_resources.clusters", default_bind, fields)
    out.listeners = listeners(static.listeners, "static_resources.listeners",
                               {c.name: c for c in out.clusters}, fields)
    out.inbound_mode, out.tproxy_mark = inbound_mode(static.listeners, "static_resources.listeners")
    out.ignored = tuple(fields.ignored)
    return out


def _admin(admin: Any, where: str, fields: Fields) -> tuple[str, int] | None:
    fields.only(admin, where, built=("address",),
                ignored=("access_log", "access_log_path", "profile_path", "socket_options", "ignore_global_conn_limit",
                         "allow_paths"))
    if not admin.HasField("address"):
        return None  # Envoy starts no admin API without an address
    endpoint, _ = socket_address(admin.address, f"{where}.address", fields, allow_zero=True)
    return endpoint.host, endpoint.port


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
