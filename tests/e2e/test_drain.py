"""Draining as Istio drains a sidecar: inbound stops, outbound goes on.

Every test runs the real proxy as UID 1337 behind the UID-owner rules, with
an app in the pod (an echo server on 8080, reached from the remote: inbound)
and a service in the remote namespace (an echo server on 198.51.100.10:80,
reached by the app: outbound). Both go through the one redirected port, so
the proxy tells them apart by the original destination (datapath/drain.py).

What a refused inbound client sees: the handshake completes (the kernel
accepts on the redirected port, which still serves outbound), then a reset
(ECONNRESET on the first read or write); the app never sees the connection.
"""

from __future__ import annotations

import signal
import socket

import pytest
from support import ProxyProcess, Server, admin, echo, stats_of, wait_until

pytestmark = pytest.mark.netns

SERVICE = ("198.51.100.10", 80)  # outbound: the app calls it
APP_PORT = 8080  # inbound: a remote client calls the app


def attempt(ns, addr: tuple, timeout: float = 5.0) -> str:
    """One new connection: "served" (echoed), "reset", "refused", or what came instead."""
    try:
        with ns.connect(addr, timeout=timeout) as c:
            c.sendall(b"ping")
            data = c.recv(4)
    except ConnectionRefusedError:
        return "refused"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    return "served" if data == b"ping" else f"ended with {data!r}"


def echoes(c: socket.socket, data: bytes) -> bool:
    c.sendall(data)
    return c.recv(len(data)) == data


@pytest.fixture
def apps(uid_world):
    """The app in the pod and the service it calls in the remote; (world, app, service)."""
    w = uid_world
    app = Server(w.pod, ("0.0.0.0", APP_PORT), echo)
    service = Server(w.remote, SERVICE, echo)
    try:
        yield w, app, service
    finally:
        app.close()
        service.close()


def inbound(w) -> str:
    return attempt(w.remote, (w.POD_V4, APP_PORT))


def outbound(w) -> str:
    return attempt(w.pod, SERVICE)


@pytest.mark.parametrize("concurrency", ["1", "2"])
def test_sigterm_refuses_inbound_and_keeps_outbound_for_the_drain_timeout(apps, concurrency):
    """Issue 12, 5: during a SIGTERM drain the app's new outbound connections
    still succeed, new inbound ones are refused, and live ones go on; at the
    end of the drain timeout what is left is reset and the proxy exits 0."""
    w, app, _ = apps
    proxy = ProxyProcess(w.pod, args=("--drain-timeout", "8s", "--drain-strategy", "immediate",
                                      "--concurrency", concurrency))
    try:
        assert (inbound(w), outbound(w)) == ("served", "served")
        live_out = w.pod.connect(SERVICE, timeout=5)
        live_in = w.remote.connect((w.POD_V4, APP_PORT), timeout=5)
        assert echoes(live_out, b"before") and echoes(live_in, b"before")
        app_seen = len(app.accepted)

        proxy.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: len([e for e in proxy.lines if e.get("msg", "").startswith("stopping: inbound")])
                   == int(concurrency), what="every worker draining")
        assert [outbound(w) for _ in range(5)] == ["served"] * 5
        assert [inbound(w) for _ in range(5)] == ["reset"] * 5
        assert len(app.accepted) == app_seen, "a refused inbound connection reached the app"
        assert echoes(live_out, b"during") and echoes(live_in, b"during")
        assert admin(w.pod, "GET", "/ready").brief() == (503, "DRAINING\n")
        refused = wait_until(lambda: [e for e in proxy.access_entries() if e.get("end") == "drain_refused"][4:] and
                             [e for e in proxy.access_entries() if e.get("end") == "drain_refused"],
                             what="5 refused connections in the access log")  # (written off the event loop)
        assert len(refused) == 5 and {e["direction"] for e in refused} == {"inbound"}

        assert proxy.proc.wait(30) == 0  # the drain timeout ends it
        for c in (live_out, live_in):
            with pytest.raises(ConnectionResetError):  # cut at the end of the drain: a reset, never a clean end
                c.recv(1)
            c.close()
        wait_until(lambda: sum(e.get("end") == "drain_timeout" for e in proxy.access_entries()) == 2,
                   what="both live connections logged as cut by the drain timeout")
    finally:
        proxy.stop()


@pytest.mark.parametrize("concurrency", ["1", "2"])
def test_drain_listeners_inboundonly_stops_inbound_and_keeps_outbound(apps, concurrency):
    """Envoy's `/drain_listeners?inboundonly`: inbound stops at once, outbound is
    served, live connections and the process go on, and the state stays LIVE
    (as Envoy 1.40's: server.state 0)."""
    w, app, _ = apps
    proxy = ProxyProcess(w.pod, args=("--concurrency", concurrency))
    try:
        live_out = w.pod.connect(SERVICE, timeout=5)
        assert echoes(live_out, b"before")
        app_seen = len(app.accepted)
        assert admin(w.pod, "POST", "/drain_listeners?inboundonly").brief() == (200, "OK\n")
        wait_until(lambda: len([e for e in proxy.lines if e.get("msg", "").startswith("stopped inbound")])
                   == int(concurrency), what="every worker's inbound stopped")
        assert [outbound(w) for _ in range(5)] == ["served"] * 5
        assert [inbound(w) for _ in range(5)] == ["reset"] * 5
        assert len(app.accepted) == app_seen, "a refused inbound connection reached the app"
        assert echoes(live_out, b"during")
        assert stats_of(w.pod)["listener.[__]_5001.drain_refused"] == 5
        assert admin(w.pod, "GET", "/ready").brief() == (200, "LIVE\n")
        assert proxy.alive()
        live_out.close()
    finally:
        assert proxy.stop() == 0


@pytest.mark.parametrize("strategy", ["immediate", "gradual"])
def test_drain_listeners_inboundonly_graceful_stops_inbound_when_the_drain_time_ends(apps, strategy):
    """pilot-agent's exact call, `?inboundonly&graceful`, as Envoy 1.40 answers
    it (checked against its binary): inbound is taken as ever, whatever the
    strategy, until the drain time is over; then it stops, outbound goes on."""
    w, _, _ = apps
    proxy = ProxyProcess(w.pod, args=("--drain-time", "6s", "--drain-strategy", strategy))
    try:
        live_in = w.remote.connect((w.POD_V4, APP_PORT), timeout=5)
        assert echoes(live_in, b"before")
        assert admin(w.pod, "POST", "/drain_listeners?inboundonly&graceful").brief() == (200, "OK\n")
        assert inbound(w) == "served"  # the drain time has just begun
        proxy.wait_for(lambda e: e.get("msg", "").startswith("stopped inbound"), timeout=30,
                       what="inbound stopped at the end of the drain time")
        assert [inbound(w) for _ in range(5)] == ["reset"] * 5
        assert [outbound(w) for _ in range(3)] == ["served"] * 3
        assert echoes(live_in, b"after")  # a drain never closes a TCP connection
        assert admin(w.pod, "GET", "/ready").brief() == (200, "LIVE\n")
        live_in.close()
    finally:
        assert proxy.stop() == 0


def test_drain_listeners_without_inboundonly_stops_every_listener(apps):
    """Envoy's /drain_listeners: every listener stops at once (connections are refused by the kernel)."""
    w, _, _ = apps
    proxy = ProxyProcess(w.pod)
    try:
        assert admin(w.pod, "POST", "/drain_listeners").brief() == (200, "OK\n")
        wait_until(lambda: outbound(w) == "refused", what="the redirected port closed")
        assert inbound(w) == "refused"
    finally:
        assert proxy.stop() == 0


@pytest.mark.parametrize("strategy", ["immediate", "gradual"])
def test_sigterm_immediate_refuses_inbound_at_once_gradual_little_by_little(apps, strategy):
    """The same SIGTERM drain (drain timeout 600 s) under each strategy:
    immediate refuses every new inbound connection from the start; gradual
    refuses each with probability elapsed/drain_timeout, here at most a few
    in a hundred, so nearly all are served (at least 3 of 5: a chance of
    failing below 1 in 10,000 even 20 s into the drain). /quitquitquit
    then ends the drain: the app is done."""
    w, _, _ = apps
    proxy = ProxyProcess(w.pod, args=("--drain-timeout", "600s", "--drain-strategy", strategy))
    try:
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.wait_for(lambda e: e.get("msg", "").startswith("stopping: inbound"), what="stopping")
        results = [inbound(w) for _ in range(5)]
        if strategy == "immediate":
            assert results == ["reset"] * 5
        else:
            assert results.count("served") >= 3, results
            assert set(results) <= {"served", "reset"}
        assert [outbound(w) for _ in range(3)] == ["served"] * 3
        assert admin(w.pod, "POST", "/quitquitquit").status == 200
        assert proxy.proc.wait(30) == 0
    finally:
        proxy.stop()
