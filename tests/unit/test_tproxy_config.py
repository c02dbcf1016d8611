"""inbound_mode, tproxy_mark and inbound_source: our YAML, the environment, Envoy's
bootstrap (a transparent listener with original_src), and the pure parts of the data
path that read them (the original destination of a TPROXY'd connection, the route to
the app)."""

from __future__ import annotations

import textwrap

import pytest

from proxy import config as cfg
from proxy.config.envoy import Options, load_bootstrap
from proxy.datapath.sockopts import tproxied_dst
from proxy.datapath.stats import Stats
from proxy.datapath.upstream import INBOUND_PASSTHROUGH_V4, Connector, OwnSockets


def write(tmp_path, text: str, name: str = "proxy.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_defaults_are_istios():
    c = cfg.load(None, env={})
    assert (c.inbound_mode, c.tproxy_mark, c.inbound_source) == ("redirect", 0x539, "pod-ip")


def test_yaml_and_environment(tmp_path):
    c = cfg.load(write(tmp_path, "inbound_mode: tproxy\ntproxy_mark: 0x2a\n"), env={})
    assert (c.inbound_mode, c.tproxy_mark) == ("tproxy", 0x2a)
    c = cfg.load(None, env={"INBOUND_INTERCEPTION_MODE": "tproxy", "INBOUND_TPROXY_MARK": "1337"})
    assert (c.inbound_mode, c.tproxy_mark) == ("tproxy", 1337)
    assert cfg.load(write(tmp_path, "inbound_source: 127.0.0.6\n"), env={}).inbound_source == "127.0.0.6"
    # Istio's spelling of the variable's values, as its injector writes them
    assert cfg.load(None, env={"INBOUND_INTERCEPTION_MODE": "TPROXY"}).inbound_mode == "tproxy"
    assert cfg.load(None, env={"INBOUND_INTERCEPTION_MODE": "REDIRECT"}).inbound_mode == "redirect"


@pytest.mark.parametrize(("text", "culprit"), [
    ("inbound_mode: nat\n", "inbound_mode"),
    ("inbound_mode: Tproxy\n", "inbound_mode"),
    ("tproxy_mark: 0\n", "tproxy_mark"),
    ("inbound_source: 127.0.0.7\n", "inbound_source"),
])
def test_bad_values_name_the_field(tmp_path, text, culprit):
    with pytest.raises(cfg.ConfigError) as exc:
        cfg.load(write(tmp_path, text), env={})
    assert culprit in str(exc.value) and "\n" not in str(exc.value)


def test_the_effective_config_loads_back(tmp_path):
    c = cfg.load(write(tmp_path, "inbound_mode: tproxy\ninbound_source: 127.0.0.6\n"), env={})
    assert cfg.from_data(c.to_dict()) == c


BOOTSTRAP = """\
static_resources:
  listeners:
  - name: virtualInbound
    address:
      socket_address: {address: 0.0.0.0, port_value: 15006}
    %(transparent)s
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    %(original_src)s
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: inbound
          cluster: InboundPassthroughCluster
  clusters:
  - name: InboundPassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
"""
ORIGINAL_SRC = """- name: envoy.filters.listener.original_src
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_src.v3.OriginalSrc
        mark: %d"""


def bootstrap(tmp_path, transparent: bool, mark: int | None) -> cfg.Config:
    text = BOOTSTRAP % {"transparent": "transparent: true" if transparent else "",
                        "original_src": ORIGINAL_SRC % mark if mark is not None else ""}
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    return load_bootstrap(Options(config_path=str(path)))


def test_a_transparent_listener_with_original_src_is_tproxy(tmp_path):
    c = bootstrap(tmp_path, True, 1337)
    assert (c.inbound_mode, c.tproxy_mark) == ("tproxy", 1337)
    assert bootstrap(tmp_path, False, None).inbound_mode == "redirect"


@pytest.mark.parametrize(("transparent", "mark", "where"), [
    (True, None, "static_resources.listeners[0].transparent"),
    (False, 1337, "static_resources.listeners[0].listener_filters[1]"),
    (True, 0, "static_resources.listeners[0].listener_filters[1].typed_config.mark"),
])
def test_one_without_the_other_is_refused(tmp_path, transparent, mark, where):
    with pytest.raises(cfg.ConfigError) as exc:
        bootstrap(tmp_path, transparent, mark)
    assert exc.value.where == where, str(exc.value)


@pytest.mark.parametrize(("sockname", "expected"), [
    (("::ffff:192.0.2.1", 8080, 0, 0), ("192.0.2.1", 8080)),  # TPROXY'd IPv4 on a dual-stack socket
    (("2001:db8:1::1", 443, 0, 0), ("2001:db8:1::1", 443)),
    (("192.0.2.1", 8080), ("192.0.2.1", 8080)),
    (("127.0.0.1", 5001), None),  # REDIRECTed: rewritten to the listener's own port
    (("::ffff:192.0.2.1", 5001, 0, 0), None),
])
def test_tproxied_destination(sockname, expected):
    assert tproxied_dst(sockname, 5001) == expected


class _Loop:
    """The connector only keeps the loop; nothing runs here."""


def connector(config: cfg.Config) -> Connector:
    return Connector(config, Stats(), OwnSockets(), _Loop(), lambda relay, message: None)  # type: ignore[arg-type]


def test_the_route_to_the_app():
    plain = connector(cfg.Config()).to_app
    assert (plain.bind_client, plain.source, plain.mark) == (False, None, None)
    tproxy = connector(cfg.Config(inbound_mode="tproxy", tproxy_mark=0x2a, mark=0x1)).to_app
    assert (tproxy.bind_client, tproxy.mark) == (True, 0x2a)
    passthrough = connector(cfg.Config(inbound_source="127.0.0.6")).to_app
    assert (passthrough.bind_client, passthrough.source) == (False, INBOUND_PASSTHROUGH_V4)
