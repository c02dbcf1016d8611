"""The proxy's life around the data path: loop guard, drain, descriptors, load,
privilege, inbound traffic and proxy-aware apps, all in real namespaces."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import time
from collections import Counter

import pytest
from conftest import install_uid_redirect
from support import ProxyProcess, Server, children_of, echo, identify, recv_line, status_field

pytestmark = pytest.mark.netns


def test_loop_guard_refuses_a_redirect_loop(world, tmp_path, loop_name):
    """Rules that do NOT exempt the proxy: its upstream connection comes back
    to itself. One client connection fails, nothing chains, the proxy lives."""
    w = world
    for tool, lo in (("iptables", "127.0.0.1/32"), ("ip6tables", "::1/128")):
        w.pod.exec(tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "!", "-d", lo,
                   "-j", "REDIRECT", "--to-ports", "5001")
    srv = Server(w.remote, ("198.51.100.10", 80), echo)
    proxy = ProxyProcess(w.pod, loop=loop_name)
    try:
        # the reset may even beat connect()'s return on a busy machine
        with pytest.raises(ConnectionResetError), w.pod.connect(("198.51.100.10", 80)) as c:
            c.sendall(b"hello")
            c.recv(10)
        refused = proxy.access(end="loop_guard")
        assert refused["chain"] == "-"  # refused before any chain was chosen
        assert proxy.access(end="upstream_reset")["destination"] == "198.51.100.10:80"
        time.sleep(0.3)
        assert len(proxy.access_entries()) == 2, "the loop chained further"
        assert any("do not exempt the proxy" in e.get("msg", "") for e in proxy.lines)
        assert not srv.accepted
        assert proxy.alive()
    finally:
        assert proxy.stop() == 0
        srv.close()


def test_direct_connection_to_the_proxy_port_is_refused(uid_world, tmp_path):
    """Dialling 127.0.0.1:5001 is not redirected: nothing to forward to."""
    w = uid_world
    proxy = ProxyProcess(w.pod)
    try:
        with w.pod.connect(("127.0.0.1", 5001)) as c, pytest.raises(ConnectionResetError):
            c.recv(1)
        assert proxy.access()["end"] == "not_redirected"
    finally:
        proxy.stop()


def test_sigterm_drains_live_connections(uid_world, tmp_path, loop_name):
    """SIGTERM: the app's new outbound connections are still taken (it may be
    shutting down too) and live ones keep working, for the drain timeout;
    then exit 0 (tests/e2e/test_drain.py has inbound, workers and strategies)."""
    w = uid_world
    srv = Server(w.remote, ("198.51.100.10", 80), echo)
    proxy = ProxyProcess(w.pod, loop=loop_name, args=("--drain-timeout", "4s"))
    try:
        c = w.pod.connect(("198.51.100.10", 80))
        c.sendall(b"before")
        assert c.recv(6) == b"before"
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.wait_for(lambda e: e.get("msg", "").startswith("stopping"), what="stopping")
        # new outbound connections are still accepted ...
        with w.pod.connect(("198.51.100.10", 80), timeout=5) as new:
            new.sendall(b"new")
            assert new.recv(3) == b"new"
        # ... and the live one keeps working until it ends by itself
        c.sendall(b"during")
        assert c.recv(6) == b"during"
        c.close()
        assert proxy.proc.wait(20) == 0
        assert proxy.access(destination="198.51.100.10:80", end="done", bytes_up=12)
    finally:
        proxy.stop()
        srv.close()


def test_drain_timeout_resets_what_is_left_and_exits_0(uid_world, tmp_path):
    w = uid_world
    srv = Server(w.remote, ("198.51.100.10", 80), echo)
    proxy = ProxyProcess(w.pod, args=("--drain-timeout", "500ms"))
    try:
        with w.pod.connect(("198.51.100.10", 80)) as c:
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            start = time.monotonic()
            proxy.proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionResetError):
                c.recv(1)
            assert time.monotonic() - start < 3
        assert proxy.proc.wait(5) == 0
        assert proxy.access()["end"] == "drain_timeout"
    finally:
        proxy.stop()
        srv.close()


def test_accept_loop_survives_running_out_of_descriptors(uid_world, tmp_path, loop_name):
    """With RLIMIT_NOFILE tiny, a burst exhausts descriptors (EMFILE); once the
    burst is gone, the proxy accepts again."""
    w = uid_world
    srv = Server(w.remote, ("198.51.100.10", 80), echo)
    proxy = ProxyProcess(w.pod, loop=loop_name, prefix=("prlimit", "--nofile=64:64", "--"))
    held = []
    try:
        failed = 0
        sent = []
        for i in range(60):  # each proxied connection costs the proxy two descriptors
            try:
                c = w.pod.connect(("198.51.100.10", 80), timeout=2)  # the kernel's backlog accepts
            except ConnectionResetError:  # accepted and dropped at once for want of a descriptor (a RST)
                failed += 1
                continue
            held.append(c)
            sent.append(b"%d" % i)
            with contextlib.suppress(OSError):  # (reset already: the recv below counts it)
                c.sendall(sent[-1])
        time.sleep(0.5)
        for data, c in zip(sent, held, strict=True):
            c.settimeout(0.05)
            try:
                failed += c.recv(8) != data
            except OSError:  # reset by the proxy, or never accepted
                failed += 1
        assert failed > 0, "the burst never exhausted the proxy's descriptors"
        if loop_name == "asyncio":  # uvloop's accept drops connections quietly (libuv's EMFILE trick)
            proxy.wait_for(lambda e: "EMFILE" in e.get("msg", "") + e.get("exc", ""), what="an EMFILE log line")
        for c in held:
            c.close()
        held.clear()
        time.sleep(1.5)  # the loops back off for up to a second after EMFILE
        assert proxy.alive()
        for i in range(5):
            with w.pod.connect(("198.51.100.10", 80), timeout=5) as c:
                c.sendall(b"after %d" % i)
                assert c.recv(16) == b"after %d" % i
    finally:
        for c in held:
            c.close()
        proxy.stop()
        srv.close()


def test_500_concurrent_connections_keep_their_data(uid_world, tmp_path, loop_name):
    w = uid_world
    srv_sock = w.remote.listen(("198.51.100.10", 80), backlog=1024)
    proxy = ProxyProcess(w.pod, loop=loop_name)
    n = 500

    async def run():
        async def handle(reader, writer):
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()

        # The server's accept queue must hold all 500 at once: start_server
        # listens again with its own backlog (100 by default), and an
        # overflowing queue makes the server's kernel answer some of the
        # proxy's connections with a RST (SYN cookies), which the proxy
        # rightly passes on to the client.
        server = await asyncio.start_server(handle, sock=srv_sock, backlog=1024)

        async def client(i):
            sock = w.pod.socket(socket.AF_INET)
            writer = None
            try:
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, ("198.51.100.10", 80))
                reader, writer = await asyncio.open_connection(sock=sock)
                payload = (b"%05d" % i) * 4000  # 20 kB, different for every connection
                writer.write(payload)
                await writer.drain()
                writer.write_eof()
                got = await reader.read()
                return "ok" if got == payload else "wrong bytes"
            except OSError as exc:
                return type(exc).__name__
            finally:  # nothing left open for a later test to trip over
                if writer is not None:
                    writer.close()
                else:
                    sock.close()

        try:
            return await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(n))), 60)
        finally:
            server.close()

    try:
        results = asyncio.run(run())
        outcomes = Counter(results)
        ends = Counter(e["end"] for e in proxy.access_entries())
        assert outcomes == {"ok": n}, f"clients: {dict(outcomes)}; proxy access-log ends: {dict(ends)}"
    finally:
        proxy.stop()


def test_garbage_and_resets_do_not_disturb_other_connections(uid_world, tmp_path):
    w = uid_world
    srv = Server(w.remote, ("198.51.100.10", 80), echo)
    proxy = ProxyProcess(w.pod)
    try:
        with w.pod.connect(("198.51.100.10", 80)) as steady:
            steady.sendall(b"one")
            assert steady.recv(3) == b"one"
            for _ in range(20):  # connect and reset at once
                c = w.pod.connect(("198.51.100.10", 80))
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()
            for _ in range(5):  # garbage, then vanish
                c = w.pod.connect(("198.51.100.10", 80))
                c.sendall(os.urandom(70000))
                c.close()
            steady.sendall(b"two")
            assert steady.recv(3) == b"two"
        assert proxy.alive()
    finally:
        proxy.stop()
        srv.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_mark_needs_cap_net_admin_and_bypasses_with_it(world, tmp_path, workers):
    w = world
    concurrency = ("--concurrency", str(workers))
    for tool, lo in (("iptables", "127.0.0.1/32"), ("ip6tables", "::1/128")):
        w.pod.exec(tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "!", "-d", lo,
                   "-m", "mark", "!", "--mark", "0x1", "-j", "REDIRECT", "--to-ports", "5001")
    # without the capability: refuses to start, one line, exit 1
    with pytest.raises(AssertionError, match="exited 1"):
        ProxyProcess(w.pod, args=("--mark", "0x1", *concurrency))
    srv = Server(w.remote, ("2001:db8:2::10", 80), identify("web"))
    proxy = ProxyProcess(w.pod, args=("--mark", "0x1", *concurrency), caps=("net_admin",))
    try:
        assert int(proxy.status_field("CapEff"), 16) == 1 << 12  # CAP_NET_ADMIN alone
        children = children_of(proxy.pid)
        assert len(children) == (workers if workers > 1 else 0)
        for pid in children:  # the workers that set the mark have the capability too, and only it
            assert int(status_field(pid, "CapEff"), 16) == 1 << 12
        for _ in range(4):
            with w.pod.connect(("2001:db8:2::10", 80)) as c:
                assert recv_line(c).startswith("web ")
        assert proxy.access()["end"] == "done"
        assert not any(e.get("end") == "loop_guard" for e in proxy.access_entries())
    finally:
        proxy.stop()
        srv.close()


def test_mark_without_privilege_is_one_clear_line(world):
    w = world
    from support import PYTHON, setpriv_argv
    proc = w.pod.exec(*setpriv_argv(), PYTHON, "-m", "proxy", "run", "--mark", "0x1", check=False)
    assert proc.returncode == 1
    assert "SO_MARK 0x1 needs CAP_NET_ADMIN" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_port_in_use_is_one_clear_line(world):
    w = world
    blocker = w.pod.listen(("::", 5001))
    from support import PYTHON, setpriv_argv
    try:
        proc = w.pod.exec(*setpriv_argv(), PYTHON, "-m", "proxy", "run", check=False)
        assert proc.returncode == 1
        assert "listener redirect: cannot bind [::]:5001: Address already in use" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        blocker.close()


def test_plain_listener_goes_straight_to_its_cluster(uid_world, tmp_path):
    w = uid_world
    srv = Server(w.remote, ("198.51.100.20", 8080), identify("backend"))
    cfg = {"clusters": [{"name": "backend", "endpoints": ["198.51.100.20:8080"]}],
           "plain_listeners": [{"name": "local-backend", "port": 15080, "cluster": "backend"}]}
    proxy = ProxyProcess(w.pod, config=cfg)
    try:
        with w.pod.connect(("127.0.0.1", 15080)) as c:  # loopback: never redirected
            assert recv_line(c).startswith("backend ")
        entry = proxy.access(listener="local-backend")
        assert entry["chain"] == "plain.local-backend" and entry["upstream"] == "198.51.100.20:8080"
    finally:
        proxy.stop()
        srv.close()


def test_inbound_is_told_from_outbound_and_new_addresses_are_seen(world, tmp_path):
    """A remote client calling the pod IP is inbound; so is an address the pod
    gets after the proxy started."""
    w = world
    install_uid_redirect(w)
    app = Server(w.pod, ("0.0.0.0", 8080), identify("app"))
    proxy = ProxyProcess(w.pod)
    try:
        with w.remote.connect((w.POD_V4, 8080)) as c:
            assert recv_line(c) == f"app {w.POD_V4}\n"  # the app sees the proxy's connection
        assert proxy.access(destination=f"{w.POD_V4}:8080")["direction"] == "inbound"
        w.pod.ip("addr", "add", "192.0.2.50/24", "dev", "eth0")
        time.sleep(0.3)
        with w.remote.connect(("192.0.2.50", 8080)) as c:
            assert recv_line(c).startswith("app ")
        assert proxy.access(destination="192.0.2.50:8080")["direction"] == "inbound"
    finally:
        proxy.stop()
        app.close()
