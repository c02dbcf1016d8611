"""The pure parts of the Envoy-shaped admin API: the config dump and its FieldMask,
our YAML as a bootstrap, /logging's requests, /runtime and /server_info.

The expected answers were read from Envoy 1.40's own admin API on the same
bootstrap (tests/envoy/test_admin_side_by_side.py compares the two live).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy import config as cfg
from proxy import envoy_cli
from proxy.admin import asbootstrap, configdump, envoyinfo, fieldmask, loggers
from proxy.config.envoy import schema, validate

BOOTSTRAPS = Path(__file__).resolve().parents[1] / "envoy" / "bootstraps" / "valid"
ISTIO = BOOTSTRAPS / "istio-sidecar.yaml"
ADMIN = "type.googleapis.com/envoy.admin.v3."


def envoy_config(path: Path = ISTIO) -> cfg.Config:
    return envoy_cli.configure(envoy_cli.parse(["-c", str(path)]))


def dump(query: dict[str, str], config: cfg.Config | None = None) -> configdump.Reply:
    config = config or envoy_config()
    return configdump.render(configdump.bootstrap_data(config, envoyinfo.node(config.envoy_node)), 1.5e9, query)


def configs(reply: configdump.Reply) -> list[dict]:
    assert (reply.status, reply.content_type) == (200, "application/json"), reply
    return json.loads(reply.body).get("configs", [])


# --- the FieldMask, as Envoy applies it ---------------------------------------------------------

def clusters_dump():
    return configdump.sections(configdump.bootstrap_data(envoy_config(), {}), 0.0, False, lambda n: True)[1]


def test_mask_paths_as_protobuf_reads_them():
    assert fieldmask.paths("a.b,,c") == ["a.b", "c"] and fieldmask.paths(",") == []


def test_a_path_is_valid_only_through_singular_messages():
    descriptor = clusters_dump().DESCRIPTOR
    assert fieldmask.valid(descriptor, "static_clusters")
    assert not fieldmask.valid(descriptor, "static_clusters.cluster"), "through a repeated field"
    assert not fieldmask.valid(descriptor, "version_info.x"), "through a string"
    assert not fieldmask.valid(descriptor, "nope") and not fieldmask.valid(descriptor, "")


def test_trim_keeps_the_paths_and_clears_the_rest():
    boot = configdump.sections(configdump.bootstrap_data(envoy_config(), {"id": "n", "cluster": "c"}), 0.0, False,
                               lambda n: True)[0]
    assert fieldmask.trim(boot, ["bootstrap.node.id", "bootstrap.admin"])
    data = json.loads(configdump.to_json(boot))
    assert data == {"bootstrap": {"node": {"id": "n"}, "admin": {"address": {"socket_address": {
        "address": "127.0.0.1", "port_value": 15000}}}}}
    untouched = clusters_dump()
    before = untouched.SerializeToString()
    assert not fieldmask.trim(untouched, ["static_clusters", "nope"]) and untouched.SerializeToString() == before
    assert fieldmask.trim(untouched, []) and untouched.SerializeToString() == before, "no paths: nothing trimmed"


def test_a_longer_path_under_a_whole_field_changes_nothing():
    boot = configdump.sections(configdump.bootstrap_data(envoy_config(), {"id": "n", "cluster": "c"}), 0.0, False,
                               lambda n: True)[0]
    assert fieldmask.trim(boot, ["bootstrap.node", "bootstrap.node.id"])
    assert json.loads(configdump.to_json(boot))["bootstrap"]["node"] == {"id": "n", "cluster": "c"}


def test_a_resource_is_masked_through_its_any():
    element = clusters_dump().static_clusters[0]
    assert fieldmask.trim_resource(element, ["cluster.name", "last_updated"])
    data = json.loads(configdump.to_json(element))
    assert data["cluster"] == {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                               "name": "BlackHoleCluster"}
    assert set(data) == {"cluster", "last_updated"}
    assert not fieldmask.trim_resource(clusters_dump().static_clusters[0], ["cluster"]), "an empty inner path"
    assert not fieldmask.trim_resource(clusters_dump().static_clusters[0], ["cluster.nope"])


# --- /config_dump -------------------------------------------------------------------------------

def test_the_dump_is_an_admin_v3_config_dump_a_decoder_reads():
    reply = dump({"include_eds": ""})
    decoded = configdump.decode(reply.body)  # protobuf's own parser, as istioctl's decoder
    types = [c.type_url for c in decoded.configs]
    assert types == [ADMIN + t for t in ("BootstrapConfigDump", "ClustersConfigDump", "EndpointsConfigDump",
                                         "ListenersConfigDump", "SecretsConfigDump")]
    clusters = schema.message_class("envoy.admin.v3.ClustersConfigDump")()
    assert decoded.configs[1].Unpack(clusters)
    cluster = schema.message_class("envoy.config.cluster.v3.Cluster")()
    assert clusters.static_clusters[0].cluster.Unpack(cluster)
    names = [json.loads(configdump.to_json(c))["cluster"]["name"] for c in clusters.static_clusters]
    assert names == ["BlackHoleCluster", "InboundPassthroughCluster", "PassthroughCluster", "inbound|8080||"]
    assert cluster.name == "BlackHoleCluster" and cluster.connect_timeout.seconds == 10


def test_the_bootstrap_section_is_the_bootstrap_as_read_with_the_running_node():
    config = envoy_config()
    (boot,) = configs(dump({"mask": "bootstrap"}, config))
    assert boot["@type"] == ADMIN + "BootstrapConfigDump"
    node = boot["bootstrap"].pop("node")
    assert boot["bootstrap"] == {k: v for k, v in config.bootstrap.items() if k != "node"}
    assert node["id"] == config.envoy_node["id"] and node["user_agent_name"] == "sidecar-proxy"
    assert node["user_agent_build_version"]["version"] == {"major_number": 1, "minor_number": 40}
    assert "envoy.filters.network.tcp_proxy" in {e["name"] for e in node["extensions"]}


def test_a_whole_number_is_written_as_one():
    boot = configs(dump({"mask": "bootstrap.layered_runtime"}))[0]
    value = boot["bootstrap"]["layered_runtime"]["layers"][0]["static_layer"]
    assert value == {"overload.global_downstream_max_connections": 2147483647}
    assert '2147483647.0' not in dump({}).body


def test_resource_mask_and_name_regex():
    got = configs(dump({"resource": "static_clusters", "mask": "cluster.name", "name_regex": "Pass.*"}))
    assert got == [{"@type": ADMIN + "ClustersConfigDump.StaticCluster", "cluster": {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "PassthroughCluster"}}]
    assert configs(dump({"resource": "static_clusters", "name_regex": "Pass"})) == [], "a whole-name match"
    listeners = configs(dump({"resource": "static_listeners", "mask": "listener.name"}))
    assert [c["listener"]["name"] for c in listeners] == ["virtualOutbound", "virtualInbound"]
    assert configs(dump({"resource": "dynamic_active_clusters"})) == []
    endpoints = configs(dump({"resource": "static_endpoint_configs", "include_eds": "0"}))
    assert [e["endpoint_config"]["cluster_name"] for e in endpoints] == [
        "BlackHoleCluster", "InboundPassthroughCluster", "PassthroughCluster", "inbound|8080||"]
    assert endpoints[3]["endpoint_config"]["endpoints"][0]["lb_endpoints"][0]["health_status"] == "HEALTHY"
    assert configs(dump({"resource": "", "mask": ""})) == configs(dump({})), "empty is absent"


def test_a_mask_keeps_the_sections_it_fits():
    got = configs(dump({"mask": "static_clusters", "name_regex": "Black.*"}))
    assert [c["@type"] for c in got] == [ADMIN + "ClustersConfigDump"]
    assert [c["cluster"]["name"] for c in got[0]["static_clusters"]] == ["BlackHoleCluster"]


@pytest.mark.parametrize(("query", "status", "body"), [
    ({"mask": "nope"}, 400, "FieldMask nope could not be successfully applied to any configs."),
    ({"mask": "bootstrap.node.id,static_clusters"}, 400, "FieldMask bootstrap.node.id,static_clusters could not"),
    ({"resource": "static_clusters", "mask": "cluster"}, 400, "FieldMask "),
    ({"resource": "bootstrap"}, 400, "bootstrap is not a repeated field. Use ?mask=bootstrap to get only this field"),
    ({"resource": "nope"}, 404, "nope not found in config dump"),
    ({"resource": "static_endpoint_configs"}, 404, "static_endpoint_configs not found"),
    ({"name_regex": "("}, 400, "INVALID_ARGUMENT: Error while parsing name_regex from (: missing ): ("),
])
def test_refusals_are_envoys(query, status, body):
    reply = dump(query)
    assert (reply.status, reply.content_type) == (status, "text/plain") and reply.body.startswith(body), reply


# --- our YAML as a bootstrap ---------------------------------------------------------------------

OUR_YAML = """
mark: 0x1
clusters:
  - {name: web, endpoints: ["198.51.100.30:8080", "[2001:db8:2::30]:8080"], connect_timeout: 1s, mark: 0x2,
     lb_policy: least_request, source_address: 192.0.2.1, max_connections: 100}
  - {name: canary, endpoints: ["198.51.100.31:8080"]}
chains:
  - name: to-web
    match: {ports: [80, 8080], destinations: ["198.51.100.10/32"], sources: ["192.0.2.0/24"], source_ports: [40000],
            source_type: local, transport_protocol: raw_buffer}
    weighted: [{name: web, weight: 9}, {name: canary, weight: 1}]
    idle_timeout: 250ms
  - {name: no-smtp, match: {ports: [25]}, action: reject}
plain_listeners:
  - {name: local-web, port: 15080, cluster: web}
"""


def test_our_yaml_is_dumped_as_a_bootstrap_envoy_would_load(tmp_path):
    path = tmp_path / "proxy.yaml"
    path.write_text(OUR_YAML)
    config = cfg.load(str(path), env={})
    data = asbootstrap.bootstrap(config)
    validate.check(schema.parse(data))  # Envoy's schema and its protoc-gen-validate rules
    listener = data["static_resources"]["listeners"][0]
    assert listener["name"] == "redirect" and listener["address"]["socket_address"] == {
        "address": "::", "port_value": 5001, "ipv4_compat": True}
    assert listener["listener_filters"][0]["name"] == "envoy.filters.listener.original_dst"
    chains = {c["name"]: c for c in listener["filter_chains"]}
    assert set(chains) == {"to-web:80", "to-web:8080", "no-smtp"}, "one filter chain per port"
    web = chains["to-web:80"]
    assert web["filter_chain_match"] == {
        "destination_port": 80, "prefix_ranges": [{"address_prefix": "198.51.100.10", "prefix_len": 32}],
        "source_type": "SAME_IP_OR_LOOPBACK", "source_prefix_ranges": [{"address_prefix": "192.0.2.0", "prefix_len": 24}],
        "source_ports": [40000], "transport_protocol": "raw_buffer"}
    proxy = web["filters"][0]["typed_config"]
    assert proxy["weighted_clusters"] == {"clusters": [{"name": "web", "weight": 9}, {"name": "canary", "weight": 1}]}
    assert proxy["idle_timeout"] == "0.25s"
    assert chains["no-smtp"]["filters"][0]["typed_config"]["cluster"] == "blackhole"
    assert listener["default_filter_chain"]["filters"][0]["typed_config"]["cluster"] == "original_dst"
    clusters = {c["name"]: c for c in data["static_resources"]["clusters"]}
    assert set(clusters) == {"web", "canary", "original_dst", "blackhole"}
    assert clusters["web"]["upstream_bind_config"] == {
        "source_address": {"address": "192.0.2.1", "port_value": 0},
        "socket_options": [{"level": "1", "name": "36", "int_value": "2", "state": "STATE_PREBIND"}]}
    assert clusters["canary"]["upstream_bind_config"]["socket_options"][0]["int_value"] == "1", "the global mark"
    assert clusters["web"]["circuit_breakers"] == {"thresholds": [{"max_connections": 100}]}
    assert clusters["original_dst"]["type"] == "ORIGINAL_DST" and "load_assignment" not in clusters["blackhole"]
    assert data["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15000}
    decoded = configdump.decode(dump({}, config).body)
    assert len(decoded.configs) == 4


# --- /logging -----------------------------------------------------------------------------------

def test_logging_requests_as_envoy_reads_them():
    ours = ["proxy.listener"]
    assert loggers.requested([], ours) == (None, {})
    assert loggers.requested([("paths", ""), ("level", "")], ours) == (None, {}), "empty values are no parameter"
    assert loggers.requested([("level", "trace")], ours) == ("trace", {})
    assert loggers.requested([("admin", "debug")], ours) == (None, {"admin": "debug"})
    assert loggers.requested([("paths", "admin:debug,,main:error")], ours) == (None, {"admin": "debug",
                                                                                     "main": "error"})
    assert loggers.requested([("proxy.listener", "error")], ours) == (None, {"proxy.listener": "error"})
    for params, reason in (([("admin", "debug"), ("main", "info")], "invalid number of parameters"),
                           ([("nope", "debug")], "unknown logger name"),
                           ([("paths", " main:debug")], "unknown logger name"),
                           ([("admin", "warn")], "unknown logger level"),
                           ([("paths", "admin")], "empty logger name or empty logger level"),
                           ([("group", "admin:debug")], "group parameter requires fine-grain logging")):
        with pytest.raises(loggers.LoggingError, match=reason):
            loggers.requested(params, ours)


def test_envoy_levels_reach_our_loggers():
    levels = loggers.initial_levels("warning", "admin:debug,upstream:error")
    assert levels["a2a"] == "warning" and levels["admin"] == "debug" and list(levels)[:2] == ["a2a", "admin"]
    ours = dict(loggers.ours_from(levels))
    assert ours["proxy.admin"] == "debug"
    assert ours["proxy.listener"] == "warning", "connection (warning) is more verbose than upstream (error)"
    text = loggers.listing(levels, {"proxy.admin": "debug"})
    assert text.startswith("active loggers:\n  a2a: warning\n  admin: debug\n")
    assert text.endswith("  proxy.admin: debug\n\n")


# --- /runtime, /server_info ----------------------------------------------------------------------

def test_runtime_flattens_the_static_layers():
    bootstrap = {"layered_runtime": {"layers": [
        {"name": "base", "static_layer": {"a": {"b": 2147483647, "c": True}, "d": "text", "e": 0.5}},
        {"name": "admin", "admin_layer": {}},
        {"name": "over", "static_layer": {"d": "other"}}]}}
    assert envoyinfo.runtime(bootstrap) == {"entries": {
        "a.b": {"final_value": "2.14748e+09", "layer_values": ["2.14748e+09", "", ""]},
        "a.c": {"final_value": "true", "layer_values": ["true", "", ""]},
        "d": {"final_value": "other", "layer_values": ["text", "", "other"]},
        "e": {"final_value": "0.5", "layer_values": ["0.5", "", ""]},
    }, "layers": ["base", "admin", "over"]}
    assert envoyinfo.runtime(None) == {"entries": {}, "layers": []}


def test_server_info_has_envoys_keys():
    config = envoy_config()
    node = configdump.plain("envoy.config.core.v3.Node", envoyinfo.node(config.envoy_node), always_print=True)
    info = envoyinfo.server_info(config, "LIVE", 7, node)
    assert list(info) == ["version", "state", "uptime_current_epoch", "uptime_all_epochs", "hot_restart_version",
                          "command_line_options", "node", "hot_restart_initializing"]
    assert info["version"].split("/")[1] == "1.40.0" and info["uptime_current_epoch"] == "7s"
    assert info["node"]["locality"]["sub_zone"] == "" and info["node"]["client_features"] == []
    ours = envoyinfo.command_line(cfg.Config(concurrency=3, log_level="debug", drain_time=45.0))
    assert (ours["concurrency"], ours["log_level"], ours["drain_time"], ours["mode"]) == (3, "debug", "45s", "Serve")
    assert set(ours) == set(info["command_line_options"])


def test_memory_reports_this_process():
    figures = envoyinfo.memory()
    assert list(figures) == ["allocated", "heap_size", "pageheap_unmapped", "pageheap_free", "total_thread_cache",
                             "total_physical_bytes"]
    assert int(figures["total_physical_bytes"]) > 1 << 20 and int(figures["allocated"]) > 0
