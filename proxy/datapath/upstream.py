"""Opening the upstream socket: endpoint order, mark, the loop guard's registry.

Each attempt makes its socket by hand and starts a non-blocking connect(),
then gives the socket, still connecting, to the event loop
(`create_connection(sock=...)`), without waiting for the handshake:

* SO_MARK must be set before the SYN leaves, or the mark-based bypass rule
  never sees it;
* the loop guard must know our own source address *before* the handshake can
  complete: if the rules fail to exempt the proxy, the SYN comes straight
  back to our listener, and the accept callback must be able to recognise it
  as ours. A non-blocking connect() fixes the source address at once, so it
  is registered before the event loop can run the accept;
* not waiting for writability in Python costs one epoll registration and one
  coroutine round less per connection; the relay works out when the
  connection is up (relay.py, "Connecting without waiting").

A refusal usually arrives later, as the transport's error (relay.py tells a
connect error from a reset by its errno); what fails at once (no route, no
descriptors left) is an OSError here.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Coroutine
from sys import intern

from ..config import Cluster, Endpoint
from .sockopts import set_mark, unmapped

# errnos that mean "this process or the machine is out of something", not
# "the upstream said no": the proxy backs off and recovers from these.
EXHAUSTION = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

_NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK


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
        key = (intern(unmapped(host)), port, endpoint.host, endpoint.port)
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


def open_socket(endpoint: Endpoint, mark: int | None, own: OwnSockets) -> tuple[socket.socket, tuple]:
    """A socket whose connect() to `endpoint` has begun, and its loop-guard key.

    Raises MarkDenied, or OSError for what fails at once (EMFILE, ENETUNREACH, ...).
    """
    sock = socket.socket(socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET, _NONBLOCKING_STREAM)
    try:
        if mark is not None:
            try:
                set_mark(sock, mark)
            except PermissionError as exc:
                raise MarkDenied(f"setsockopt(SO_MARK {mark:#x}): {exc.strerror}") from None
        err = sock.connect_ex((endpoint.host, endpoint.port))
        if err != errno.EINPROGRESS and err != 0:
            raise OSError(err, errno.errorcode.get(err, "error"))
        return sock, own.add(sock, endpoint)  # before any event runs: see the module docstring
    except BaseException:
        sock.close()
        raise


def start(coro: Coroutine, on_error: Callable[[BaseException], None]) -> None:
    """Run `coro` (the loop's create_connection) to its end without a Task.

    It suspends on one future, resolved once the protocol's connection_made
    has run; a Task would add a weak-set entry, a context copy and a
    scheduling round per connection for nothing. The coroutine must still be
    finished, not dropped: after that await it hands the socket object to
    the transport, and a coroutine collected while suspended would close the
    transport. `on_error(exc)` gets whatever it raises.
    """
    def step(_=None) -> None:
        try:
            future = coro.send(None)
        except StopIteration:
            return
        except (Exception, asyncio.CancelledError) as exc:
            on_error(exc)
            return
        future.add_done_callback(step)

    step()
