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
reader is.

Half-close: a FIN from one side (`eof_received`) becomes `write_eof()` on the
other, and the opposite direction keeps flowing. When the second FIN comes,
both directions are done and both sockets are closed once their buffers
drain (a close sends the FIN the second `write_eof()` would have).

Reset: if one side fails (RST, or a write error), the other side is closed
with SO_LINGER 0, so its peer gets a RST too rather than a polite FIN that
would look like a complete response. Both sockets carry SO_LINGER 0 from
the start, so that when the process dies (a worker killed, or crashed), the
kernel's close resets both peers too: the accepted one has it from its
listening socket (control/sockets.py), the upstream one gets it when its
transport is made; a graceful close turns it off first (`shut`), to send
what is left and a FIN. Three setsockopt calls a connection; README,
"Workers", has the figure.

Bulk: a direction whose reads come SPLICE_AFTER bytes at a time is handed
to a splice.Pump, which moves it in the kernel (splice.py); the pump reports
its end of stream and its errors here, as the transport would have.

Connecting without waiting
--------------------------
The upstream socket starts its connect() and goes to the event loop at once,
still connecting (see upstream.py): its transport queues what is written
until the handshake completes. That saves a round of waiting for
writability in Python per connection (a 60-line relay made a quarter more
connections/s that way here), but the loop never says when the connection
is up, so the relay infers it. The upstream is *confirmed* by the first of:

* a byte or a FIN from it (only a connected socket delivers those);
* a write the kernel took at once (nothing left in the transport's buffer);
* the transport's buffer draining: while connecting its high-water mark is
  0, so the first queued byte pauses the client, and the handshake, which
  lets the buffer drain, resumes it;
* the connect deadline, where the socket is asked (getpeername) whether it
  is connected after all; and when the client has sent its FIN with nothing
  that could confirm the upstream, it is asked every CONNECT_POLL seconds.

It has *failed* if its socket ends before that with an error only a connect
gives (refused, unreachable, timed out), or is still not connected at the
deadline. Until it is confirmed, the client's FIN is held back (a shutdown()
of a socket still connecting would abort the connect), and when another
endpoint could still be tried, every chunk the client sent is kept, to be
sent again there. Before the upstream transport exists at all, the client's
first bytes wait in the same list, and the client stops being read once they
pass EARLY_LIMIT.

The owner (listener.Listener, see `Owner`) is told about each step:
`accepted`, `connected`, `connect_failed` (it then attaches the next attempt
or closes), `pumped` (a splice pump started or stopped) and `ended`, exactly
once, when both sockets are closed. The relay never learns more of the
attempts than whether another may follow (`Upstream.attempts`).

Idle timeout: one sweep for the whole process (`close_idle`, run by the
server every eighth of the shortest timeout, and at least once a second)
compares each connection's byte counters with what it saw last time; a
connection whose counters have not moved for its timeout (its chain's, or
the proxy's) is closed. The per-chunk path pays
nothing for it (no clock read, no timer reset), and one timer in all
instead of one per connection keeps an idle connection small; the price is
that idleness is noticed up to one sweep interval late.

No task per connection: once both sockets are wired, the connection is pure
callbacks, which keeps an idle connection to a few hundred bytes of objects.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import math
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from ..config import Endpoint
from .sockopts import BorrowedSocket, SocketLike, arm_reset, borrow, disarm_reset
from .splice import SPLICE_AFTER, Pump

if TYPE_CHECKING:  # only for the annotation of Upstream.attempts (upstream.py imports this module)
    from .upstream import Attempts, OwnKey

_monotonic = time.monotonic

# Per-direction bound on bytes queued in our user-space write buffer before
# the opposite socket stops being read (asyncio's default high-water mark is
# 64 KiB; uvloop's is the same).
WRITE_HIGH_WATER = 256 * 1024

# Bytes a client may send before its upstream transport exists, before we stop
# reading from it.
EARLY_LIMIT = 64 * 1024

# Seconds between looks at a connecting upstream that nothing else will confirm
# (see Relay.watch_connect).
CONNECT_POLL = 0.005

# What a socket that never got connected fails with: the upstream, not the
# client, is at fault, and another endpoint may do better.
CONNECT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT,
                            errno.EHOSTDOWN, errno.ENETDOWN})


class PumpState(enum.Enum):
    """Side.pump when it is not a Pump (or None: copying through the transport)."""

    WAITING = 1  # waiting for the destination's buffer to empty before the pump starts (byte order: splice.py)
    STOPPED = 2  # its pump has stopped: the connection is ending, nobody reads that socket again


WAITING, STOPPED = PumpState.WAITING, PumpState.STOPPED


class Owner(Protocol):
    """What a relay may ask of the listener that accepted it (listener.Listener)."""

    loop: asyncio.AbstractEventLoop
    splice: bool  # may bulk directions move to splice pumps?

    def accepted(self, relay: Relay) -> None:
        """The client's socket is ours: decide where it goes (or close it)."""

    def connected(self, relay: Relay, up: Upstream) -> None:
        """The current attempt is confirmed connected."""

    def connect_failed(self, relay: Relay, up: Upstream, timed_out: bool, reason: str) -> None:
        """The current attempt failed: attach the next, or close the relay."""

    def flow(self, relay: Relay, paused: bool) -> None:
        """Reading the client stopped (or started again) because the upstream cannot keep up."""

    def pumped(self, change: int) -> None:
        """A splice pump started (+1) or stopped (-1)."""

    def pump_unavailable(self, relay: Relay, exc: OSError) -> None:
        """A direction stays copying: no descriptors for a pump."""

    def ended(self, relay: Relay) -> None:
        """Both sockets are closed (called once)."""


class Side(asyncio.Protocol):
    """One socket of a relayed connection."""

    __slots__ = ("relay", "transport", "peer", "eof", "received", "lost", "relaying", "paused", "pump", "sock")
    name = ""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        # Both are there before any code path that uses them runs: the
        # transport from connection_made, the peer from Relay.attach. Until
        # then they are None, which only shut(), `open` and the connecting
        # code of an upstream look for.
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer: Side = None  # type: ignore[assignment]
        self.eof = False  # a FIN came from this socket
        self.lost = False  # connection_lost has run: the socket is closed
        self.received = 0  # bytes read from this socket
        self.relaying = False  # bytes read here go straight to the peer (the upstream is confirmed)
        self.paused = False  # our write buffer is over its high-water mark
        self.pump: Pump | PumpState | None = None  # None: read by its transport
        self.sock: SocketLike | None = None  # the socket itself, for its options (raw_socket)

    # asyncio.Protocol ---------------------------------------------------------
    def pause_writing(self) -> None:
        # Our socket cannot take more: stop reading what would be written to it.
        self.paused = True
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        pump = self.peer.pump  # who reads what is written to us
        if pump is None:
            self.peer.transport.resume_reading()
        elif pump is WAITING:  # our buffer is empty now: that direction can go to its pump
            self.relay.start_pump(self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.side_lost(self, exc)

    @property
    def open(self) -> bool:
        """The socket is still there (connected, or closing with bytes to flush)."""
        return self.transport is not None and not self.lost

    def shut(self, reset: bool) -> None:
        """Close it (after its buffer drains), or reset it; once is enough.
        (An upstream whose transport is yet to come is aborted when it comes.)"""
        if self.transport is None or self.lost:
            return
        sock = self.raw_socket()
        if reset:
            if sock is not None:  # armed since connection_made, unless a graceful close began
                arm_reset(sock)  # a RST, not a FIN that would look like a complete answer
            self.transport.abort()
        elif not self.transport.is_closing():
            if sock is not None:
                disarm_reset(sock)  # the rest of the buffer, then a FIN
            self.transport.close()


    def raw_socket(self) -> SocketLike | None:
        """The socket, for its options (None once the transport has let it go)."""
        if self.sock is None:
            stand_in: SocketLike | None = self.transport.get_extra_info("socket")
            if stand_in is not None:
                self.sock = borrow(stand_in)  # once: the loop's stand-in costs a system call per use
        return self.sock


class Downstream(Side):
    """The accepted socket."""

    __slots__ = ()
    name = "downstream"

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(self.sock, BorrowedSocket):  # the loop has closed the descriptor: the number may be reused
            self.sock.detach()
        super().connection_lost(exc)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream's (not cast(): a call per connection)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.relay.owner.accepted(self.relay)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.relaying:
            self.peer.transport.write(data)
            if len(data) >= SPLICE_AFTER:
                self.relay.splice(self)
        else:
            self.relay.early_data(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.relaying:
            self.relay.half_closed(self)
        else:  # confirm() forwards it; make sure something confirms
            self.relay.watch_connect()
        return True  # keep our write direction open: this is a half-close


class Upstream(Side):
    """One connect attempt to one endpoint (a connection may make several)."""

    __slots__ = ("endpoint", "key", "attempts")
    name = "upstream"

    def __init__(self, relay: Relay, endpoint: Endpoint, key: OwnKey, sock: socket.socket, attempts: Attempts) -> None:
        super().__init__(relay)
        self.endpoint = endpoint
        self.key = key  # our socket's 4-tuple, for the loop guard
        self.sock: socket.socket = sock  # ours: for its options, and to ask whether it is connected
        self.attempts = attempts  # the connection's endpoints still to try after this one

    @property
    def open(self) -> bool:
        """Also while the loop has the socket but has not handed us its transport
        yet: the relay has not ended until that transport has closed too."""
        return not self.lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream's (not cast(): a call per connection)
        arm_reset(self.sock)  # a process that dies resets its connections
        # 0 while connecting: the first byte queued pauses the client, and the
        # handshake's completion (the buffer drains) resumes it: see confirm().
        self.transport.set_write_buffer_limits(high=0, low=0)
        self.relay.upstream_made(self)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if not self.relaying:
            self.relay.confirm(self)
        self.peer.transport.write(data)
        if len(data) >= SPLICE_AFTER:
            self.relay.splice(self)

    def eof_received(self) -> bool:
        self.eof = True
        if not self.relaying:
            self.relay.confirm(self)
        self.relay.half_closed(self)
        return True

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.relaying:  # not the pause that waits for the handshake: see confirm()
            self.relay.owner.flow(self.relay, paused=True)

    def resume_writing(self) -> None:
        if not self.relaying:
            self.paused = False
            self.relay.confirm(self)  # resumes the client
            return
        super().resume_writing()
        self.relay.owner.flow(self.relay, paused=False)


class Relay:
    """One proxied connection: its two sides, counters and how it ended."""

    __slots__ = ("id", "owner", "downstream", "upstream", "held", "deadline",
                 "last_active", "bytes_seen", "idle_timeout", "end", "closed_remotely", "started", "_ended",
                 # what the connection is, for the access log and the admin API;
                 # plain fields rather than a dict: an idle connection stays small
                 "listener", "source", "destination", "direction", "chain", "cluster")

    def __init__(self, conn_id: int, owner: Owner) -> None:
        self.id = conn_id
        self.owner = owner
        self.downstream = Downstream(self)
        self.upstream: Upstream | None = None  # the current attempt; connected once `upstream.relaying`
        self.held: list[bytes] | None = []  # client bytes the upstream has not been confirmed to get
        self.deadline: asyncio.TimerHandle | None = None  # the connect timeout of the attempt
        self.last_active = self.started = _monotonic()  # kept by close_idle
        self.bytes_seen = 0  # both directions' counters at the last sweep
        self.idle_timeout = math.inf  # seconds without a byte before close_idle closes it (set by the owner)
        self.end: str | None = None  # why it ended: done, idle_timeout, *_reset, ...
        self.closed_remotely = False  # the upstream ended it: its FIN completed the close, or its RST
        self._ended = False
        self.listener = "-"
        self.source: Endpoint | None = None  # the client
        self.destination: Endpoint | None = None  # its original destination
        self.direction = "-"
        self.chain = "-"
        self.cluster: str | None = None

    @property
    def confirmed(self) -> Upstream | None:
        """The upstream once it is confirmed connected, else None (the one
        place that says so, from the flag the per-chunk path reads: Side.relaying)."""
        up = self.upstream
        return up if up is not None and up.relaying else None

    @property
    def connected(self) -> bool:
        return self.confirmed is not None

    @property
    def _may_retry(self) -> bool:
        """Another endpoint may follow the current attempt: keep what the client sent."""
        return bool(self.upstream is not None and self.upstream.attempts.left)

    # connecting ---------------------------------------------------------------
    def attach(self, up: Upstream, timeout: float) -> None:
        """A new connect attempt, given `timeout` seconds."""
        self.upstream = up
        up.peer, self.downstream.peer = self.downstream, up
        self._cancel_deadline()
        self.deadline = self.owner.loop.call_later(timeout, self.connect_deadline)
        if self.downstream.eof:
            self.watch_connect()

    def upstream_made(self, up: Upstream) -> None:
        """The attempt's transport exists (its socket may still be connecting)."""
        if up is not self.upstream or self.end is not None:
            up.transport.abort()  # an abandoned attempt, or the client is gone
            return
        held = self.held
        assert held is not None  # nothing confirmed an upstream yet
        if not self._may_retry:
            self.held = None
        for data in held:
            up.transport.write(data)
        if held and _took_it(up.transport):
            self.confirm(up)  # connected (and the client, if paused, resumes)

    def early_data(self, data: bytes) -> None:
        """Client bytes while the upstream is not confirmed."""
        up, held = self.upstream, self.held
        if up is None or up.transport is None:  # no transport yet: wait in `held`
            assert held is not None  # it goes only once a transport has taken it
            held.append(data)
            if self.downstream.received >= EARLY_LIMIT:
                self.downstream.transport.pause_reading()
            return
        up.transport.write(data)
        if held is not None and self._may_retry:  # another endpoint may need it again
            held.append(data)
        if _took_it(up.transport):
            self.confirm(up)

    def confirm(self, up: Upstream) -> None:
        """The upstream is connected: relay freely from now on."""
        if up is not self.upstream or up.relaying or self.end is not None:
            return
        up.relaying = self.downstream.relaying = True
        self.held = None
        self._cancel_deadline()
        up.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.last_active = _monotonic()
        self.owner.connected(self, up)
        down = self.downstream
        if down.eof:  # the client said all it had to say before we were connected
            self.half_closed(down)
        elif not up.paused:
            down.transport.resume_reading()

    def connect_deadline(self, until: float | None = None) -> None:
        """The attempt's connect timeout has passed: connected after all, or
        failed. With `until` (watch_connect), a look before that deadline."""
        self.deadline = None
        up = self.upstream
        if up is None or up.relaying or self.end is not None:
            return
        if up.transport is not None and _connected(up.sock):
            self.confirm(up)
            return
        loop = self.owner.loop
        if up.transport is None or (until is not None and loop.time() < until):
            # look again soon: its transport is on its way, or the client waits (watch_connect)
            again = loop.time() + CONNECT_POLL
            self.deadline = loop.call_at(again if until is None else min(again, until), self.connect_deadline, until)
        else:
            self.failed(up, timed_out=True, reason="timed out")

    def watch_connect(self) -> None:
        """The client has said all it will say and the upstream is not confirmed:
        a client that only sent its FIN makes no write that could confirm it, and
        the server may wait for that FIN. So look every CONNECT_POLL seconds."""
        if self.deadline is not None and self.upstream is not None and not self.upstream.relaying:
            until = self.deadline.when()
            self._cancel_deadline()
            self.connect_deadline(until)

    def _cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def failed(self, up: Upstream, timed_out: bool, reason: str) -> None:
        """This attempt did not connect; the owner tries the next or gives up."""
        self._cancel_deadline()
        if up.transport is not None:
            up.transport.abort()  # still connecting: nothing was sent, nothing to reset
        self.owner.connect_failed(self, up, timed_out, reason)

    def start_failed(self, up: Upstream, exc: BaseException) -> None:
        """The event loop would not take the attempt's socket: its transport never comes."""
        up.lost = True
        if up is self.upstream and self.end is None:
            self.failed(up, timed_out=False, reason=repr(exc))
        else:
            self.side_lost(up, None)

    # bulk: splice pumps (splice.py) --------------------------------------------
    def splice(self, side: Side) -> None:
        """`side` reads in big chunks: move its direction to a pump, once the
        bytes already written to its peer are gone."""
        if side.pump is not None or not self.owner.splice:
            return
        side.transport.pause_reading()
        side.pump = WAITING
        if _took_it(side.peer.transport):
            self.start_pump(side)
        else:  # 0: the peer's resume_writing says when its buffer is empty
            side.peer.transport.set_write_buffer_limits(high=0, low=0)

    def start_pump(self, side: Side) -> None:
        if self.end is not None:
            return
        peer = side.peer
        peer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        try:
            pump = Pump(self.owner.loop, self, side, _fileno(side.transport), _fileno(peer.transport))
        except OSError as exc:  # out of descriptors: this direction keeps copying
            side.pump = None
            side.transport.resume_reading()
            self.owner.pump_unavailable(self, exc)
            return
        side.pump = pump
        pump.start()
        self.owner.pumped(+1)

    def pump_eof(self, pump: Pump) -> None:
        """The pump moved its source's last byte, and its FIN came."""
        pump.side.eof = True
        self.half_closed(pump.side)

    def pump_failed(self, side: Side, exc: OSError) -> None:
        """A pump's read (side: its source) or write (its destination) failed."""
        if self.end is None:
            self.end = f"{side.name}_reset"
        self.close(self.end, reset=True)

    def _stop_pumps(self) -> bool:
        """Stop every pump; whether one of them still held bytes (now lost)."""
        up = self.upstream
        if self.downstream.pump is None and (up is None or up.pump is None):
            return False  # the short connection's case: no pump ever started
        dropped = False
        for side in (self.downstream, up):
            if side is not None and isinstance(side.pump, Pump):
                dropped = dropped or side.pump.in_pipe > 0
                side.pump.close()
                side.pump = STOPPED
                self.owner.pumped(-1)
        return dropped

    # events from the sides ------------------------------------------------------
    def half_closed(self, side: Side) -> None:
        peer = side.peer
        if peer.eof:  # both directions are finished; the upstream's FIN last: it closed it, in Envoy's words
            self.closed_remotely = side is self.upstream
            self.close("done")
        elif not peer.transport.is_closing():
            peer.transport.write_eof()

    def side_lost(self, side: Side, exc: Exception | None) -> None:
        if side is not self.downstream and side is not self.upstream:
            return  # an attempt given up on
        self._stop_pumps()
        if side is self.upstream and not side.relaying and self.end is None:
            if isinstance(exc, OSError) and exc.errno in CONNECT_ERRNOS:
                self.failed(side, timed_out=False, reason=f"{errno.errorcode[exc.errno]} ({exc.strerror})")
                return
            self.confirm(side)  # it was connected, then reset or closed
        if exc is not None and self.end is None:
            self.end = f"{side.name}_reset"
            self.closed_remotely = side is self.upstream
        if side.peer is not None:
            side.peer.shut(reset=exc is not None)  # a RST becomes a RST, even mid-flush
        self._maybe_ended()

    # ending -------------------------------------------------------------------
    def close(self, reason: str, *, reset: bool = False) -> None:
        """End the connection: flush and close (or reset) both sockets.

        A graceful close waits for the write buffers to drain; a peer that
        never reads keeps the connection open (and in `live`, visible) until
        the idle sweep resets it. Bytes still in a splice pipe cannot wait
        like that: a close that would drop them is a reset.
        """
        if self.end is None:
            self.end = reason
        self._cancel_deadline()
        reset = self._stop_pumps() or reset  # first: a socket closes only with its last descriptor
        for side in (self.downstream, self.upstream):
            if side is not None:
                side.shut(reset)
        self._maybe_ended()

    def close_unserved(self, reason: str) -> None:
        """End a connection no upstream will serve (none healthy, none left
        to try, the circuit breaker open) as Envoy ends it: Envoy never read
        from the client and close()s its socket, which the kernel turns into
        a FIN when the client has sent nothing, and a RST when bytes of its
        lie unread. The client's bytes are read here (held for the upstream),
        so the same rule is written out: a RST if it sent any."""
        self.close(reason, reset=self.downstream.received > 0)

    def _maybe_ended(self) -> None:
        if self._ended:
            return
        for side in (self.downstream, self.upstream):
            if side is not None and side.open:
                return  # ended only when both sockets are really closed
        self._ended = True
        self._cancel_deadline()
        self.owner.ended(self)
        self._unlink()

    def _unlink(self) -> None:
        """Break the connection's reference cycles (relay and sides, side and peer)
        once both sockets are closed and nothing will call back: reference counting
        then frees it at once, instead of the cyclic garbage collector, which would
        otherwise have the whole connection to trace and free, every connection."""
        for side in (self.downstream, self.upstream):
            if side is not None:
                del side.relay, side.peer

    def describe(self) -> dict[str, Any]:
        """The connection as plain data (the access log, /connections)."""
        return {
            "id": self.id, "start": time.time() - (_monotonic() - self.started), "listener": self.listener,
            "source": _text(self.source), "destination": _text(self.destination),
            "direction": self.direction, "chain": self.chain, "cluster": self.cluster,
            "upstream": str(up.endpoint) if (up := self.confirmed) is not None else None,
        }

    # counters -------------------------------------------------------------------
    @property
    def bytes_from_downstream(self) -> int:
        return self.downstream.received

    @property
    def bytes_from_upstream(self) -> int:
        return self.upstream.received if self.upstream is not None else 0


def _took_it(transport: asyncio.Transport) -> bool:
    """The kernel took all we wrote at once, so the socket is connected (a
    write that failed empties the buffer too, but leaves the transport closing)."""
    return transport.get_write_buffer_size() == 0 and not transport.is_closing()


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()  # ENOTCONN while the handshake is still going on
    except OSError:
        return False
    return True


def _fileno(transport: asyncio.Transport) -> int:
    sock: socket.socket = transport.get_extra_info("socket")
    return sock.fileno()


def _text(addr: Endpoint | None) -> str:
    """'192.0.2.1:80', '[2001:db8::1]:80', or '-'."""
    return "-" if addr is None else str(addr)


def idle_sweep_interval(timeout: float) -> float:
    """How often to sweep: an eighth of the (shortest) timeout, and at least once a second."""
    return min(timeout / 8, 1.0)


def close_idle(relays: Iterable[Relay], now: float | None = None) -> int:
    """Close every connection quiet for its idle_timeout; how many.

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
        elif now - relay.last_active >= relay.idle_timeout:
            quiet.append(relay)
    for relay in quiet:
        stuck = relay.end is not None
        relay.close("idle_timeout", reset=stuck)
        relay.last_active = now
    return len(quiet)
