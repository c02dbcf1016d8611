"""Rendering the admin API's formats, as Envoy writes them. Pure: data in, text out.

/stats (text)          one `name: value` line per stat, sorted by name
/stats?format=json     {"stats":[{"name":..,"value":..},..]}
/stats/prometheus      Prometheus' text exposition format (0.0.4): Envoy's
                       tag-extracted names with an `envoy_` prefix, tags as labels
/listeners             `name::address` per listening socket; ?format=json
/clusters              `cluster::host::stat::value` per host; ?format=json

Filters work as Envoy's: `filter` is an RE2 regular expression searched in the
stat's full name (partial match unless anchored); `usedonly` keeps stats that
were ever written. RE2 (Envoy's engine) also runs in linear time, so no
pattern a client sends can stall the event loop the data path runs on.

Tag extraction follows Envoy's default rules for the families we have:

    cluster.<name>.<stat>       -> envoy_cluster_<stat>{envoy_cluster_name="<name>"}
    listener.<address>.<stat>   -> envoy_listener_<stat>{envoy_listener_address="<address>"}

and the same shape for our own families (labels without Envoy's prefix):

    chain.<name>.<stat>         -> envoy_chain_<stat>{chain_name="<name>"}
    direction.<dir>.<stat>      -> envoy_direction_<stat>{direction="<dir>"}

Everything else keeps its whole name: `server.state` -> `envoy_server_state{}`.
The part between the family and the last dot is the tag value, dots and all
(a listener address 0.0.0.0_5001, a cluster named web.v1).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import re2

from ..config import hostport
from ..datapath.stats import HOST_GAUGES, HOST_STATS

# family -> (tag extracted into a label, label name in Prometheus)
TAGGED = {
    "cluster": "envoy_cluster_name",
    "listener": "envoy_listener_address",
    "chain": "chain_name",
    "direction": "direction",
}
UNTAGGED_LISTENERS = ("admin",)  # Envoy leaves listener.admin.* whole

STATS_FORMATS = ("text", "json", "prometheus")
LISTING_FORMATS = ("text", "json")

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the 400 answer says what is wrong; no stderr noise


class Stat(NamedTuple):
    name: str
    value: int
    gauge: bool = False
    used: bool = True


class BadRequest(ValueError):
    """A request parameter that cannot be used; str() is the reason for the 400."""


# --- /stats ---------------------------------------------------------------------

def compile_filter(pattern: str | None) -> Callable[[str], bool] | None:
    """An RE2 search over stat names, or None for no filter."""
    if pattern is None or pattern == "":
        return None
    try:
        regex = re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise BadRequest(f"Invalid re2 regex {pattern!r}: {reason}") from None
    return lambda name: regex.search(name) is not None


def select(stats: Iterable[Stat], *, pattern: str | None = None, used_only: bool = False) -> list[Stat]:
    """The stats a request asks for, sorted by name."""
    keep = compile_filter(pattern)
    return sorted((s for s in stats if (not used_only or s.used) and (keep is None or keep(s.name))),
                  key=lambda s: s.name)


def render_text(stats: Sequence[Stat]) -> str:
    return "".join(f"{s.name}: {s.value}\n" for s in stats)


def render_json(stats: Sequence[Stat]) -> str:
    return json.dumps({"stats": [{"name": s.name, "value": s.value} for s in stats]}, separators=(",", ":"))


def extract_tags(name: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Envoy's tag extraction: (tag-extracted name, ((label, value), ...))."""
    family, _, rest = name.partition(".")
    middle, dot, leaf = rest.rpartition(".")
    label = TAGGED.get(family)
    if label is None or not dot or not middle or (family == "listener" and middle in UNTAGGED_LISTENERS):
        return name, ()
    return f"{family}.{leaf}", ((label, middle),)


_PROM_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_name(extracted: str) -> str:
    return "envoy_" + _PROM_INVALID.sub("_", extracted)


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_prometheus(stats: Sequence[Stat]) -> str:
    """One `# TYPE` line per metric, then its samples sorted by labels, then a blank line."""
    groups: dict[str, tuple[str, list[str]]] = {}
    for s in stats:
        extracted, tags = extract_tags(s.name)
        metric = prometheus_name(extracted)
        labels = ",".join(f'{_PROM_INVALID.sub("_", k)}="{_label_value(v)}"' for k, v in tags)
        kind = "gauge" if s.gauge else "counter"
        groups.setdefault(metric, (kind, []))[1].append(f"{metric}{{{labels}}} {s.value}\n")
    out = []
    for metric in sorted(groups):
        kind, samples = groups[metric]
        out.append(f"# TYPE {metric} {kind}\n")
        out.extend(sorted(samples))
        out.append("\n")
    return "".join(out)


# --- /listeners -------------------------------------------------------------------

class ListenerView(NamedTuple):
    name: str
    addresses: tuple[tuple[str, int], ...]  # (host, port) of each listening socket


def _socket_address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def render_listeners_text(listeners: Sequence[ListenerView]) -> str:
    return "".join(f"{view.name}::{hostport(h, p)}\n" for view in listeners for h, p in view.addresses)


def render_listeners_json(listeners: Sequence[ListenerView]) -> str:
    statuses = []
    for view in listeners:
        status: dict = {"name": view.name}
        if view.addresses:
            status["local_address"] = _socket_address(*view.addresses[0])
        if len(view.addresses) > 1:
            status["additional_local_addresses"] = [_socket_address(h, p) for h, p in view.addresses[1:]]
        statuses.append(status)
    return json.dumps({"listener_statuses": statuses}, indent=1)


# --- /clusters --------------------------------------------------------------------

# Per host, in Envoy's order: text sorts by name; JSON has the counters, then the gauges.
# rq_pending_active is Envoy's gauge of requests waiting for a connection: a TCP proxy
# that connects per connection never has one waiting.
TEXT_HOST_STATS = tuple(sorted((*HOST_STATS, "rq_pending_active")))
JSON_HOST_STATS = (*(n for n in TEXT_HOST_STATS if n not in HOST_GAUGES and n != "rq_pending_active"),
                   *(n for n in TEXT_HOST_STATS if n in HOST_GAUGES or n == "rq_pending_active"))
THRESHOLD_FIELDS = ("max_connections", "max_pending_requests", "max_requests", "max_retries")


class HostView(NamedTuple):
    host: str
    port: int
    stats: dict[str, int]  # HOST_STATS names; missing ones are 0
    hostname: str = ""  # an ORIGINAL_DST host's is its cluster's name and its address, as Envoy names it


class Threshold(NamedTuple):
    """A circuit-breaker threshold as Envoy prints it: (priority, max_connections, max_pending_requests,
    max_requests, max_retries); priority is "default" or "high"."""

    priority: str
    max_connections: int
    max_pending_requests: int
    max_requests: int
    max_retries: int


ENVOY_THRESHOLDS = (Threshold("default", 1024, 1024, 1024, 3), Threshold("high", 1024, 1024, 1024, 3))


class ClusterView(NamedTuple):
    name: str
    hosts: tuple[HostView, ...]
    thresholds: tuple[Threshold, ...] = ENVOY_THRESHOLDS
    observability_name: str = ""  # "": the name (the name its stats carry)


def render_clusters_text(clusters: Sequence[ClusterView]) -> str:
    """Envoy's text: per cluster its observability name, circuit breakers and `added_via_api`,
    then per host its stats and properties.

    There is no outlier detection or health checking, so each host is
    `healthy` as in an Envoy without them, and no line is printed for them.
    """
    out = []
    for c in clusters:
        out.append(f"{c.name}::observability_name::{c.observability_name or c.name}\n")
        for t in c.thresholds:
            out.extend(f"{c.name}::{t.priority}_priority::{name}::{getattr(t, name)}\n" for name in THRESHOLD_FIELDS)
        out.append(f"{c.name}::added_via_api::false\n")
        for h in c.hosts:
            prefix = f"{c.name}::{hostport(h.host, h.port)}::"
            out.extend(f"{prefix}{name}::{h.stats.get(name, 0)}\n" for name in TEXT_HOST_STATS)
            out.extend(f"{prefix}{key}::{value}\n" for key, value in (
                ("hostname", h.hostname), ("health_flags", "healthy"), ("weight", 1), ("region", ""),
                ("zone", ""), ("sub_zone", ""), ("canary", "false"), ("priority", 0),
                ("success_rate", -1), ("local_origin_success_rate", -1)))
    return "".join(out)


def _threshold_json(t: Threshold) -> dict:
    return {**({"priority": "HIGH"} if t.priority == "high" else {}),
            **{name: getattr(t, name) for name in THRESHOLD_FIELDS}}


def render_clusters_json(clusters: Sequence[ClusterView]) -> str:
    """Envoy's admin.v3.Clusters as protobuf's JSON: a field at its default (a zero, false,
    an empty list, COUNTER) is left out, uint64 stat values are strings."""
    statuses = []
    for c in clusters:
        status: dict = {"name": c.name}
        hosts = []
        for h in c.hosts:
            stats = []
            for name in JSON_HOST_STATS:
                value = h.stats.get(name, 0)
                gauge = name in HOST_GAUGES or name == "rq_pending_active"
                stats.append({**({"type": "GAUGE"} if gauge else {}), **({"value": str(value)} if value else {}),
                              "name": name})
            hosts.append({"address": _socket_address(h.host, h.port), "stats": stats,
                          "health_status": {"eds_health_status": "HEALTHY"}, "weight": 1,
                          **({"hostname": h.hostname} if h.hostname else {}), "locality": {}})
        if hosts:
            status["host_statuses"] = hosts
        status["circuit_breakers"] = {"thresholds": [_threshold_json(t) for t in c.thresholds]}
        status["observability_name"] = c.observability_name or c.name
        statuses.append(status)
    return json.dumps({"cluster_statuses": statuses}, indent=1)


def format_param(query: Mapping[str, str], allowed: tuple[str, ...]) -> str:
    """The `format` query parameter, checked against what an endpoint can write."""
    fmt = query.get("format", "text") or "text"
    if fmt not in allowed:
        raise BadRequest(f"unknown format {fmt!r} (allowed: {', '.join(allowed)})")
    return fmt
