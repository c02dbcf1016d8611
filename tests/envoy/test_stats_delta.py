"""The counters the proxy and real Envoy both keep move alike on the same traffic.

Istio's passthrough set-up (a listener with the original_dst filter, one
tcp_proxy to an ORIGINAL_DST cluster) gets the same connections through the
project's redirect rules, first as real Envoy 1.40, then as sidecar-envoy on
each event loop, on the same bootstrap file with the same command line, each
as UID 1337 in a fresh pod: echoes closed by the client, a half-close from
each side, a refused upstream. For every stat name both emit, the change over
the scenario must be equal (gauges: equal at the end).
test_datapath_conformance.py does the same over more traffic, with the few
names whose count depends on timing left out; here every name is compared.
"""

from __future__ import annotations

import functools
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from envoyproc import LOOPS, PROCESS_STATS, subject, write_bootstrap
from support import echo, recv_all

from proxy.demo.netns import PodWorld, ThreadedServer

pytestmark = pytest.mark.netns

REDIRECT = Path(__file__).resolve().parents[2] / "iptables" / "redirect.sh"
PORT = 15001
ECHO = ("198.51.100.10", 80)
BANNER = ("198.51.100.11", 80)  # says hello and closes first
REFUSED = ("198.51.100.12", 80)  # nobody listens

BOOTSTRAP = {
    "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}},
    "static_resources": {
        "listeners": [{
            "name": "virtualOutbound",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": PORT}},
            "listener_filters": [{"name": "envoy.filters.listener.original_dst", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}],
            "filter_chains": [{"name": "catch-all", "filters": [{
                "name": "envoy.filters.network.tcp_proxy", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "PassthroughCluster", "cluster": "PassthroughCluster"}}]}],
        }],
        "clusters": [{"name": "PassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                      "connect_timeout": "1s"}],
    },
}

def banner(conn: socket.socket) -> None:
    conn.sendall(b"hello\n")


def scenario(world: PodWorld) -> None:
    for _ in range(2):  # echo, then the client closes
        with world.pod.connect(ECHO) as c:
            c.sendall(b"hello")
            assert c.recv(5) == b"hello"
    with world.pod.connect(ECHO) as c:  # the client half-closes first
        c.sendall(b"12345678")
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b"12345678"
    with world.pod.connect(BANNER) as c:  # the server closes first
        assert recv_all(c) == b"hello\n"
    # the upstream refuses: the client, which has sent nothing, is closed with a FIN
    with world.pod.connect(REFUSED) as c:
        c.settimeout(5)
        assert c.recv(10) == b""


def side(kind: str, bootstrap_path: str) -> tuple[dict[str, int], dict[str, int]]:
    world = PodWorld()
    servers = [ThreadedServer(world.remote, ECHO, echo), ThreadedServer(world.remote, BANNER, banner)]
    try:
        world.pod.exec("sh", str(REDIRECT), "--method", "uid", "--proxy-port", str(PORT))
        runner = subject(kind, world.pod, bootstrap_path)
        try:
            before = runner.settled_stats()
            scenario(world)
            after = runner.settled_stats()
        finally:
            runner.stop()
        return before, after
    finally:
        for server in servers:
            server.close()
        world.close()


@pytest.fixture(scope="module")
def moved(netns_prerequisites):
    """subject -> (stats before, stats after) the scenario; each subject runs once, when first asked."""
    directory = tempfile.mkdtemp(prefix="scp-stats-")
    try:
        yield functools.cache(functools.partial(side, bootstrap_path=write_bootstrap(directory, BOOTSTRAP)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("loop", LOOPS)
def test_counters_both_keep_move_alike(moved, loop):
    envoy_before, envoy_after = moved("envoy")
    ours_before, ours_after = moved(loop)
    shared = sorted(set(envoy_after) & set(ours_after))
    assert len(shared) >= 25, f"too few names in common to compare: {shared}"
    for family in ("listener.0.0.0.0_15001.", "cluster.PassthroughCluster.", "tcp.PassthroughCluster."):
        assert any(n.startswith(family) for n in shared), f"no {family} stats in common"
    differ = []
    for name in shared:
        if name.startswith(PROCESS_STATS):
            continue
        gauge = name.endswith(("_active", "_buffered"))
        envoy = envoy_after[name] if gauge else envoy_after[name] - envoy_before.get(name, 0)
        ours = ours_after[name] if gauge else ours_after[name] - ours_before.get(name, 0)
        if envoy != ours:
            differ.append(f"{name}: envoy {envoy}, sidecar-envoy {ours}")
    assert not differ, f"counters that moved differently ({loop}):\n  " + "\n  ".join(differ)
