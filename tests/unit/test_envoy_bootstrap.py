"""Envoy's bootstrap -> the model (proxy/config/envoy): what each field becomes.

tests/envoy compares the verdicts with real Envoy; these tests look at what
the accepted bootstraps build, and at the one-line errors.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy import config as cfg
from proxy.config.envoy import BOOTSTRAP_KEYS, Options, from_bootstrap, is_bootstrap, load_bootstrap

CORPUS = Path(__file__).resolve().parents[1] / "envoy" / "bootstraps"
ISTIO = CORPUS / "valid" / "istio-sidecar.yaml"


def load(path: Path, **options) -> cfg.Config:
    return load_bootstrap(Options(config_path=str(path), **options))


def write(tmp_path, text: str, name: str = "envoy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def listener(config: cfg.Config, name: str) -> cfg.Listener:
    return next(lr for lr in config.listeners if lr.name == name)


def test_an_istio_sidecar_bootstrap():
    c = load(ISTIO)
    out, inbound = listener(c, "virtualOutbound"), listener(c, "virtualInbound")
    assert out.addresses == (cfg.Endpoint("0.0.0.0", 15001),) and out.original_dst and out.hand_off
    assert (out.direction, inbound.direction, inbound.hand_off) == ("outbound", "inbound", False)
    assert out.default_chain is None and [ch.name for ch in out.chains] == ["virtualOutbound-catchall-tcp"]
    catchall = out.chains[0]
    assert (catchall.action, catchall.cluster, catchall.stat_prefix) == ("cluster", "PassthroughCluster",
                                                                          "PassthroughCluster")
    assert (catchall.idle_timeout, catchall.max_connect_attempts) == (3600.0, 1)  # Envoy's defaults, written out
    assert catchall.access_logs[0].path == "/dev/stdout" and "%UPSTREAM_HOST%" in catchall.access_logs[0].format
    port_8080 = inbound.chains[0]
    assert port_8080.name == "inbound|8080||" and port_8080.match.ports == (8080,)
    assert port_8080.match.transport_protocol == "raw_buffer"
    assert inbound.default_chain.name == "virtualInbound-catchall-tcp"
    clusters = {cl.name: cl for cl in c.clusters}
    assert clusters["PassthroughCluster"].kind == "original_dst" and clusters["PassthroughCluster"].endpoints == ()
    assert clusters["PassthroughCluster"].max_connections == 4294967295
    assert clusters["PassthroughCluster"].cleanup_interval == 5.0  # Envoy's default
    assert clusters["BlackHoleCluster"].kind == "static" and clusters["BlackHoleCluster"].endpoints == ()
    assert clusters["BlackHoleCluster"].max_connections == 1024  # Envoy's default threshold
    assert clusters["InboundPassthroughCluster"].source_address == "127.0.0.6"
    assert clusters["inbound|8080||"].endpoints == (cfg.Endpoint("127.0.0.1", 8080),)
    assert clusters["inbound|8080||"].connect_timeout == 10.0
    assert (c.admin_address, c.admin_port, c.access_log) == ("127.0.0.1", 15000, "off")
    assert set(c.ignored) == {"stats_config", "layered_runtime",
                              "static_resources.clusters[0].circuit_breakers.thresholds[0].max_pending_requests",
                              "static_resources.clusters[0].circuit_breakers.thresholds[0].max_requests",
                              "static_resources.clusters[0].circuit_breakers.thresholds[0].max_retries"}
    assert c.bootstrap["node"]["cluster"] == "app.default" and c.envoy_node["locality"]["zone"] == "doc-zone"
    assert c.bootstrap["static_resources"]["listeners"][0]["name"] == "virtualOutbound"


def test_the_model_round_trips_through_plain_data():
    """How a worker gets its configuration: to_dict, then from_data."""
    for path in sorted((CORPUS / "valid").glob("*.yaml")):
        if "flags:" in path.read_text():
            continue
        c = load(path)
        again = cfg.from_data(c.to_dict())
        assert again == c, path.name
        assert (again.bootstrap, again.envoy_node, again.ignored) == (c.bootstrap, c.envoy_node, c.ignored), path.name


def test_no_setting_of_ours_looks_like_a_bootstrap():
    """`check` prints our settings; reading them back must not take them for a bootstrap."""
    assert not {f.name for f in dataclasses.fields(cfg.Config)} & BOOTSTRAP_KEYS
    assert not is_bootstrap(cfg.Config().to_dict()) and not is_bootstrap(load(ISTIO).to_dict())
    assert is_bootstrap({"staticResources": {}}) and is_bootstrap({"admin": {}}) and not is_bootstrap([])


def test_names_the_proxy_gives_unnamed_and_clashing_chains(tmp_path):
    tcp = """{filters: [{name: t, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: c}}]}"""
    path = write(tmp_path, f"""\
        static_resources:
          listeners:
          - address: {{socket_address: {{address: 0.0.0.0, port_value: 15001}}}}
            filter_chains:
            - {tcp[:-1]}, filter_chain_match: {{destination_port: 80}}}}
            - {tcp}
          - name: "in:bound"
            address: {{socket_address: {{address: 0.0.0.0, port_value: 15006}}}}
            filter_chains:
            - {tcp[:-1]}, name: web, filter_chain_match: {{destination_port: 80}}}}
            - {tcp[:-1]}, name: web}}
            default_filter_chain: {tcp}
          - name: other
            address: {{socket_address: {{address: 0.0.0.0, port_value: 15007}}}}
            filter_chains: [{tcp[:-1]}, name: web}}, {tcp[:-1]}, name: passthrough, filter_chain_match: {{destination_port: 1}}}}]
          clusters: [{{name: c}}]
        """)
    c = load(path)
    assert [lr.name for lr in c.listeners] == ["0.0.0.0_15001", "in_bound", "other"]
    assert [ch.name for ch in c.listeners[0].chains] == ["0.0.0.0_15001-0", "0.0.0.0_15001-1"]
    assert [ch.name for ch in c.listeners[1].chains] == ["web", "in_bound.web"]
    assert c.listeners[1].default_chain.name == "in_bound-default"
    assert [ch.name for ch in c.listeners[2].chains] == ["other.web", "other.passthrough"]
    # Envoy's %FILTER_CHAIN_NAME% prints the bootstrap's names ("-" for none), whatever the model's
    logged = [ch.log_name for lr in c.listeners for ch in (*lr.chains, lr.default_chain) if ch is not None]
    assert logged == ["", "", None, "web", "", "web", "passthrough"]
    entry = {"chain": c.listeners[2].chains[1].log_name}
    assert cfg.compile_format("%FILTER_CHAIN_NAME%")(entry) == "passthrough"
    assert cfg.compile_format("%FILTER_CHAIN_NAME%")({"chain": ""}) == "-"
    assert cfg.from_data(c.to_dict()).listeners[2].chains[1].log_name == "passthrough"  # as a worker gets it


def test_what_envoy_accepts_and_moves_on_from(tmp_path):
    c = load(CORPUS / "valid" / "duplicate-listener-name.yaml")
    assert [lr.addresses[0].port for lr in c.listeners] == [15001]  # Envoy keeps the first
    assert any("a second listener named 'out'" in note for note in c.ignored)
    c = load(CORPUS / "valid" / "tcp-proxy-unknown-cluster.yaml")
    assert c.listeners[0].chains[0].action == "close"
    assert any("no cluster is named 'no-such-cluster'" in note for note in c.ignored)
    c = load(CORPUS / "valid" / "empty-filters.yaml")
    assert c.listeners[0].chains[0].action == "close"


def test_timeouts_attempts_weights_and_policies():
    c = load(CORPUS / "valid" / "tcp-proxy-timeouts.yaml")
    chain = c.listeners[0].chains[0]
    assert chain.idle_timeout == 0 and chain.max_connect_attempts == 3  # 0: never, as Envoy's 0s
    chain = load(CORPUS / "valid" / "weighted-clusters.yaml").listeners[0].chains[0]
    assert chain.weighted == (cfg.WeightedCluster("web", 9), cfg.WeightedCluster("canary", 1))
    assert chain.cluster == "web"
    policies = [cl.lb_policy for cl in load(CORPUS / "valid" / "lb-policies.yaml").clusters]
    assert policies == ["round_robin", "random", "least_request"]
    assert load(CORPUS / "valid" / "circuit-breakers.yaml").clusters[0].max_connections == 2  # the first DEFAULT


def test_upstream_bind_config_source_and_mark():
    clusters = load(CORPUS / "valid" / "upstream-bind-config.yaml").clusters
    assert (clusters[0].source_address, clusters[0].mark) == ("192.0.2.1", 1)
    assert (clusters[1].source_address, clusters[1].mark) == ("192.0.2.1", None)  # cluster_manager's


def test_matches_are_envoys():
    chains = load(CORPUS / "valid" / "every-match-field.yaml").listeners[0].chains
    m = chains[0].match
    assert m.ports == (80,) and [str(n) for n in m.destinations] == ["198.51.100.0/24", "2001:db8:2::/64"]
    assert [str(n) for n in m.sources] == ["192.0.2.0/24"] and [str(n) for n in m.direct_sources] == ["192.0.2.0/25"]
    assert (m.source_type, m.source_ports, m.transport_protocol) == ("external", (40000, 40001), "raw_buffer")
    assert chains[1].match.source_type == "local"
    masked = [str(ch.match.destinations[0]) for ch in
              load(CORPUS / "valid" / "prefix-host-bits-and-long-length.yaml").listeners[0].chains]
    assert masked == ["10.0.0.0/8", "198.51.100.7/32", "0.0.0.0/0"]  # no prefix_len: 0


def test_ipv6_and_listener_flags():
    c = load(CORPUS / "valid" / "ipv6-listeners.yaml")
    assert c.listeners[0].addresses == (cfg.Endpoint("::", 15001), cfg.Endpoint("::1", 15001))
    assert c.listeners[0].v4_on_v6 and c.clusters[0].endpoints == (cfg.Endpoint("2001:db8:2::10", 8080),)
    c = load(CORPUS / "valid" / "direction-and-bind.yaml")
    assert [(lr.direction, lr.bind, lr.hand_off) for lr in c.listeners] == [("outbound", True, True),
                                                                             ("inbound", False, False)]


def test_config_yaml_merges_as_protobuf_merges(tmp_path):
    """A scalar replaces, a list appends, a message merges (what Envoy's /config_dump shows: tests/e2e)."""
    c = load_bootstrap(Options(config_path=str(ISTIO), config_yaml=textwrap.dedent("""\
        node: {id: other}
        static_resources:
          clusters: [{name: extra}]
        """)))
    assert c.bootstrap["node"]["id"] == "other" and c.bootstrap["node"]["cluster"] == "app.default"
    assert [cl.name for cl in c.clusters][-1] == "extra" and len(c.clusters) == 5
    c = load_bootstrap(Options(config_path=str(ISTIO), config_yaml=textwrap.dedent("""\
        static_resources:
          clusters: [{name: fast, type: ORIGINAL_DST, lb_policy: CLUSTER_PROVIDED, cleanup_interval: 0.25s}]
        """)))
    assert c.clusters[-1].cleanup_interval == 0.25
    c = load_bootstrap(Options(config_path=str(ISTIO), service_node="n", service_cluster="k", service_zone="z"))
    assert c.bootstrap["node"]["id"].startswith("sidecar~")  # the bootstrap stays as loaded
    assert (c.envoy_node["id"], c.envoy_node["cluster"], c.envoy_node["locality"]) == (
        "n", "k", {"region": "doc-region", "zone": "z"})


@pytest.mark.parametrize(("text", "message"), [
    ("static_resources: {listeners: [{name: l, bogus: 1}]}",
     "envoy.yaml:1: static_resources.listeners[0].bogus: unknown field (in envoy.config.listener.v3.Listener)"),
    ("static_resources:\n  clusters:\n  - name: c\n    transport_socket: {name: tls}\n",
     "envoy.yaml:4: static_resources.clusters[0].transport_socket: not supported (TLS is not supported; only "
     "raw_buffer)"),
    ("staticResources:\n  clusters:\n  - name: c\n    connectTimeout: 0s\n",
     "envoy.yaml:4: static_resources.clusters[0].connect_timeout: value must be greater than 0s"),
    ("static_resources:\n  clusters:\n  - name: c\n    cleanup_interval: 0s\n",
     "envoy.yaml:4: static_resources.clusters[0].cleanup_interval: value must be greater than 0s"),
    ("static_resources:\n  clusters:\n  - name: c\n    type: EDS\n",
     "envoy.yaml:4: static_resources.clusters[0].type: EDS is not supported (STATIC and ORIGINAL_DST only; xDS and "
     "DNS are not)"),
    ("dynamic_resources: {lds_config: {path: /x}}",
     "envoy.yaml:1: dynamic_resources.lds_config: not supported (xDS is not supported: write the resources under "
     "static_resources)"),
])
def test_errors_name_file_line_and_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(cfg.ConfigError) as err:
        load(path)
    assert str(err.value) == str(path) + message[len("envoy.yaml"):]


def test_sidecar_proxy_check_reads_a_bootstrap(tmp_path):
    run = [sys.executable, "-m", "proxy", "check", "--config", str(ISTIO)]
    out = subprocess.run(run, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "name: virtualOutbound" in out.stdout and "bootstrap:" in out.stdout
    effective = write(tmp_path, out.stdout, "effective.yaml")  # check's output is our YAML, and loads again
    assert cfg.load(str(effective), env={}) == load(ISTIO)
    out = subprocess.run([*run, "--port", "5001"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Envoy bootstrap" in out.stderr
    out = subprocess.run([*run[:-1], str(CORPUS / "unsupported" / "tls-transport-socket.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "transport_socket: not supported" in out.stderr
    assert from_bootstrap({"admin": {}}).admin_port is None
