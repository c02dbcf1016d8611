"""The way upstream: endpoint order, one socket per attempt, the next endpoint when one fails.

A connection's chain names a cluster (or its original destination); the
`Connector` tries the cluster's endpoints in their round-robin order, each
once, until one connects. It counts every attempt as Envoy does
(`cluster.<name>.upstream_cx_total`; a failure is an `upstream_cx_connect_fail`,
a timeout an `upstream_cx_connect_timeout` too) and closes the client as
Envoy does when no endpoint is left: a FIN if it has sent nothing, else a
RST (relay.Relay.close_unserved). The endpoints still to try travel with each
attempt (`Attempts`), so the relay never holds them.

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

The socket is a `LoopSocket`: what the event loop asks of it on the way in
(its family and type, and to be non-blocking) costs no system call and no
enum look-up, since socket() made it non-blocking already.
"""

from __future__ import annotations

import _socket
import asyncio
import dataclasses
import errno
import logging
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from sys import intern
from typing import Any, cast

from ..config import (
    DEFAULT_CLEANUP_INTERVAL,
    INBOUND_PASSTHROUGH_V4,
    INBOUND_PASSTHROUGH_V6,
    ORIGINAL_DST,
    Chain,
    Config,
    Endpoint,
)
from .balance import LeastRequest, attempts, pick_weighted, policy_for
from .relay import Relay, Upstream
from .sockopts import set_mark, set_transparent, unmapped
from .stats import Names, Stats

log = logging.getLogger("proxy.listener")

# errnos that mean "this process or the machine is out of something", not
# "the upstream said no": the proxy backs off and recovers from these.
EXHAUSTION = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

_NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_RAW_FAMILY: Any = _socket.socket.family  # the C getters: plain ints (socket.socket's make enum members)
_RAW_TYPE: Any = _socket.socket.type


class LoopSocket(socket.socket):
    """A socket made non-blocking by socket() itself, to be handed to the event loop.

    loop.create_connection(sock=...) reads the socket's family and type and
    calls setblocking(False). socket.socket turns each read into an enum
    member (two look-ups per connection) and setblocking(False) into an
    ioctl(FIONBIO) the socket does not need: the kernel made it
    non-blocking and Python knows (its timeout is already 0). Here the
    reads give the plain numbers (equal to the enum members) and that call
    is a no-op; anything else is the standard socket's.
    """

    __slots__ = ()

    @property
    def family(self) -> int:  # type: ignore[override]
        return int(_RAW_FAMILY.__get__(self))

    @property
    def type(self) -> int:  # type: ignore[override]
        return int(_RAW_TYPE.__get__(self))

    def setblocking(self, flag: bool) -> None:
        if flag or self.gettimeout() != 0.0:
            super().setblocking(flag)


CLUSTER_STATS = ("upstream_cx_total", "upstream_cx_active", "upstream_cx_destroy", "upstream_cx_connect_fail",
                 "upstream_cx_connect_timeout", "upstream_cx_rx_bytes_total", "upstream_cx_tx_bytes_total",
                 "upstream_cx_none_healthy", "upstream_cx_overflow",
                 # who ended a connection: the upstream (its FIN or RST came first) or we; each TCP
                 # connection is one request in Envoy's TCP pool, hence the _with_active_rq twins
                 "upstream_cx_destroy_local", "upstream_cx_destroy_remote", "upstream_cx_destroy_with_active_rq",
                 "upstream_cx_destroy_local_with_active_rq", "upstream_cx_destroy_remote_with_active_rq")
# an ORIGINAL_DST cluster's hosts come and go (a STATIC one's: admin/api.py renders them)
ORIGINAL_DST_STATS = (*CLUSTER_STATS, "membership_change")


class MarkDenied(Exception):
    """SO_MARK (or IP_TRANSPARENT) was refused: a privilege problem, not the upstream's fault."""


OwnKey = tuple[str, int, str, int]  # (source, source port, destination, destination port) of our socket


class OwnSockets:
    """The proxy's live upstream sockets, by their 4-tuple (for the loop guard).

    A connection that loops back is accepted with our socket's source as its
    peer and our socket's destination as its original destination, so the
    full (source, source port, destination, destination port) names it
    exactly; the source pair alone could also be an app's connection to
    somewhere else that got the same ephemeral port.
    """

    def __init__(self) -> None:
        self._keys: set[OwnKey] = set()

    def add(self, sock: socket.socket, endpoint: Endpoint) -> OwnKey:
        host, port = sock.getsockname()[:2]
        key = (intern(unmapped(host)), port, endpoint.host, endpoint.port)
        self._keys.add(key)
        return key

    def discard(self, key: OwnKey) -> bool:
        """Forget `key`; whether it was there."""
        if key in self._keys:
            self._keys.remove(key)
            return True
        return False

    def __contains__(self, key: OwnKey) -> bool:
        return key in self._keys


def open_socket(endpoint: Endpoint, mark: int | None, own: OwnSockets,
                source: str | None = None, transparent: bool = False) -> tuple[socket.socket, OwnKey]:
    """A socket whose connect() to `endpoint` has begun, and its loop-guard key;
    `source`: the address to connect from (Envoy's upstream_bind_config);
    `transparent`: IP_TRANSPARENT, so that `source` may be an address that is not
    ours (the client's, with TPROXY: Envoy's original_src; the port stays the
    kernel's choice, as there: bound to the client's port too, the connection
    would have the very addresses and ports of the client's own connection to
    the app's address, which the kernel delivers to the proxy's socket).

    Raises MarkDenied, or OSError for what fails at once (EMFILE, ENETUNREACH, ...).
    """
    ipv6 = ":" in endpoint.host
    sock = LoopSocket(socket.AF_INET6 if ipv6 else socket.AF_INET, _NONBLOCKING_STREAM)
    try:
        if transparent:
            try:
                set_transparent(sock, ipv6)
            except PermissionError as exc:
                raise MarkDenied(f"setsockopt(IP_TRANSPARENT): {exc.strerror}") from None
        if mark is not None:
            try:
                set_mark(sock, mark)
            except PermissionError as exc:
                raise MarkDenied(f"setsockopt(SO_MARK {mark:#x}): {exc.strerror}") from None
        if source is not None:
            if ipv6 and source == INBOUND_PASSTHROUGH_V4:
                source = INBOUND_PASSTHROUGH_V6
            sock.bind((source, 0))
        err = sock.connect_ex((endpoint.host, endpoint.port))
        if err != errno.EINPROGRESS and err != 0:
            raise OSError(err, errno.errorcode.get(err, "error"))
        return sock, own.add(sock, endpoint)  # before any event runs: see the module docstring
    except BaseException:
        sock.close()
        raise


Connecting = Coroutine[Any, Any, tuple[asyncio.BaseTransport, Any]]  # what loop.create_connection returns


def start(coro: Connecting, sock: socket.socket, on_error: Callable[[BaseException], None]) -> None:
    """Run `coro` (the loop's create_connection for `sock`) to its end without a Task.

    It suspends on one future, resolved once the protocol's connection_made
    has run; a Task would add a weak-set entry, a context copy and a
    scheduling round per connection for nothing. The coroutine must still be
    finished, not dropped: after that await it hands the socket object to
    the transport, and a coroutine collected while suspended would close the
    transport. `on_error(exc)` gets whatever it raises.

    uvloop hands the socket object over only after that await, so a
    connection that fails in between (refused at once, or the client gone)
    has its descriptor closed by the loop while `sock` still believes it owns
    it; collected later, `sock` would close the same number again, by then
    perhaps another connection's (uvloop issues 645 and 738). So once the
    coroutine is done, a transport that is already closed gets `sock`
    detached from the number.
    """
    _Start(coro, sock, on_error).step()


class _Start:
    """The steps of `start`: a bound method as the future's callback, not a closure
    that refers to itself (a reference cycle per connection for the garbage collector)."""

    __slots__ = ("coro", "sock", "on_error")

    def __init__(self, coro: Connecting, sock: socket.socket, on_error: Callable[[BaseException], None]) -> None:
        self.coro, self.sock, self.on_error = coro, sock, on_error

    def step(self, _: object = None) -> None:
        try:
            future = self.coro.send(None)
        except StopIteration as done:
            transport = done.value[0]
            if transport.is_closing():
                _forget_if_closed(transport, self.sock)
            return
        except (Exception, asyncio.CancelledError) as exc:
            self.on_error(exc)
            return
        future.add_done_callback(self.step)


def _forget_if_closed(transport: asyncio.BaseTransport, sock: socket.socket) -> None:
    """Detach `sock` if the transport's descriptor is already closed (see `start`)."""
    live = transport.get_extra_info("socket")
    if live is None or live.fileno() < 0:
        sock.detach()


def _names(cluster: str, kind: str) -> Names:
    return Names(f"cluster.{cluster}.", ORIGINAL_DST_STATS if kind == "original_dst" else CLUSTER_STATS)


def _to_app(passthrough: Route, config: Config) -> Route:
    """How inbound connections reach the app (the original destination, one of ours):
    with TPROXY from the client's address and with the tproxy mark (iptables/rules.sh:
    the mark exempts the connection and routes the app's replies back to us); with
    inbound_source 127.0.0.6 from there (::6 for IPv6); else as any passthrough."""
    if config.inbound_mode == "tproxy":
        return dataclasses.replace(passthrough, mark=config.tproxy_mark, bind_client=True)
    if config.inbound_source != "pod-ip":
        return dataclasses.replace(passthrough, source=INBOUND_PASSTHROUGH_V4)
    return passthrough


# --- attempts ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Route:
    """How one cluster's upstream connections are made."""

    names: Names  # its stats: "cluster.<name>.upstream_cx_total", ...
    timeout: float  # per attempt
    mark: int | None
    kind: str  # static, or original_dst: its one endpoint is each connection's original destination
    source: str | None  # the address upstream sockets are bound to
    limit: int | None  # the circuit breaker: at most this many connections open (or opening)
    bind_client: bool = False  # bound to the client's address instead, with IP_TRANSPARENT (TPROXY)
    cleanup: float = DEFAULT_CLEANUP_INTERVAL  # original_dst: how often its idle hosts are swept away


class Attempts:
    """One connection's way upstream: its cluster and the endpoints still to try."""

    __slots__ = ("cluster", "route", "left")

    def __init__(self, cluster: str, route: Route, endpoints: list[Endpoint]) -> None:
        self.cluster, self.route, self.left = cluster, route, endpoints


class Connector:
    """Makes the upstream attempts of every connection of one proxy process."""

    def __init__(self, config: Config, stats: Stats, own: OwnSockets, loop: asyncio.AbstractEventLoop,
                 note_exhaustion: Callable[[Relay, str], None]) -> None:
        """`note_exhaustion(relay, message)`: no socket for `relay`, for want of descriptors or
        memory (counted and logged by the caller)."""
        self.stats, self.own, self.loop, self.note_exhaustion = stats, own, loop, note_exhaustion
        self.policies = {c.name: policy_for(c) for c in config.clusters if c.kind == "static"}
        self.routes = {c.name: Route(_names(c.name, c.kind), c.connect_timeout,
                                     c.mark if c.mark is not None else config.mark, c.kind, c.source_address,
                                     c.max_connections, cleanup=c.cleanup_interval) for c in config.clusters}
        self.routes[ORIGINAL_DST] = Route(_names(ORIGINAL_DST, "original_dst"),
                                          config.connect_timeout, config.mark, "original_dst", None, None)
        self.to_app = _to_app(self.routes[ORIGINAL_DST], config)
        self.opening = dict.fromkeys(self.routes, 0)  # per cluster: sockets open or opening (the breaker)
        # Per original_dst cluster with hosts in /clusters: the hosts picked since its last sweep
        # (a sweep is due while the cluster is here). As Envoy's cleanup_interval: a host leaves
        # at the first sweep that finds it with no connection open and not picked since the one before.
        self.picked: dict[str, set[Endpoint]] = {}
        for route in self.routes.values():
            stats.declare(*route.names.all)
        for cluster in config.clusters:  # /clusters lists every configured endpoint from the start
            for endpoint in cluster.endpoints:
                stats.host(cluster.name, endpoint)

    def forward(self, relay: Relay, chain: Chain) -> None:
        """Connect `relay` upstream as its chain says (action cluster, or original)."""
        if chain.action == "original":
            cluster = ORIGINAL_DST
        else:
            cluster = pick_weighted(chain.weighted) if chain.weighted else cast(str, chain.cluster)
        relay.cluster = cluster
        route = self.routes[cluster]
        if cluster == ORIGINAL_DST and relay.direction == "inbound":
            route = self.to_app
        if route.kind == "original_dst":
            if relay.destination is None:  # a listener that never learns one
                relay.close("no_original_destination", reset=True)
                return
            endpoints = [relay.destination]
            self._picked(cluster, route, relay.destination)
        else:
            endpoints = self.policies[cluster].order()
        if not endpoints:  # Envoy: no healthy upstream; Istio's BlackHoleCluster
            self.stats.inc(route.names.upstream_cx_none_healthy)
            relay.close_unserved("no_healthy_upstream")
            return
        self._next(relay, Attempts(cluster, route, attempts(endpoints, chain.max_connect_attempts)))

    def _next(self, relay: Relay, attempts: Attempts) -> None:
        """Start connecting to the next endpoint; give up when none is left."""
        route, left = attempts.route, attempts.left
        while left:
            if route.limit is not None and self.opening[attempts.cluster] >= route.limit:
                self.stats.inc(route.names.upstream_cx_overflow)  # Envoy's circuit breaker
                relay.close_unserved("upstream_overflow")
                return
            endpoint = left.pop(0)
            self.stats.counters[route.names.upstream_cx_total] += 1  # each attempt counts, as in Envoy
            try:
                if route.bind_client and relay.source is not None:
                    sock, key = open_socket(endpoint, route.mark, self.own, relay.source.host, transparent=True)
                else:
                    sock, key = open_socket(endpoint, route.mark, self.own, route.source)
            except MarkDenied as exc:  # the privilege went away after start-up?
                log.error("conn=%d privilege: %s", relay.id, exc)
                relay.close("error", reset=True)
                return
            except OSError as exc:
                self._count_failure(attempts.cluster, endpoint, timed_out=False)
                if exc.errno in EXHAUSTION:  # no other endpoint will fare better
                    self.note_exhaustion(relay, f"out of resources ({errno.errorcode[exc.errno]} opening a socket to "
                                         f"{endpoint}): refusing connections until some close")
                    relay.close("connect_failed", reset=True)
                    return
                if not left:
                    self._gave_up(relay, endpoint, exc.strerror or str(exc), timed_out=False)
                continue
            self.opening[attempts.cluster] += 1
            up = Upstream(relay, endpoint, key, sock, attempts)
            relay.attach(up, timeout=route.timeout)
            start(self.loop.create_connection(lambda: up, sock=sock), sock,  # noqa: B023 (the loop ends here)
                  partial(relay.start_failed, up))
            return

    def release(self, up: Upstream) -> None:
        """An attempt's socket is done with (failed, or its connection ended): once per attempt."""
        if self.own.discard(up.key):
            self.opening[up.attempts.cluster] -= 1

    def connected(self, relay: Relay, up: Upstream) -> None:
        """The relay confirmed its upstream: count it as an open connection."""
        stats = self.stats
        stats.counters[up.attempts.route.names.upstream_cx_active] += 1
        host = stats.host(up.attempts.cluster, up.endpoint)
        host["cx_total"] += 1
        host["cx_active"] += 1
        host["rq_total"] += 1  # Envoy's TCP pool counts each connection as a request too
        host["rq_active"] += 1
        policy = self.policies.get(up.attempts.cluster)
        if isinstance(policy, LeastRequest):
            policy.opened(up.endpoint)

    def failed(self, relay: Relay, up: Upstream, timed_out: bool, reason: str) -> None:
        """One attempt failed: the next endpoint, or the end of the connection."""
        self.release(up)
        self._count_failure(up.attempts.cluster, up.endpoint, timed_out)
        if up.attempts.left:
            self._next(relay, up.attempts)
        else:
            self._gave_up(relay, up.endpoint, reason, timed_out)

    def closed(self, relay: Relay, up: Upstream, sent: int, received: int) -> None:
        """A connected upstream is gone: `sent` and `received` bytes in all."""
        stats, names, cluster = self.stats, up.attempts.route.names, up.attempts.cluster
        counters = stats.counters  # (the counters themselves: fewer calls per connection)
        counters[names.upstream_cx_active] -= 1
        counters[names.upstream_cx_destroy] += 1
        counters[names.upstream_cx_destroy_with_active_rq] += 1
        if relay.closed_remotely:
            counters[names.upstream_cx_destroy_remote] += 1
            counters[names.upstream_cx_destroy_remote_with_active_rq] += 1
        else:
            counters[names.upstream_cx_destroy_local] += 1
            counters[names.upstream_cx_destroy_local_with_active_rq] += 1
        counters[names.upstream_cx_tx_bytes_total] += sent
        counters[names.upstream_cx_rx_bytes_total] += received
        host = stats.host(cluster, up.endpoint)
        host["cx_active"] -= 1
        host["rq_active"] -= 1
        policy = self.policies.get(cluster)
        if isinstance(policy, LeastRequest):
            policy.closed(up.endpoint)

    def _picked(self, cluster: str, route: Route, endpoint: Endpoint) -> None:
        """An original destination is picked: listed from now (a new host changes the
        cluster's membership, as in Envoy), and past the next sweep."""
        picked = self.picked.get(cluster)
        if picked is None:
            picked = self.picked[cluster] = set()
            self.loop.call_later(route.cleanup, self._sweep, cluster, route)
        picked.add(endpoint)
        stats = self.stats
        if endpoint not in stats.hosts.get(cluster, ()):
            stats.host(cluster, endpoint)
            stats.counters[route.names.membership_change] += 1

    def _sweep(self, cluster: str, route: Route) -> None:
        """Envoy's ORIGINAL_DST cleanup: forget the hosts with no connection open that
        were not picked since the last sweep (one membership change, however many go);
        sweep again while any host is left."""
        stats = self.stats
        if stats.sweep_hosts(cluster, keep=self.picked.pop(cluster)):
            stats.counters[route.names.membership_change] += 1
        if stats.hosts[cluster]:
            self.picked[cluster] = set()
            self.loop.call_later(route.cleanup, self._sweep, cluster, route)

    def _gave_up(self, relay: Relay, endpoint: Endpoint, reason: str, timed_out: bool) -> None:
        """No endpoint is left: the client is closed as Envoy closes it (the end reason is the last attempt's)."""
        log.info("conn=%d upstream connect failed: %s: %s", relay.id, endpoint, reason)
        relay.close_unserved("connect_timeout" if timed_out else "connect_failed")

    def _count_failure(self, cluster: str, endpoint: Endpoint, timed_out: bool) -> None:
        """As in Envoy: a failed attempt is an upstream_cx_connect_fail, and one
        that timed out an upstream_cx_connect_timeout too."""
        route = self.routes[cluster]
        stats, names = self.stats, route.names
        stats.inc(names.upstream_cx_connect_fail)
        # a failed attempt is a connection destroyed too, as Envoy counts it: by the upstream's
        # refusal, or by us at the timeout; no request was active on it
        stats.inc(names.upstream_cx_destroy)
        stats.inc(names.upstream_cx_destroy_local if timed_out else names.upstream_cx_destroy_remote)
        if timed_out:
            stats.inc(names.upstream_cx_connect_timeout)
        host = stats.host(cluster, endpoint)
        host["cx_total"] += 1
        host["cx_connect_fail"] += 1
