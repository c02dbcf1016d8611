"""pilot-agent's drain, `POST /drain_listeners?inboundonly&graceful`, beside real Envoy.

Real Envoy 1.40 and sidecar-envoy each run in a throwaway namespace (its
loopback only) as UID 1337 on the same bootstrap: an INBOUND and an OUTBOUND
listener, tcp_proxy to an echo server. The same probes run against each:
new connections to both listeners and a live one through each, right after
the call, and once the inbound listener has stopped. They must agree: inbound
is taken as ever during the drain time, whatever the strategy (Envoy's drain
shows only on HTTP connections), then refused by the kernel; outbound goes
on; a live connection is never closed; /ready stays LIVE.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import support
import yaml
from envoyproc import envoy_binary
from support import ProxyProcess, Server, echo, recv_all

from proxy.demo.netns import NetNs, unique_suffix

pytestmark = pytest.mark.netns

SIDECAR_ENVOY = str(Path(sys.executable).parent / "sidecar-envoy")
INBOUND, OUTBOUND, ECHO = ("127.0.0.1", 19912), ("127.0.0.1", 19913), ("127.0.0.1", 19914)
DRAIN_TIME = 4


def tcp_listener(name: str, direction: str, port: int) -> dict:
    return {"name": name, "traffic_direction": direction,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                 "stat_prefix": name, "cluster": "echo"}}]}]}


BOOTSTRAP = {
    "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}},
    "static_resources": {
        "listeners": [tcp_listener("inbound", "INBOUND", INBOUND[1]), tcp_listener("outbound", "OUTBOUND", OUTBOUND[1])],
        "clusters": [{"name": "echo", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
            "cluster_name": "echo", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": ECHO[0], "port_value": ECHO[1]}}}}]}]}}],
    },
}


def attempt(ns: NetNs, addr: tuple) -> str:
    try:
        with ns.connect(addr, timeout=5) as c:
            c.sendall(b"ping")
            return "served" if c.recv(4) == b"ping" else "ended"
    except ConnectionRefusedError:
        return "refused"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"


def admin(ns: NetNs, method: str, path: str) -> tuple[int, str]:
    """(status, body) of one HTTP/1.1 request to the admin API, Envoy's or ours."""
    return support.admin(ns, method, path).brief()


def echoes(c: socket.socket, data: bytes) -> bool:
    c.sendall(data)
    return c.recv(len(data)) == data


def observe(ns: NetNs) -> list[tuple]:
    """The drain as one subject answers it: what happened at each step."""
    seen = []
    live_in, live_out = ns.connect(INBOUND), ns.connect(OUTBOUND)
    try:
        seen.append(("before", attempt(ns, INBOUND), attempt(ns, OUTBOUND), echoes(live_in, b"a"), echoes(live_out, b"a")))
        seen.append(("call", admin(ns, "POST", "/drain_listeners?inboundonly&graceful")))
        seen.append(("during", attempt(ns, INBOUND), attempt(ns, OUTBOUND), admin(ns, "GET", "/ready")))
        deadline = time.monotonic() + DRAIN_TIME + 30
        while attempt(ns, INBOUND) == "served" and time.monotonic() < deadline:
            time.sleep(0.2)
        seen.append(("after", [attempt(ns, INBOUND) for _ in range(3)], attempt(ns, OUTBOUND),
                     echoes(live_in, b"b"), echoes(live_out, b"b"), admin(ns, "GET", "/ready")))
    finally:
        live_in.close()
        live_out.close()
    return seen


@contextlib.contextmanager
def ready(ns: NetNs, binary: str, path: str, *args: str) -> Iterator[None]:
    """Envoy's command line (`binary`: Envoy or sidecar-envoy) on the bootstrap, until /ready answers."""
    subject = ProxyProcess(ns, command=(binary, "-c", path, "--drain-time-s", str(DRAIN_TIME), *args, "-l", "info",
                                        "--disable-hot-restart"), wait=False)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if admin(ns, "GET", "/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        yield
    finally:
        subject.stop()


@pytest.fixture
def scratch(netns_prerequisites):
    ns = NetNs(f"scp-drn-{unique_suffix()}")
    directory = tempfile.mkdtemp(prefix="scp-drain-")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "envoy.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(BOOTSTRAP, f)
    os.chmod(path, 0o644)
    server = Server(ns, ECHO, echo)
    try:
        yield ns, path
    finally:
        server.close()
        ns.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("strategy", ["immediate", "gradual"])
def test_inboundonly_graceful_drains_as_envoy_does(scratch, strategy):
    ns, path = scratch
    seen = {}
    for name, binary in (("envoy", envoy_binary()), ("sidecar-envoy", SIDECAR_ENVOY)):
        with ready(ns, binary, path, "--drain-strategy", strategy):
            seen[name] = observe(ns)
    assert seen["envoy"] == [
        ("before", "served", "served", True, True),
        ("call", (200, "OK\n")),
        ("during", "served", "served", (200, "LIVE\n")),
        ("after", ["refused"] * 3, "served", True, True, (200, "LIVE\n")),
    ], seen["envoy"]
    assert seen["sidecar-envoy"] == seen["envoy"]


def raw_reply(ns: NetNs, request: bytes) -> tuple[int, str, str]:
    """(status, content type, body) of a request sent as it is."""
    with ns.connect(("127.0.0.1", 15000), timeout=10) as s:
        s.sendall(request)
        head, _, body = recv_all(s).partition(b"\r\n\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in
                                                             head.decode().split("\r\n")[1:])}
    return int(head.split()[1]), headers.get("content-type", ""), body.decode()


def observe_skip_exit(ns: NetNs) -> list[tuple]:
    """skip_exit: alone, and with graceful (after which a graceful drain counts as under way)."""
    seen = [("skip_exit", admin(ns, "POST", "/drain_listeners?skip_exit"), attempt(ns, INBOUND), attempt(ns, OUTBOUND))]
    seen.append(("graceful&skip_exit", admin(ns, "POST", "/drain_listeners?graceful&skip_exit")))
    time.sleep(DRAIN_TIME + 1)
    seen.append(("after the drain time", attempt(ns, INBOUND), attempt(ns, OUTBOUND)))
    seen.append(("graceful", admin(ns, "POST", "/drain_listeners?graceful")))
    time.sleep(DRAIN_TIME + 1)
    seen.append(("after another drain time", attempt(ns, INBOUND), attempt(ns, OUTBOUND), admin(ns, "GET", "/ready")))
    # and the admin API takes HTTP/1.1 only, whatever the path or the Host
    for request in (b"GET /ready HTTP/1.0\r\n\r\n", b"GET /nowhere HTTP/1.0\r\nHost: elsewhere\r\n\r\n"):
        seen.append(("HTTP/1.0", raw_reply(ns, request)))
    return seen


def test_skip_exit_and_http_1_0_as_envoy_does(scratch):
    ns, path = scratch
    seen = {}
    for name, binary in (("envoy", envoy_binary()), ("sidecar-envoy", SIDECAR_ENVOY)):
        with ready(ns, binary, path):
            seen[name] = observe_skip_exit(ns)
    upgrade = ("HTTP/1.0", (426, "text/plain", "Upgrade Required"))
    assert seen["envoy"] == [
        ("skip_exit", (200, "OK\n"), "served", "served"),
        ("graceful&skip_exit", (200, "OK\n")),
        ("after the drain time", "served", "served"),
        ("graceful", (200, "OK\n")),
        ("after another drain time", "served", "served", (200, "LIVE\n")),
        upgrade, upgrade,
    ], seen["envoy"]
    assert seen["sidecar-envoy"] == seen["envoy"]
