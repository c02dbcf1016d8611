"""The counters the proxy and real Envoy both keep move alike on the same traffic.

Istio's passthrough set-up (a listener with the original_dst filter, one
tcp_proxy to an ORIGINAL_DST cluster) gets the same connections through the
project's redirect rules, first as real Envoy 1.40, then as the proxy, each
as UID 1337 in a fresh pod: echoes closed by the client, a half-close from
each side, a refused upstream. For every stat name both emit, the change over
the scenario must be equal (gauges: equal at the end).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path

import pytest
from envoyproc import EnvoyProcess
from support import admin, echo, recv_all

from proxy.demo.netns import PodWorld, ThreadedServer
from proxy.demo.sandbox import ProxyProcess

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

# the same in the proxy's own long form (until it reads the bootstrap itself)
CONFIG = {
    "access_log": "off",
    "clusters": [{"name": "PassthroughCluster", "kind": "original_dst", "connect_timeout": "1s"}],
    "listeners": [{"name": "virtualOutbound", "addresses": [f"0.0.0.0:{PORT}"], "original_dst": True,
                   "chains": [{"name": "catch-all", "cluster": "PassthroughCluster",
                               "stat_prefix": "PassthroughCluster", "max_connect_attempts": 1}]}],
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
    # the upstream refuses: the client is closed (Envoy) or reset (the proxy), maybe before connect() returns
    with contextlib.suppress(ConnectionResetError), world.pod.connect(REFUSED) as c:
        c.settimeout(5)
        assert c.recv(10) == b""


def stats_of(kind: str, runner, world: PodWorld) -> dict[str, int]:
    if kind == "envoy":
        return runner.stats()
    data = json.loads(admin(world.pod, "GET", "/stats?format=json").body)
    return {s["name"]: s["value"] for s in data["stats"]}


def settled(kind: str, runner, world: PodWorld, timeout: float = 10.0) -> dict[str, int]:
    """The stats once every connection is gone (an end is counted when both sides are closed)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = stats_of(kind, runner, world)
        active = [n for n, v in stats.items() if n.endswith("_active") and v and "admin" not in n]
        if not active or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def side(kind: str) -> tuple[dict[str, int], dict[str, int]]:
    world = PodWorld()
    servers = [ThreadedServer(world.remote, ECHO, echo), ThreadedServer(world.remote, BANNER, banner)]
    try:
        world.pod.exec("sh", str(REDIRECT), "--method", "uid", "--proxy-port", str(PORT))
        runner = EnvoyProcess(world.pod, BOOTSTRAP) if kind == "envoy" else ProxyProcess(
            world.pod, config=CONFIG, access_log=False)
        try:
            before = settled(kind, runner, world)
            scenario(world)
            after = settled(kind, runner, world)
        finally:
            runner.stop()
        return before, after
    finally:
        for server in servers:
            server.close()
        world.close()


def test_counters_both_keep_move_alike(netns_prerequisites):
    envoy_before, envoy_after = side("envoy")
    ours_before, ours_after = side("proxy")
    shared = sorted(set(envoy_after) & set(ours_after))
    assert len(shared) >= 25, f"too few names in common to compare: {shared}"
    for family in ("listener.0.0.0.0_15001.", "cluster.PassthroughCluster.", "tcp.PassthroughCluster."):
        assert any(n.startswith(family) for n in shared), f"no {family} stats in common"
    differ = []
    for name in shared:
        if name.startswith(("server.", "listener.admin.", "cluster_manager.", "listener_manager.")):
            continue  # the process, not the traffic (their contract is tested with the admin API)
        gauge = name.endswith(("_active", "_buffered"))
        envoy = envoy_after[name] if gauge else envoy_after[name] - envoy_before.get(name, 0)
        ours = ours_after[name] if gauge else ours_after[name] - ours_before.get(name, 0)
        if envoy != ours:
            differ.append(f"{name}: envoy {envoy}, proxy {ours}")
    assert not differ, "counters that moved differently:\n  " + "\n  ".join(differ)
