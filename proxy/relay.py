"""The two-way byte pump between a client (downstream) and its upstream.

Theory of operation
-------------------
Each connection is two asyncio Protocols, one per socket, wired to each
other. Bytes read on one side are handed straight to the other side's
transport; the event loop does the copying, Python touches each chunk once.
The mechanism was chosen by measurement on this kind of machine: a
minimal Protocols relay under uvloop moved about 1.8 GB/s through a
redirect, a StreamReader/StreamWriter one about 1.0 GB/s with higher
latency. bench/ measures this relay, features on, against direct and peers.

Backpressure: when a transport's write buffer passes its high-water mark the
loop calls `pause_writing()` on that side's protocol, which pauses *reading*
on the opposite socket; `resume_writing()` resumes it. So at most one read
chunk plus one write buffer per direction is ever held, however slow a
reader is. (Before the upstream is connected, up to EARLY_LIMIT bytes of the
client's first words wait in a list.)

Half-close: a FIN from one side (`eof_received`) becomes `write_eof()` on the
other, and the opposite direction keeps flowing. The connection is done when
both directions have seen their FIN; then both sockets are closed once their
buffers drain.

Reset: if one side fails (RST, or a write error), the other side is closed
with SO_LINGER 0, so its peer gets a RST too rather than a polite FIN that
would look like a complete response.

Idle timeout: one sweep for the whole process (`close_idle`, run by the
server eight times per timeout, at most once a second) compares each
connection's byte counters with what it saw last time; a connection whose
counters have not moved for a timeout is closed. The per-chunk path pays
nothing for it (no clock read, no timer reset), and one timer in all
instead of one per connection keeps an idle connection small; the price is
that idleness is noticed up to one sweep interval late.

No task per connection: once both sockets are wired, the connection is pure
callbacks, which keeps an idle connection to a few hundred bytes of objects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from .sockopts import arm_reset

_monotonic = time.monotonic

# Per-direction bound on bytes queued in our user-space write buffer before
# the opposite socket stops being read (asyncio's default high-water mark is
# 64 KiB; uvloop's is the same).
WRITE_HIGH_WATER = 256 * 1024


# Bytes a client may send before its upstream is connected, before we stop
# reading from it.
EARLY_LIMIT = 64 * 1024


class Side(asyncio.Protocol):
    """One socket of a relayed connection."""

    __slots__ = ("relay", "transport", "peer", "eof", "received", "name", "lost")

    def __init__(self, relay: Relay, name: str) -> None:
        self.relay = relay
        self.name = name  # "downstream" or "upstream"
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.eof = False
        self.lost = False  # connection_lost has run: the socket is closed
        self.received = 0  # bytes read from this socket

    # asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.relay.half_closed(self)
        return True  # keep our write direction open: this is a half-close

    def pause_writing(self) -> None:
        # Our socket cannot take more: stop reading what would be written to it.
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.side_lost(self, exc)

    @property
    def open(self) -> bool:
        """The socket is still there (connected, or closing with bytes to flush)."""
        return self.transport is not None and not self.lost


class Downstream(Side):
    """The accepted socket: its first bytes wait for the upstream."""

    __slots__ = ("early", "wired")

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.early: list[bytes] | None = None  # reads that came before the upstream
        self.wired = False  # set by Relay.start once the upstream is connected
        self.relay.on_accept(self.relay)

    def data_received(self, data: bytes) -> None:
        if not self.wired:
            # The upstream is still connecting: keep what the client sends
            # first (usually its first request), and stop reading once that
            # passes EARLY_LIMIT. Pausing right away would cost two syscalls
            # on every accept, and both loops ignore a pause made inside
            # connection_made anyway (they start reading after it returns).
            self.received += len(data)
            if self.early is None:
                self.early = []
            self.early.append(data)
            if self.received >= EARLY_LIMIT:
                self.transport.pause_reading()
            return
        super().data_received(data)

    def eof_received(self) -> bool:
        if not self.wired:  # Relay.start forwards it after the early bytes
            self.eof = True
            return True
        return super().eof_received()


class Relay:
    """One proxied connection: its two sides, counters and how it ended.

    `on_accept(relay)` is called when the client's socket is accepted;
    `on_end(relay)` exactly once, when both sockets are closed or closing.
    """

    __slots__ = ("id", "downstream", "upstream", "last_active", "bytes_seen",
                 "end", "started", "on_accept", "_on_end", "_ended",
                 "task", "upstream_key",
                 # what the connection is, for the access log and the admin API;
                 # plain fields rather than a dict: an idle connection stays small
                 "listener", "started_wall", "source", "destination", "direction",
                 "chain", "cluster", "endpoint", "upstream_stat")

    def __init__(self, conn_id: int, on_accept: Callable[[Relay], None],
                 on_end: Callable[[Relay], None]) -> None:
        self.id = conn_id
        self.downstream = Downstream(self, "downstream")
        self.upstream: Side | None = None
        self.on_accept = on_accept
        self.task: asyncio.Task | None = None  # the upstream connect, while it runs
        self.upstream_key: tuple | None = None  # our source address, for the loop guard
        self.last_active = self.started = _monotonic()  # kept by close_idle
        self.bytes_seen = 0  # both directions' counters at the last sweep
        self.end: str | None = None  # why it ended: done, idle_timeout, *_reset, ...
        self._on_end = on_end
        self._ended = False
        self.listener = "-"
        self.started_wall = 0.0
        self.source: tuple[str, int] | None = None  # (host, port)
        self.destination: tuple[str, int] | None = None  # the original destination
        self.direction = "-"
        self.chain = "-"
        self.cluster: str | None = None
        self.endpoint = None  # the upstream endpoint, once connected
        self.upstream_stat: str | None = None  # its cluster's stat prefix, once connected

    # set-up -------------------------------------------------------------------
    def attach_upstream(self) -> Side:
        """The protocol for the upstream socket, wired to the downstream one."""
        up = Side(self, "upstream")
        up.peer, self.downstream.peer = self.downstream, up
        self.upstream = up
        return up

    def start(self) -> None:
        """Both sockets are connected: let bytes flow."""
        self.last_active = _monotonic()
        down, up = self.downstream, self.upstream
        down.wired = True
        if down.early:
            for data in down.early:
                up.transport.write(data)
            down.early = None
        if down.eof:  # the client said all it had to say before we were connected
            self.half_closed(down)
        else:
            down.transport.resume_reading()

    # events from the sides ------------------------------------------------------
    def half_closed(self, side: Side) -> None:
        peer = side.peer
        if peer is None or peer.transport is None:
            return  # not wired yet: start() forwards the EOF
        if peer.transport.can_write_eof() and not peer.transport.is_closing():
            peer.transport.write_eof()
        # Both directions finished, unless the client's early bytes and FIN
        # still wait for start() (the upstream may finish before we wired it).
        if peer.eof and self.downstream.wired:
            self.close("done")

    def side_lost(self, side: Side, exc: Exception | None) -> None:
        peer = side.peer
        if exc is not None and self.end is None:
            self.end = f"{side.name}_reset"
        if peer is not None and peer.open:
            if exc is not None:
                self.reset(peer)  # a RST becomes a RST, even mid-flush
            elif not peer.transport.is_closing():
                peer.transport.close()
        self._maybe_ended()

    # ending -------------------------------------------------------------------
    def reset(self, side: Side) -> None:
        """Abort one side so its peer sees a RST (also one already closing)."""
        sock = side.transport.get_extra_info("socket")
        if sock is not None:
            arm_reset(sock)
        side.transport.abort()

    def close(self, reason: str, *, reset: bool = False) -> None:
        """End the connection: flush and close (or reset) both sockets.

        A graceful close waits for the write buffers to drain; a peer that
        never reads keeps the connection open (and in `live`, visible) until
        the idle sweep resets it.
        """
        if self.end is None:
            self.end = reason
        for side in (self.downstream, self.upstream):
            if side is not None and side.open:
                if reset:
                    self.reset(side)
                elif not side.transport.is_closing():
                    side.transport.close()
        self._maybe_ended()

    @property
    def ended(self) -> bool:
        return self._ended

    def _maybe_ended(self) -> None:
        if self._ended:
            return
        for side in (self.downstream, self.upstream):
            if side is not None and side.open:
                return  # ended only when both sockets are really closed
        self._ended = True
        self._on_end(self)

    def describe(self) -> dict:
        """The connection as plain data (the access log, /connections)."""
        return {
            "id": self.id, "start": self.started_wall, "listener": self.listener,
            "source": hostport(self.source), "destination": hostport(self.destination),
            "direction": self.direction, "chain": self.chain, "cluster": self.cluster,
            "upstream": str(self.endpoint) if self.endpoint is not None else None,
        }

    # counters -------------------------------------------------------------------
    @property
    def bytes_from_downstream(self) -> int:
        return self.downstream.received

    @property
    def bytes_from_upstream(self) -> int:
        return self.upstream.received if self.upstream is not None else 0


def hostport(addr: tuple[str, int] | None) -> str:
    """'192.0.2.1:80', '[2001:db8::1]:80', or '-'."""
    if addr is None:
        return "-"
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def idle_sweep_interval(timeout: float) -> float:
    """How often to sweep: an eighth of the timeout, at most once a second."""
    return min(timeout / 8, 1.0)


def close_idle(relays: Iterable[Relay], timeout: float, now: float | None = None) -> int:
    """Close every connection quiet for `timeout` seconds; how many.

    The first time, gracefully (as Envoy's idle timeout); a connection still
    there a timeout later is stuck flushing to a peer that does not read, and
    is reset.
    """
    now = _monotonic() if now is None else now
    quiet = []
    for relay in relays:
        moved = relay.bytes_from_downstream + relay.bytes_from_upstream
        if moved != relay.bytes_seen:  # bytes flowed since the last sweep
            relay.bytes_seen, relay.last_active = moved, now
        elif now - relay.last_active >= timeout:
            quiet.append(relay)
    for relay in quiet:
        stuck = relay.end is not None
        relay.close("idle_timeout", reset=stuck)
        relay.last_active = now
    return len(quiet)
