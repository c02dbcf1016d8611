"""Resources: the open-files limit the proxy raises itself, and Envoy's connection limits.

Real namespaces and rules as everywhere in tests/e2e; the proxy runs as UID
1337 with no capabilities.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import struct

import pytest
from support import ProxyProcess, Server, echo, stats_of, wait_until

pytestmark = pytest.mark.netns

SERVICE = ("198.51.100.10", 80)
LINGER_RST = struct.pack("ii", 1, 0)


def reset_at_once(w, addr) -> bool:
    """Whether a new connection is reset by the proxy before any byte comes back."""
    try:
        with w.pod.connect(addr, timeout=5) as c:
            c.sendall(b"?")
            return c.recv(1) == b"never"
    except ConnectionResetError:
        return True


def held(w, addr, n: int) -> list[socket.socket]:
    """n connections that echo, left open."""
    conns = []
    for i in range(n):
        c = w.pod.connect(addr, timeout=5)
        c.sendall(b"%d" % i)
        assert c.recv(8) == b"%d" % i
        conns.append(c)
    return conns


def close_with_reset(c: socket.socket) -> None:
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    c.close()


def test_max_connections_is_held_and_the_overflow_counted(uid_world):
    w = uid_world
    srv = Server(w.remote, SERVICE, echo)
    proxy = ProxyProcess(w.pod, args=("--max-connections", "3"))
    conns: list[socket.socket] = []
    try:
        conns = held(w, SERVICE, 3)
        assert reset_at_once(w, SERVICE) and reset_at_once(w, SERVICE)
        stats = stats_of(w.pod)
        assert stats["listener.[__]_5001.downstream_global_cx_overflow"] == 2
        assert stats["listener.[__]_5001.downstream_cx_total"] == 3  # the refused ones never became connections
        assert stats["listener.[__]_5001.downstream_cx_overflow"] == 0
        for i, c in enumerate(conns):  # the open ones are untouched
            c.sendall(b"again%d" % i)
            assert c.recv(16) == b"again%d" % i
        close_with_reset(conns.pop())  # one ends: there is room for one more, and only one
        wait_until(lambda: stats_of(w.pod)["listener.[__]_5001.downstream_cx_active"] == 2, what="the reset seen")
        conns += held(w, SERVICE, 1)
        assert reset_at_once(w, SERVICE)
        assert stats_of(w.pod)["listener.[__]_5001.downstream_global_cx_overflow"] == 3
        assert not [e for e in proxy.access_entries() if e["end"] not in ("downstream_reset",)]
    finally:
        for c in conns:
            c.close()
        proxy.stop()
        srv.close()


def test_a_listener_limit_holds_for_its_listener_alone(uid_world):
    """redirect_max_connections and a plain listener's max_connections: Envoy's listener connection limit."""
    w = uid_world
    srv = Server(w.remote, SERVICE, echo)
    config = {"redirect_max_connections": 2,
              "clusters": [{"name": "web", "endpoints": [f"{SERVICE[0]}:{SERVICE[1]}"]}],
              "plain_listeners": [{"name": "local-web", "port": 15080, "cluster": "web", "max_connections": 1}]}
    proxy = ProxyProcess(w.pod, config=config)
    conns: list[socket.socket] = []
    try:
        conns = held(w, SERVICE, 2) + held(w, ("127.0.0.1", 15080), 1)
        assert reset_at_once(w, SERVICE)
        assert reset_at_once(w, ("127.0.0.1", 15080)) and reset_at_once(w, ("127.0.0.1", 15080))
        stats = stats_of(w.pod)
        assert stats["listener.[__]_5001.downstream_cx_overflow"] == 1
        assert stats["listener.127.0.0.1_15080.downstream_cx_overflow"] == 2
        assert stats["listener.127.0.0.1_15080.downstream_global_cx_overflow"] == 0
        assert stats["listener.[__]_5001.downstream_cx_active"] == 2
    finally:
        for c in conns:
            c.close()
        proxy.stop()
        srv.close()


def test_workers_hold_the_global_limit_together(uid_world):
    w = uid_world
    srv = Server(w.remote, SERVICE, echo)
    proxy = ProxyProcess(w.pod, args=("--concurrency", "2", "--max-connections", "4"))
    conns: list[socket.socket] = []
    try:
        refused = 0
        for i in range(10):  # each worker holds its share, 2: the kernel picks the worker by address
            c = None
            try:
                c = w.pod.connect(SERVICE, timeout=5)
                c.sendall(b"%d" % i)
                if c.recv(8) == b"%d" % i:
                    conns.append(c)
                    continue
            except ConnectionResetError:
                pass
            if c is not None:
                c.close()
            refused += 1
        assert 2 <= len(conns) <= 4, len(conns)
        stats = stats_of(w.pod)
        assert stats["listener.[__]_5001.downstream_global_cx_overflow"] == refused == 10 - len(conns)
        assert stats["listener.[__]_5001.downstream_cx_active"] == len(conns)
    finally:
        for c in conns:
            c.close()
        proxy.stop()
        srv.close()


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


def test_5000_connections_under_a_soft_limit_of_1024(uid_world):
    """Started with soft 1024 / hard 20000 open files, the proxy raises its own
    soft limit and relays 5,000 connections (10,000 descriptors) at once."""
    w = uid_world
    n = 5000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * n + 1000  # our clients and the echo server's end of each
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), max(hard, need)))  # we are root
    proxy = ProxyProcess(w.pod, prefix=("prlimit", "--nofile=1024:20000", "--"), access_log=False)
    try:
        assert proxy.wait_for(lambda e: e.get("msg", "").startswith("open files"))["msg"] == \
            "open files: soft limit raised from 1024 to 20000 (the hard limit)"
        asyncio.run(relay_many(w, n))
        stats = stats_of(w.pod)
        assert stats["listener.[__]_5001.resource_exhaustion"] == 0
        assert stats["listener.[__]_5001.downstream_cx_total"] == n
    finally:
        proxy.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def relay_many(w, n: int) -> None:
    """n clients in the pod, all open at once, each echoed through the proxy by one server in the remote."""
    loop = asyncio.get_running_loop()
    listener = w.remote.listen(SERVICE, backlog=4096)
    listener.setblocking(False)
    server = await loop.create_server(Echo, sock=listener, backlog=4096)
    clients: list[socket.socket] = []

    async def client(i: int) -> None:
        sock = w.pod.socket()
        clients.append(sock)
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, SERVICE), 30)
        await loop.sock_sendall(sock, b"%5d" % i)
        got = b""
        while len(got) < 5:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 5 - len(got)), 30)
            assert chunk, f"client {i}: closed after {got!r}"
            got += chunk
        assert got == b"%5d" % i

    try:
        for start in range(0, n, 250):  # in waves, all of them staying open
            await asyncio.gather(*(client(i) for i in range(start, min(n, start + 250))))
        assert len(clients) == n
        stats = stats_of(w.pod)  # while all are open
        assert stats["listener.[__]_5001.downstream_cx_active"] == n
    finally:
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.close()
        server.close()
