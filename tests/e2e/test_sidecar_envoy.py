"""`sidecar-envoy` run the way Istio's pilot-agent runs Envoy, with real traffic.

A throwaway pod namespace gets the project's own rules (iptables/redirect.sh,
uid method, the redirected port at 15001 as in Istio); sidecar-envoy starts
there as UID 1337 with pilot-agent's command line unchanged, on a bootstrap
shaped like the ones in Istio's docs: virtualOutbound on 15001 (original_dst
listener filter, use_original_dst, tcp_proxy to PassthroughCluster of type
ORIGINAL_DST), virtualInbound on 15006, and BlackHoleCluster. Then, through
the kernel's REDIRECT: an app's outbound connections (IPv4 and IPv6) reach
their original destinations with every byte intact, a blackholed port is
closed, an inbound connection reaches the app, the admin API counts it all,
the two workers run as UID 1337, and every log line has pilot-agent's format.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import tempfile
from pathlib import Path

import pytest
import yaml
from support import (
    PYTHON,
    ProxyProcess,
    Server,
    admin,
    children_of,
    digest_sink,
    identify,
    recv_line,
    stats_of,
    status_field,
    wait_until,
)

pytestmark = pytest.mark.netns

IPTABLES = Path(__file__).resolve().parents[2] / "iptables"
SIDECAR_ENVOY = str(Path(PYTHON).parent / "sidecar-envoy")
ISTIO_LOG_FORMAT = "%Y-%m-%dT%T.%fZ\t%l\tenvoy %n %g:%#\t%v\tthread=%t"
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\t(warning|error|critical)\tenvoy \w+ \S+:\d+\t.*"
                      r"\tthread=\d+")

TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ORIGINAL_DST = {"name": "envoy.filters.listener.original_dst",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3."
                                          "OriginalDst"}}


def tcp_proxy(cluster: str) -> list[dict]:
    return [{"name": "envoy.filters.network.tcp_proxy",
             "typed_config": {"@type": TCP_PROXY, "stat_prefix": cluster, "cluster": cluster}}]


def address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


BOOTSTRAP = {
    "node": {"id": "sidecar~192.0.2.1~app.default~default.svc.cluster.local", "cluster": "app.default"},
    "admin": {"address": address("127.0.0.1", 15000)},
    "stats_config": {"use_all_default_tags": False},
    "layered_runtime": {"layers": [{"name": "global config", "static_layer": {}}]},
    "static_resources": {
        "listeners": [
            {"name": "virtualOutbound", "address": address("0.0.0.0", 15001),
             "additional_addresses": [{"address": address("::", 15001)}],
             "use_original_dst": True, "traffic_direction": "OUTBOUND", "listener_filters": [ORIGINAL_DST],
             "filter_chains": [
                 {"name": "blocked-9", "filter_chain_match": {"destination_port": 9},
                  "filters": tcp_proxy("BlackHoleCluster")},
                 {"name": "virtualOutbound-catchall-tcp", "filters": tcp_proxy("PassthroughCluster")},
             ]},
            {"name": "virtualInbound", "address": address("0.0.0.0", 15006), "traffic_direction": "INBOUND",
             "listener_filters": [ORIGINAL_DST],
             "filter_chains": [{"name": "virtualInbound-blackhole", "filter_chain_match": {"destination_port": 15006},
                                "filters": tcp_proxy("BlackHoleCluster")}],
             "default_filter_chain": {"name": "virtualInbound-catchall-tcp",
                                      "filters": tcp_proxy("InboundPassthroughCluster")}},
        ],
        "clusters": [
            {"name": "PassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
             "connect_timeout": "10s"},
            {"name": "InboundPassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
             "connect_timeout": "10s"},
            {"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "10s"},
        ],
    },
}


@pytest.fixture
def bootstrap_file():
    """The bootstrap in a directory UID 1337 can read (root's temp dirs may be private)."""
    directory = tempfile.mkdtemp(prefix="scp-envoy-")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "envoy.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(BOOTSTRAP, f)
    os.chmod(path, 0o644)
    yield path
    shutil.rmtree(directory, ignore_errors=True)


def pilot_agent_argv(bootstrap: str) -> tuple[str, ...]:
    """pilot-agent's command line for Envoy (istio/pkg/envoy/proxy.go), verbatim but for the binary."""
    return (SIDECAR_ENVOY, "-c", bootstrap, "--drain-time-s", "45", "--drain-strategy", "immediate",
            "--local-address-ip-version", "v4", "--file-flush-interval-msec", "1000", "--disable-hot-restart",
            "--allow-unknown-static-fields", "--log-format", ISTIO_LOG_FORMAT, "-l", "warning",
            "--component-log-level", "misc:error", "--concurrency", "2")


def test_pilot_agents_command_line_through_redirect_rules(world, bootstrap_file):
    world.pod.exec("sh", str(IPTABLES / "redirect.sh"), "--method", "uid", "--proxy-port", "15001")
    servers = [Server(world.remote, ("198.51.100.20", 80), identify("web")),
               Server(world.remote, ("2001:db8:2::20", 80), identify("web6")),
               Server(world.remote, ("198.51.100.21", 80), digest_sink),
               Server(world.remote, ("198.51.100.20", 9), identify("blackholed")),
               Server(world.pod, (world.POD_V4, 8080), identify("app"))]
    proxy = ProxyProcess(world.pod, command=pilot_agent_argv(bootstrap_file), wait=False)
    try:
        wait_until(lambda: _ready(world), timeout=30, what="/ready to say LIVE")
        # outbound, redirected to 15001, forwarded to the original destination
        for addr, name in ((("198.51.100.20", 80), "web"), (("2001:db8:2::20", 80), "web6")):
            with world.pod.connect(addr) as c:
                assert recv_line(c).split()[0] == name
                c.sendall(b"ping\n")
                assert recv_line(c) == "ping\n"
        payload = os.urandom(3 << 20)
        with world.pod.connect(("198.51.100.21", 80)) as c:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)  # the half-close travels too: the sink answers only at EOF
            assert recv_line(c) == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n"
        # a port of BlackHoleCluster's chain: accepted by the proxy, then closed as Envoy
        # closes it (a FIN to a client that has sent nothing)
        with world.pod.connect(("198.51.100.20", 9)) as c:
            assert c.recv(100) == b""
        assert servers[3].accepted == []
        # inbound, from the remote namespace to the app in the pod
        with world.remote.connect((world.POD_V4, 8080)) as c:
            assert recv_line(c).split()[0] == "app"
        stats = stats_of(world.pod)
        assert stats["cluster.PassthroughCluster.upstream_cx_total"] >= 4
        assert stats["cluster.BlackHoleCluster.upstream_cx_none_healthy"] == 1
        assert stats["chain.blocked-9.cx_total"] == 1
        # the process and its two workers, all UID 1337 and no capabilities
        workers = children_of(proxy.pid)
        assert len(workers) == 2
        for pid in (proxy.pid, *workers):
            assert status_field(pid, "Uid").split()[0] == "1337" and int(status_field(pid, "CapEff"), 16) == 0
    finally:
        code = proxy.stop(signal.SIGTERM)
        for server in servers:
            server.close()
    assert code == 0
    assert proxy.raw, "no log line at all: the ignored operational fields should be named once"
    for line in proxy.raw:
        assert LOG_LINE.fullmatch(line), f"not in pilot-agent's --log-format: {line!r}"
    ignored = [line for line in proxy.raw if "accepted and not acted on" in line]
    assert len(ignored) == 1 and "stats_config, layered_runtime" in ignored[0]


def _ready(world) -> bool:
    try:
        return admin(world.pod, "GET", "/ready").brief() == (200, "LIVE\n")
    except OSError:
        return False
