"""The data path in one process, on real loopback sockets, driven step by step.

A plain listener (no original destination, so no root and no iptables)
forwards to a backend socket the test holds itself: the test decides when
the backend reads, writes, half-closes or resets, and looks at the relay in
between. The listener, relay, upstream connector, stats and splice pumps are
the real ones; only the event loop is chosen (both are run).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import socket
import struct
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.config import AccessLog as LogSpec
from proxy.config import Cluster, Config, Endpoint, plain_listener
from proxy.datapath.accesslog import AccessLog
from proxy.datapath.listener import Listener, Shared
from proxy.datapath.localaddrs import LocalAddresses
from proxy.datapath.relay import WRITE_HIGH_WATER, Relay, close_idle
from proxy.datapath.stats import Stats

STEP = 5.0  # seconds any one step may take before the test fails


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def closed_port() -> int:
    """A loopback port nobody listens on (bound, never listening: connects are refused)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    _HOLD.append(holder)
    return port


_HOLD: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _release_held_ports():
    yield
    while _HOLD:
        _HOLD.pop().close()


class World:
    """A plain listener on loopback whose cluster is `backends` (the test's sockets)."""

    def __init__(self, shared: Shared, front: tuple[str, int], backends: list[socket.socket]) -> None:
        self.shared, self.front, self.backends = shared, front, backends
        self.stats = shared.stats

    async def client(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(*self.front)

    async def accept(self, index: int = 0) -> socket.socket:
        """The proxy's upstream connection, as the backend sees it."""
        loop = asyncio.get_running_loop()
        conn, _ = await asyncio.wait_for(loop.sock_accept(self.backends[index]), STEP)
        conn.setblocking(False)
        return conn

    def relay(self) -> Relay:
        (relay,) = self.shared.live.values()
        return relay

    async def exchanged(self, request: bytes, response: bytes):
        """A client relayed to the first backend: `request` reaches it, `response` comes back;
        (reader, writer) of the client and the backend's socket."""
        reader, writer = await self.client()
        backend = await self.accept()
        writer.write(request)
        assert await recv_exactly(backend, len(request)) == request
        await asyncio.get_running_loop().sock_sendall(backend, response)
        assert await asyncio.wait_for(reader.readexactly(len(response)), STEP) == response
        return reader, writer, backend

    async def until(self, condition, what: str) -> None:
        deadline = asyncio.get_running_loop().time() + STEP
        while not condition():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"never happened: {what}")
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def world(endpoints: list[Endpoint | socket.socket], splice: str = "off",
                connect_timeout: float = 5.0, **chain: Any) -> AsyncIterator[World]:
    """`chain`: more of the front listener's chain (stat_prefix, idle_timeout, access_logs)."""
    loop = asyncio.get_running_loop()
    backends = [e for e in endpoints if isinstance(e, socket.socket)]
    eps = tuple(Endpoint(*e.getsockname()) if isinstance(e, socket.socket) else e for e in endpoints)
    front = plain_listener("front", "127.0.0.1", 1, "backend")
    front = dataclasses.replace(front, default_chain=dataclasses.replace(front.default_chain, **chain))
    config = Config(splice=splice, access_log="off",
                    clusters=(Cluster("backend", eps, connect_timeout=connect_timeout),), listeners=(front,))
    local = LocalAddresses()
    shared = Shared(config, Stats(), AccessLog("off", "text"), local, loop)
    listener = Listener(shared, loop, config.listeners[0])
    server = await loop.create_server(listener.protocol, "127.0.0.1", 0)
    try:
        yield World(shared, server.sockets[0].getsockname()[:2], backends)
    finally:
        server.close()
        for relay in list(shared.live.values()):
            relay.close("test_over", reset=True)
        await asyncio.sleep(0.01)
        shared.close()
        for b in backends:
            b.close()


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop, data = asyncio.get_running_loop(), b""
    while len(data) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(data)), STEP)
        if not chunk:
            break
        data += chunk
    return data


async def recv_eof(sock: socket.socket) -> bytes:
    loop, data = asyncio.get_running_loop(), b""
    while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), STEP):
        data += chunk
    return data


# --- bytes both ways, half-close, the end -------------------------------------------------

def test_bytes_both_ways_then_half_close_each_way(run):
    async def scenario():
        async with world([listening()]) as w:
            reader, writer = await w.client()
            backend = await w.accept()
            relay = w.relay()
            assert not relay.connected  # nothing has confirmed the upstream yet

            writer.write(b"hello")
            assert await recv_exactly(backend, 5) == b"hello"
            await w.until(lambda: relay.connected, "confirmed by the bytes the kernel took")
            await asyncio.get_running_loop().sock_sendall(backend, b"world")
            assert await asyncio.wait_for(reader.readexactly(5), STEP) == b"world"

            # step 1: the client half-closes; the backend sees EOF, the other way stays open
            writer.write_eof()
            assert await recv_eof(backend) == b""
            assert relay.end is None and relay.downstream.eof and not relay.upstream.eof
            await asyncio.get_running_loop().sock_sendall(backend, b"still here")
            assert await asyncio.wait_for(reader.readexactly(10), STEP) == b"still here"

            # step 2: the backend half-closes too: both directions are done
            backend.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(reader.read(), STEP) == b""
            await w.until(lambda: not w.shared.live, "the relay ended")
            assert relay.end == "done"
            assert relay.bytes_from_downstream == 5 and relay.bytes_from_upstream == 15
            names = w.shared.listener_stats["front"]
            assert w.stats[names.downstream_cx_destroy] == 1 and w.stats[names.downstream_cx_active] == 0
            assert w.stats["cluster.backend.upstream_cx_destroy"] == 1
            # the backend's FIN ended it (the client's came first, but only half-closed it)
            assert w.stats["cluster.backend.upstream_cx_destroy_remote"] == 1
            assert w.stats["cluster.backend.upstream_cx_destroy_local"] == 0
            assert w.stats["cluster.backend.upstream_cx_destroy_with_active_rq"] == 1
            assert w.stats["cluster.backend.upstream_cx_tx_bytes_total"] == 5
            assert w.stats["cluster.backend.upstream_cx_rx_bytes_total"] == 15
            writer.close()
            backend.close()
    run(scenario())


def test_the_backend_half_closes_first(run):
    async def scenario():
        async with world([listening()]) as w:
            reader, writer = await w.client()
            backend = await w.accept()
            await asyncio.get_running_loop().sock_sendall(backend, b"banner")
            backend.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(reader.read(), STEP) == b"banner"  # its FIN reached the client
            relay = w.relay()
            assert relay.end is None and relay.upstream.eof
            writer.write(b"late request")  # the client can still talk
            await writer.drain()
            assert await recv_exactly(backend, 12) == b"late request"
            writer.write_eof()
            assert await recv_eof(backend) == b""
            await w.until(lambda: not w.shared.live, "the relay ended")
            assert relay.end == "done"
            writer.close()
            backend.close()
    run(scenario())


def test_a_finished_connection_is_freed_at_once_not_by_the_garbage_collector(run):
    """Once a connection has ended, nothing points at its relay any more (its sides'
    links to it and to each other are cut): reference counting frees it at once,
    and the cyclic collector has no connection to trace (bench: per-connection CPU)."""
    async def scenario():
        async with world([listening()]) as w:
            reader, writer, backend = await w.exchanged(b"ping", b"pong")
            relay = w.relay()
            down, up = relay.downstream, relay.upstream
            writer.write_eof()
            backend.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(reader.read(), STEP) == b""
            await w.until(lambda: not w.shared.live, "the relay ended")
            assert relay.end == "done"
            del down, up  # the test's own references to the sides
            await asyncio.sleep(0)  # the loop lets go of the closed transports' callbacks
            referrers = [type(r).__name__ for r in gc.get_referrers(relay) if r is not sys._getframe()]
            assert sys.getrefcount(relay) == 2, f"still referred to by {referrers}"  # ours and the call's
            writer.close()
            backend.close()
    run(scenario())


# --- backpressure --------------------------------------------------------------------

def test_a_backend_that_does_not_read_stops_the_client_being_read(run):
    """The backend reads nothing: the proxy buffers at most its high-water mark and
    stops reading the client; once the backend reads, the client is read again."""
    async def scenario():
        async with world([listening()]) as w:
            _, writer = await w.client()
            backend = await w.accept()
            relay = w.relay()
            chunk = b"x" * 65536
            sent = 0
            # step 1: write until the client's own buffer stops draining (everything in between is full)
            while sent < 64 << 20:
                writer.write(chunk)
                sent += len(chunk)
                try:
                    await asyncio.wait_for(writer.drain(), 0.5)
                except TimeoutError:
                    break
            else:
                raise AssertionError("64 MiB went into a backend that reads nothing")
            await w.until(lambda: relay.upstream.paused, "the upstream side paused")
            assert not relay.downstream.transport.is_reading()
            # what the proxy holds is bounded: one write buffer, whatever the client sent
            held = relay.upstream.transport.get_write_buffer_size()
            assert held <= WRITE_HIGH_WATER + 4 * 65536, held
            assert relay.bytes_from_downstream < sent  # the rest waits in the client's kernel and buffers

            # step 2: the backend reads everything; the client is read again until it is all there
            writer.write_eof()
            got = 0
            loop = asyncio.get_running_loop()
            while got < sent:
                data = await asyncio.wait_for(loop.sock_recv(backend, 1 << 20), STEP)
                assert data, f"EOF after {got} of {sent} bytes"
                got += len(data)
            assert got == sent
            assert await recv_eof(backend) == b""
            assert not relay.upstream.paused
            writer.close()
            backend.close()
    run(scenario())


# --- resets ----------------------------------------------------------------------------

def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_backend_reset_resets_the_client(run):
    async def scenario():
        async with world([listening()]) as w:
            reader, writer = await w.client()
            backend = await w.accept()
            writer.write(b"ping")
            assert await recv_exactly(backend, 4) == b"ping"
            relay = w.relay()
            reset(backend)
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), STEP)
            await w.until(lambda: not w.shared.live, "the relay ended")
            assert relay.end == "upstream_reset"
            writer.close()
    run(scenario())


def test_a_client_reset_resets_the_backend(run):
    async def scenario():
        async with world([listening()]) as w:
            client = socket.create_connection(w.front)
            backend = await w.accept()
            client.sendall(b"ping")
            assert await recv_exactly(backend, 4) == b"ping"
            relay = w.relay()
            reset(client)
            loop = asyncio.get_running_loop()
            with pytest.raises(ConnectionResetError):
                while await asyncio.wait_for(loop.sock_recv(backend, 100), STEP):
                    pass
            await w.until(lambda: not w.shared.live, "the relay ended")
            assert relay.end == "downstream_reset"
            assert w.stats["cluster.backend.upstream_cx_destroy_local"] == 1  # we reset it
            backend.close()
    run(scenario())


# --- connecting: the next endpoint, giving up ----------------------------------------------

def test_a_refused_endpoint_is_followed_by_the_next_with_the_bytes_replayed(run):
    async def scenario():
        refused = Endpoint("127.0.0.1", closed_port())
        good = listening()
        async with world([refused, good]) as w:
            client = socket.create_connection(w.front)
            client.sendall(b"early bytes")  # sent before any endpoint is confirmed
            backend = await w.accept()
            assert await recv_exactly(backend, 11) == b"early bytes"
            relay = w.relay()
            await w.until(lambda: relay.connected, "confirmed")
            assert relay.upstream.endpoint == Endpoint(*good.getsockname())
            assert w.stats["cluster.backend.upstream_cx_total"] == 2
            assert w.stats["cluster.backend.upstream_cx_connect_fail"] == 1
            assert w.stats.hosts["backend"][refused]["cx_connect_fail"] == 1
            client.close()
            backend.close()
    run(scenario())


async def closed_as_envoy_closes(client: socket.socket, sent: bytes) -> None:
    """The client sends `sent`; it must see a FIN if that was nothing, else a RST."""
    client.settimeout(STEP)
    client.sendall(sent)
    loop = asyncio.get_running_loop()
    if sent:
        with pytest.raises(ConnectionResetError):
            await loop.run_in_executor(None, client.recv, 10)
    else:
        assert await loop.run_in_executor(None, client.recv, 10) == b""


@pytest.mark.parametrize("sent", [b"", b"hello"])
def test_no_endpoint_left_closes_the_client_as_envoy_does(run, sent):
    """A FIN for a client that has sent nothing, a RST for one that has (Envoy's close of
    a socket with unread bytes; tests/envoy/test_datapath_conformance.py compares). Its bytes
    were never relayed: tcp_proxy's figure leaves them out, as Envoy, which never read them."""
    async def scenario():
        async with world([Endpoint("127.0.0.1", closed_port()), Endpoint("127.0.0.1", closed_port())],
                         stat_prefix="front_tcp") as w:
            client = socket.create_connection(w.front)
            await closed_as_envoy_closes(client, sent)
            await w.until(lambda: not w.shared.live, "the relay ended")
            assert w.stats["cluster.backend.upstream_cx_connect_fail"] == 2
            assert w.stats["cluster.backend.upstream_cx_active"] == 0
            assert w.stats["tcp.front_tcp.downstream_cx_rx_bytes_total"] == 0
            client.close()
    run(scenario())


@pytest.mark.parametrize("sent", [b"", b"hello"])
def test_a_close_chain_closes_as_envoy_does(run, sent):
    """action close (a bootstrap's chain without filters, or naming no cluster there is):
    a FIN, or a RST once the client has sent bytes; tcp_proxy's no_route counts it."""
    async def scenario():
        async with world([listening()], action="close", cluster=None, stat_prefix="front_tcp") as w:
            client = socket.create_connection(w.front)
            await closed_as_envoy_closes(client, sent)
            await w.until(lambda: not w.shared.live, "the relay ended")
            assert w.stats["tcp.front_tcp.downstream_cx_no_route"] == 1
            assert w.stats["cluster.backend.upstream_cx_total"] == 0
            client.close()
    run(scenario())


# --- splice: a bulk direction moves to a pump and keeps the byte order ----------------------

def test_a_bulk_upload_moves_to_a_pump_in_order(run):
    async def scenario():
        async with world([listening()], splice="auto") as w:
            client = socket.create_connection(w.front)
            backend = await w.accept()
            payload = bytes(range(256)) * (16 << 10)  # 4 MiB, a pattern that shows reordering
            loop = asyncio.get_running_loop()
            sending = loop.run_in_executor(None, lambda: (client.sendall(payload), client.shutdown(socket.SHUT_WR)))
            got = await recv_eof(backend)
            await sending
            assert got == payload
            assert w.stats["splice.pumps_total"] >= 1
            client.close()
            backend.close()
    run(scenario())


def test_a_connection_to_nowhere_is_refused_at_once_not_hung():
    """The errno the relay reads as a failed connect (not a reset) is what Linux gives."""
    sock = socket.socket()
    sock.setblocking(False)
    assert sock.connect_ex(("127.0.0.1", closed_port())) in (errno.EINPROGRESS, errno.ECONNREFUSED)
    sock.close()


# --- a chain's own settings: tcp_proxy stats, idle timeout, access log ----------------------

def test_a_chains_stat_prefix_idle_timeout_and_access_log(run, tmp_path):
    log_path = tmp_path / "tcp.log"
    fmt = "%DOWNSTREAM_REMOTE_ADDRESS% %UPSTREAM_HOST% %BYTES_RECEIVED% %BYTES_SENT% %RESPONSE_FLAGS%\n"

    async def scenario():
        async with world([listening()], stat_prefix="front_tcp", idle_timeout=0.3,
                         access_logs=(LogSpec(str(log_path), fmt),)) as w:
            reader, writer, backend = await w.exchanged(b"12345", b"abc")
            relay = w.relay()
            assert relay.idle_timeout == 0.3 and w.stats["tcp.front_tcp.downstream_cx_total"] == 1
            live = w.shared.live_counts()
            assert live["tcp.front_tcp.downstream_cx_rx_bytes_total"] == 5
            assert live["tcp.front_tcp.downstream_cx_tx_bytes_total"] == 3
            assert close_idle(list(w.shared.live.values())) == 0  # a sweep notes the bytes that moved
            await asyncio.sleep(0.4)
            assert close_idle(list(w.shared.live.values())) == 1  # quiet longer than its chain allows
            assert await asyncio.wait_for(reader.read(), STEP) == b""
            await w.until(lambda: not w.shared.live, "the relay ended")
            assert w.stats["tcp.front_tcp.idle_timeout"] == 1
            assert w.stats["tcp.front_tcp.downstream_cx_rx_bytes_total"] == 5
            client = writer.get_extra_info("sockname")
            writer.close()
            backend.close()
            return client

    client = run(scenario())
    line = log_path.read_text()
    assert line.endswith("\n") and line.count("\n") == 1
    source, upstream, received, sent, flags = line.split()
    assert source == f"{client[0]}:{client[1]}" and (received, sent, flags) == ("5", "3", "-")
    assert upstream.startswith("127.0.0.1:")
