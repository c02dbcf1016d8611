"""Connection limits (datapath/limits.py) on real loopback sockets, both event loops."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from test_relay import STEP, listening

from proxy.config import Cluster, Config, Endpoint, plain_listener, redirect_listener
from proxy.control.worker import share_of_limits
from proxy.datapath.accesslog import AccessLog
from proxy.datapath.listener import Listener, Shared
from proxy.datapath.localaddrs import LocalAddresses
from proxy.datapath.stats import Stats


async def close(shared: Shared, servers: list[asyncio.Server], backend: socket.socket) -> None:
    for server in servers:
        server.close()
    for relay in list(shared.live.values()):
        relay.close("test_over", reset=True)
    await asyncio.sleep(0.01)
    backend.close()


async def serve(config: Config) -> tuple[Shared, list[tuple[str, int]], list[asyncio.Server]]:
    loop = asyncio.get_running_loop()
    shared = Shared(config, Stats(), AccessLog("off", "text"), LocalAddresses(), loop)
    servers = []
    for spec in config.listeners:
        listener = Listener(shared, loop, spec)
        servers.append(await loop.create_server(listener.protocol, "127.0.0.1", 0))
    return shared, [s.sockets[0].getsockname()[:2] for s in servers], servers


async def connected(address: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client whose connection the proxy took (its first byte went through to the backend)."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"x")
    return reader, writer


async def reset(address: tuple[str, int]) -> bool:
    """Whether the proxy refuses a new client with a reset (before any byte comes back)."""
    try:
        reader, writer = await asyncio.open_connection(*address)
        try:
            await asyncio.wait_for(reader.read(1), STEP)
        finally:
            writer.close()
    except ConnectionResetError:
        return True
    return False


def reset_by_client(writer: asyncio.StreamWriter) -> None:
    """Close with a RST, which ends both sides of the relay at once (a FIN would only half-close it)."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def config_with(backend: socket.socket, *, total: int | None = None, per: tuple[int | None, ...] = (None,)) -> Config:
    cluster = Cluster("backend", (Endpoint(*backend.getsockname()),))
    return Config(access_log="off", splice="off", max_connections=total, clusters=(cluster,),
                  listeners=tuple(plain_listener(f"p{i}", "127.0.0.1", 1 + i, "backend", limit)
                                  for i, limit in enumerate(per)))


def test_a_listener_limit_resets_the_next_and_counts_it(run):
    async def main():
        backend = listening()
        shared, (front,), servers = await serve(config_with(backend, per=(2,)))
        names = shared.listener_stats["p0"]
        held = [await connected(front) for _ in range(2)]
        await until(lambda: len(shared.live) == 2)
        assert await reset(front)
        assert shared.stats[names.downstream_cx_overflow] == 1
        assert shared.stats[names.downstream_cx_total] == 2  # a refused connection is not one of them
        reset_by_client(held.pop()[1])  # one ends: there is room again
        await until(lambda: len(shared.live) == 1)
        held.append(await connected(front))
        await until(lambda: len(shared.live) == 2)
        assert shared.stats[names.downstream_cx_overflow] == 1
        for _, writer in held:
            writer.close()
        await close(shared, servers, backend)
    run(main())


def test_the_global_limit_holds_across_listeners(run):
    async def main():
        backend = listening()
        shared, (first, second), servers = await serve(config_with(backend, total=3, per=(None, None)))
        held = [await connected(first) for _ in range(2)] + [await connected(second)]
        await until(lambda: len(shared.live) == 3)
        assert await reset(first) and await reset(second)
        assert shared.stats[shared.listener_stats["p0"].downstream_global_cx_overflow] == 1
        assert shared.stats[shared.listener_stats["p1"].downstream_global_cx_overflow] == 1
        assert shared.stats[shared.listener_stats["p0"].downstream_cx_overflow] == 0
        for _, writer in held:  # the open ones were never touched
            writer.write(b"y")
            await writer.drain()
        for _, writer in held:
            writer.close()
        await close(shared, servers, backend)
    run(main())


def test_a_burst_never_gets_past_the_limit(run):
    """Many connections at once: the loop accepts them in batches; none beyond the limit."""
    async def main():
        backend = listening()
        backend.listen(512)
        shared, (front,), servers = await serve(config_with(backend, per=(10,)))
        peak = 0

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, len(shared.live))
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        socks = []
        for _ in range(100):  # connect() completes in the kernel's backlog, all at once
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(front)
            socks.append(s)
        names = shared.listener_stats["p0"]
        await until(lambda: shared.stats[names.downstream_cx_overflow] + shared.stats[names.downstream_cx_total]
                    == 100)
        watcher.cancel()
        assert shared.stats[names.downstream_cx_total] == 10 and len(shared.live) == 10 and peak <= 10
        for s in socks:
            s.close()
        await close(shared, servers, backend)
    run(main())


async def until(condition) -> None:
    deadline = asyncio.get_running_loop().time() + STEP
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("never happened")
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("limit, count, shares", [(10, 2, [5, 5]), (5, 2, [3, 2]), (1, 3, [1, 0, 0]),
                                                  (None, 2, [None, None])])
def test_workers_share_every_limit_out(limit, count, shares):
    config = Config(max_connections=limit, clusters=(Cluster("c", (Endpoint("198.51.100.1", 80),)),),
                    listeners=(redirect_listener(max_connections=limit),
                               plain_listener("p", "127.0.0.1", 15080, "c", limit)))
    got = [share_of_limits(config, i, count) for i in range(count)]
    assert [c.max_connections for c in got] == shares
    assert [c.listeners[0].max_connections for c in got] == shares
    assert [c.listeners[1].max_connections for c in got] == shares
