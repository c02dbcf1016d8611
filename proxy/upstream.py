"""Opening the upstream connection: endpoint choice, mark, timeout, loop guard.

The socket is made by hand rather than by `loop.create_connection(host, port)`
for two reasons:

* SO_MARK must be set before the SYN leaves, or the mark-based bypass rule
  never sees it;
* the loop guard must know our own source address *before* the handshake can
  complete: if the rules fail to exempt the proxy, the SYN comes straight
  back to our listener, and the accept callback must be able to recognise it
  as ours. A non-blocking connect() fixes the source address at once, so it
  is registered before the event loop can run the accept.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Sequence

from .config import Cluster, Endpoint
from .sockopts import set_mark, unmapped


# errnos that mean "this process or the machine is out of something", not
# "the upstream said no": the proxy backs off and recovers from these.
EXHAUSTION = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class ConnectFailed(Exception):
    """No endpoint could be reached; `timeout` tells a timeout from a refusal,
    `exhausted` a lack of descriptors or memory on our side."""

    def __init__(self, reason: str, *, timeout: bool, exhausted: bool = False) -> None:
        super().__init__(reason)
        self.timeout = timeout
        self.exhausted = exhausted


class MarkDenied(Exception):
    """SO_MARK was refused: a privilege problem, not the upstream's fault."""


class OwnSockets:
    """The proxy's live upstream sockets, by their 4-tuple (for the loop guard).

    A connection that loops back is accepted with our socket's source as its
    peer and our socket's destination as its original destination, so the
    full (source, source port, destination, destination port) names it
    exactly; the source pair alone could also be an app's connection to
    somewhere else that got the same ephemeral port.
    """

    def __init__(self) -> None:
        self._keys: set[tuple] = set()

    def add(self, sock: socket.socket, endpoint: Endpoint) -> tuple:
        host, port = sock.getsockname()[:2]
        key = (unmapped(host), port, endpoint.host, endpoint.port)
        self._keys.add(key)
        return key

    def discard(self, key: tuple | None) -> None:
        self._keys.discard(key)

    def __contains__(self, key: tuple) -> bool:
        return key in self._keys


class RoundRobin:
    """Endpoint order for one cluster: each call starts one further along."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._next = 0

    def order(self) -> list[Endpoint]:
        eps = self.cluster.endpoints
        start = self._next % len(eps)
        self._next = start + 1
        return list(eps[start:] + eps[:start])


async def _connect_one(loop: asyncio.AbstractEventLoop, endpoint: Endpoint, timeout: float,
                       mark: int | None, own: OwnSockets) -> tuple[socket.socket, tuple]:
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    key = None
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mark is not None:
            try:
                set_mark(sock, mark)
            except PermissionError as exc:
                raise MarkDenied(f"setsockopt(SO_MARK {mark:#x}): {exc.strerror}") from None
        try:
            sock.connect((endpoint.host, endpoint.port))
        except BlockingIOError:
            pass
        key = own.add(sock, endpoint)  # before any await: see the module docstring
        writable = loop.create_future()
        loop.add_writer(sock.fileno(), lambda: writable.done() or writable.set_result(None))
        try:
            async with asyncio.timeout(timeout):
                await writable
        finally:
            loop.remove_writer(sock.fileno())
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        return sock, key
    except BaseException:
        own.discard(key)
        sock.close()
        raise


async def connect(loop: asyncio.AbstractEventLoop, endpoints: Sequence[Endpoint], timeout: float,
                  mark: int | None, own: OwnSockets,
                  failed: list[tuple[Endpoint, bool]] | None = None) -> tuple[socket.socket, Endpoint, tuple]:
    """Connect to the first endpoint that answers, each tried once in order.

    Each endpoint that refused or timed out is appended to `failed` as
    (endpoint, timed_out), also when a later one answers (for the stats).
    """
    reasons = []
    timeouts = 0
    for endpoint in endpoints:
        try:
            sock, key = await _connect_one(loop, endpoint, timeout, mark, own)
            return sock, endpoint, key
        except TimeoutError:
            timeouts += 1
            reasons.append(f"{endpoint}: timed out after {timeout:g}s")
            if failed is not None:
                failed.append((endpoint, True))
        except OSError as exc:
            if failed is not None and exc.errno not in EXHAUSTION:
                failed.append((endpoint, False))
            name = errno.errorcode.get(exc.errno or 0, "error")
            reasons.append(f"{endpoint}: {name} ({exc.strerror})")
            if exc.errno in EXHAUSTION:  # no other endpoint will fare better
                raise ConnectFailed(reasons[-1], timeout=False, exhausted=True) from None
    raise ConnectFailed("; ".join(reasons), timeout=timeouts == len(reasons))
