"""Rendering the admin API's formats: Envoy's text, JSON, Prometheus, /listeners, /clusters."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin import statsfmt as fmt
from proxy.admin.statsfmt import ClusterView, HostView, ListenerView, Stat
from proxy.datapath.stats import Stats, is_gauge, stat_address

STATS = [
    Stat("server.state", 0, gauge=True),
    Stat("listener.[__]_5001.downstream_cx_total", 7),
    Stat("listener.[__]_5001.downstream_cx_active", 2, gauge=True),
    Stat("cluster.web.upstream_cx_total", 3),
    Stat("cluster.web.upstream_cx_connect_timeout", 0, used=False),
    Stat("cluster.original_dst.upstream_cx_total", 4),
    Stat("chain.no-smtp.rejected", 1),
    Stat("direction.inbound.cx_total", 0, used=False),
]


def names(stats):
    return [s.name for s in stats]


# --- /stats text and JSON -------------------------------------------------------------

def test_text_is_sorted_name_colon_value_lines():
    assert fmt.render_text(fmt.select(STATS)) == (
        "chain.no-smtp.rejected: 1\n"
        "cluster.original_dst.upstream_cx_total: 4\n"
        "cluster.web.upstream_cx_connect_timeout: 0\n"
        "cluster.web.upstream_cx_total: 3\n"
        "direction.inbound.cx_total: 0\n"
        "listener.[__]_5001.downstream_cx_active: 2\n"
        "listener.[__]_5001.downstream_cx_total: 7\n"
        "server.state: 0\n"
    )


def test_json_is_envoys_stats_array():
    assert json.loads(fmt.render_json(fmt.select(STATS, pattern="^cluster\\.web"))) == {"stats": [
        {"name": "cluster.web.upstream_cx_connect_timeout", "value": 0},
        {"name": "cluster.web.upstream_cx_total", "value": 3},
    ]}
    assert fmt.render_json([]) == '{"stats":[]}'


def test_usedonly_keeps_what_was_written():
    assert "cluster.web.upstream_cx_connect_timeout" not in names(fmt.select(STATS, used_only=True))
    assert "server.state" in names(fmt.select(STATS, used_only=True))  # 0, but set


@pytest.mark.parametrize(("pattern", "expected"), [
    ("cx_total", ["cluster.original_dst.upstream_cx_total", "cluster.web.upstream_cx_total",
                  "direction.inbound.cx_total", "listener.[__]_5001.downstream_cx_total"]),  # partial match
    ("^server\\.state$", ["server.state"]),
    ("^(server\\.state|listener_manager\\.workers_started)", ["server.state"]),  # pilot-agent's
    ("[[]__[]]", ["listener.[__]_5001.downstream_cx_active", "listener.[__]_5001.downstream_cx_total"]),
    ("", names(fmt.select(STATS))),
    (None, names(fmt.select(STATS))),
])
def test_filter_is_an_re2_search(pattern, expected):
    assert names(fmt.select(STATS, pattern=pattern)) == expected


@pytest.mark.parametrize("pattern", ["(", "a(?=b)", "(a)\\1", "[z-a]"])
def test_a_bad_regex_is_a_bad_request(pattern):
    with pytest.raises(fmt.BadRequest, match=r"^Invalid re2 regex"):
        fmt.select(STATS, pattern=pattern)


def test_a_pathological_pattern_stays_linear():
    """Backtracking engines take exponential time on this; RE2 does not."""
    many = [Stat("a" * 40 + f".x{i}", i) for i in range(200)]
    assert fmt.select(many, pattern="^(a|aa)*$") == []


def test_format_param():
    assert fmt.format_param({}, fmt.STATS_FORMATS) == "text"
    assert fmt.format_param({"format": "json"}, fmt.LISTING_FORMATS) == "json"
    with pytest.raises(fmt.BadRequest, match="unknown format 'prometheus' \\(allowed: text, json\\)"):
        fmt.format_param({"format": "prometheus"}, fmt.LISTING_FORMATS)


# --- Prometheus ----------------------------------------------------------------------

@pytest.mark.parametrize(("name", "extracted", "tags"), [
    ("cluster.web.upstream_cx_total", "cluster.upstream_cx_total", (("envoy_cluster_name", "web"),)),
    ("cluster.web.v1.upstream_cx_total", "cluster.upstream_cx_total", (("envoy_cluster_name", "web.v1"),)),
    ("listener.0.0.0.0_5001.downstream_cx_total", "listener.downstream_cx_total",
     (("envoy_listener_address", "0.0.0.0_5001"),)),
    ("listener.[2001_db8__1]_5001.downstream_cx_total", "listener.downstream_cx_total",
     (("envoy_listener_address", "[2001_db8__1]_5001"),)),
    ("listener.admin.downstream_cx_total", "listener.admin.downstream_cx_total", ()),
    ("chain.to-web.cx_total", "chain.cx_total", (("chain_name", "to-web"),)),
    ("direction.inbound.cx_total", "direction.cx_total", (("direction", "inbound"),)),
    ("server.state", "server.state", ()),
    ("cluster_manager.cds.update_success", "cluster_manager.cds.update_success", ()),
    ("listener_manager.workers_started", "listener_manager.workers_started", ()),
])
def test_tag_extraction_follows_envoy(name, extracted, tags):
    assert fmt.extract_tags(name) == (extracted, tags)


def test_prometheus_groups_types_and_labels():
    text = fmt.render_prometheus(fmt.select(STATS))
    assert text.startswith("# TYPE envoy_chain_rejected counter\nenvoy_chain_rejected{chain_name=\"no-smtp\"} 1\n\n")
    assert ("# TYPE envoy_cluster_upstream_cx_total counter\n"
            "envoy_cluster_upstream_cx_total{envoy_cluster_name=\"original_dst\"} 4\n"
            "envoy_cluster_upstream_cx_total{envoy_cluster_name=\"web\"} 3\n\n") in text
    assert "# TYPE envoy_listener_downstream_cx_active gauge\n" in text
    assert text.endswith("# TYPE envoy_server_state gauge\nenvoy_server_state{} 0\n\n")
    assert text.count("# TYPE envoy_cluster_upstream_cx_total ") == 1


def test_prometheus_parses_with_the_reference_parser():
    families = {f.name: f for f in text_string_to_metric_families(fmt.render_prometheus(fmt.select(STATS)))}
    cx = families["envoy_cluster_upstream_cx"]  # the parser drops a counter's _total
    assert cx.type == "counter"
    assert {s.labels["envoy_cluster_name"]: s.value for s in cx.samples} == {"original_dst": 4, "web": 3}
    active = families["envoy_listener_downstream_cx_active"]
    assert active.type == "gauge" and active.samples[0].labels == {"envoy_listener_address": "[__]_5001"}
    assert families["envoy_server_state"].samples[0].value == 0
    assert sum(len(f.samples) for f in families.values()) == len(STATS)


def test_prometheus_escapes_label_values_and_names():
    weird = [Stat('chain.a"b\\c.cx_total', 1), Stat("server.some-thing.x", 2, gauge=True)]
    text = fmt.render_prometheus(weird)
    assert 'envoy_chain_cx_total{chain_name="a\\"b\\\\c"} 1\n' in text
    assert "envoy_server_some_thing_x{} 2\n" in text
    (chain,) = [f for f in text_string_to_metric_families(text) if f.name == "envoy_chain_cx"]
    assert chain.samples[0].labels == {"chain_name": 'a"b\\c'}


# --- /listeners and /clusters ---------------------------------------------------------

LISTENERS = [ListenerView("redirect", (("0.0.0.0", 5001), ("::", 5001))),
             ListenerView("local-web", (("127.0.0.1", 15080),))]


def test_listeners_text_and_json():
    assert fmt.render_listeners_text(LISTENERS) == (
        "redirect::0.0.0.0:5001\nredirect::[::]:5001\nlocal-web::127.0.0.1:15080\n")
    assert json.loads(fmt.render_listeners_json(LISTENERS)) == {"listener_statuses": [
        {"name": "redirect", "local_address": {"socket_address": {"address": "0.0.0.0", "port_value": 5001}},
         "additional_local_addresses": [{"socket_address": {"address": "::", "port_value": 5001}}]},
        {"name": "local-web", "local_address": {"socket_address": {"address": "127.0.0.1", "port_value": 15080}}},
    ]}


CLUSTERS = [ClusterView("web", (HostView("198.51.100.20", 8080, {"cx_total": 3, "cx_active": 1, "rq_total": 3}),
                                HostView("2001:db8:2::20", 8080, {})),
                        (fmt.Threshold("default", 100, 1024, 1024, 3), fmt.Threshold("high", 1024, 1024, 1024, 3)),
                        "web"),
            ClusterView("original_dst", ())]


def test_clusters_text_is_envoys():
    """Checked against Envoy 1.40's /clusters: the cluster's lines, then each host's, in this order."""
    lines = fmt.render_clusters_text(CLUSTERS).splitlines()
    host = "web::198.51.100.20:8080::"
    assert lines[:20] == [
        "web::observability_name::web",
        "web::default_priority::max_connections::100", "web::default_priority::max_pending_requests::1024",
        "web::default_priority::max_requests::1024", "web::default_priority::max_retries::3",
        "web::high_priority::max_connections::1024", "web::high_priority::max_pending_requests::1024",
        "web::high_priority::max_requests::1024", "web::high_priority::max_retries::3",
        "web::added_via_api::false", host + "cx_active::1", host + "cx_connect_fail::0",
        host + "cx_total::3", host + "rq_active::0", host + "rq_error::0", host + "rq_pending_active::0",
        host + "rq_success::0", host + "rq_timeout::0", host + "rq_total::3", host + "hostname::"]
    assert host + "health_flags::healthy" in lines and host + "success_rate::-1" in lines
    assert "web::[2001:db8:2::20]:8080::cx_total::0" in lines
    assert lines[-10:] == ["original_dst::observability_name::original_dst",
                           *(f"original_dst::{p}_priority::{name}::{value}" for p in ("default", "high")
                             for name, value in (("max_connections", 1024), ("max_pending_requests", 1024),
                                                 ("max_requests", 1024), ("max_retries", 3))),
                           "original_dst::added_via_api::false"]


def test_clusters_json_is_envoys_proto_json():
    """A field at its default is left out (a zero stat has no value, a counter no type), as Envoy's JSON."""
    out = json.loads(fmt.render_clusters_json(CLUSTERS))
    web = out["cluster_statuses"][0]
    assert web["name"] == "web" and "added_via_api" not in web and web["observability_name"] == "web"
    assert web["circuit_breakers"] == {"thresholds": [
        {"max_connections": 100, "max_pending_requests": 1024, "max_requests": 1024, "max_retries": 3},
        {"priority": "HIGH", "max_connections": 1024, "max_pending_requests": 1024, "max_requests": 1024,
         "max_retries": 3}]}
    host = web["host_statuses"][0]
    assert host["address"] == {"socket_address": {"address": "198.51.100.20", "port_value": 8080}}
    assert host["stats"] == [
        {"name": "cx_connect_fail"}, {"value": "3", "name": "cx_total"}, {"name": "rq_error"},
        {"name": "rq_success"}, {"name": "rq_timeout"}, {"value": "3", "name": "rq_total"},
        {"type": "GAUGE", "value": "1", "name": "cx_active"}, {"type": "GAUGE", "name": "rq_active"},
        {"type": "GAUGE", "name": "rq_pending_active"}]
    assert (host["health_status"], host["weight"], host["locality"]) == ({"eds_health_status": "HEALTHY"}, 1, {})
    assert "host_statuses" not in out["cluster_statuses"][1]


# --- the counters themselves -------------------------------------------------------------

def test_stats_declared_used_and_hosts():
    stats = Stats()
    stats.declare("cluster.web.upstream_cx_total", "cluster.web.upstream_cx_active")
    stats.inc("cluster.web.upstream_cx_active")
    stats.dec("cluster.web.upstream_cx_active")
    stats.inc("chain.a.cx_total", 2)
    assert stats.snapshot() == {"chain.a.cx_total": 2, "cluster.web.upstream_cx_active": 0,
                                "cluster.web.upstream_cx_total": 0}
    assert stats.used("cluster.web.upstream_cx_active") and not stats.used("cluster.web.upstream_cx_total")
    stats.host("web", "h1")["cx_total"] += 1
    assert stats.host("web", "h1")["cx_total"] == 1
    stats.host("web", "h2")["cx_active"] += 1
    stats.host("web", "h3")
    assert stats.sweep_hosts("web", keep={"h3"}) == 1  # h1 idle and not kept; h2 has a connection open
    assert list(stats.hosts["web"]) == ["h2", "h3"]
    assert is_gauge("listener.x.downstream_cx_active") and not is_gauge("listener.x.downstream_cx_total")
    assert stat_address("::", 5001) == "[__]_5001" and stat_address("127.0.0.1", 80) == "127.0.0.1_80"
