"""Draining: which new connections a draining proxy still takes.

What Envoy does (1.40; source/server/drain_manager_impl.cc and
source/server/admin/listeners_handler.cc), and what that means for TCP:

* A drain has a direction, `inbound` (Envoy's InboundOnly: listeners whose
  traffic_direction is INBOUND) or `all`, a start and a length (the drain
  time, `--drain-time-s`).
* While it lasts, the drain manager's `drainClose()` answers, each time a
  component asks, whether to close now: always with `--drain-strategy
  immediate`; with `gradual`, with a probability that rises with the time
  since the start, `elapsed > random % drain_time` in whole seconds (the
  time left is truncated, so `elapsed` is rounded up: 1/drain_time just
  after the start, k/drain_time in the k-th second, always from the end on).
* Only HTTP asks (the connection manager answers a request with
  `Connection: close` or a GOAWAY). tcp_proxy never asks: a TCP connection
  is never closed because of a drain, and a listener takes new ones as ever
  until the drain time is over; then the listeners of the direction stop
  (their sockets close: the kernel refuses new connections). Checked
  against Envoy 1.40's binary: after `/drain_listeners?inboundonly&graceful`
  an inbound TCP listener serves every new connection, with either
  strategy, until the drain time ends, then refuses them all; outbound and
  live connections are untouched. The proxy's /drain_listeners does exactly
  that (control/server.py): `Drain.stop` only.

SIGTERM's drain is the proxy's own (Envoy exits at once on SIGTERM): inbound
stops first while outbound is still taken. There the strategy says how
inbound stops, by asking the drain manager's question once per *new*
inbound connection, at accept (a TCP connection is one stream: it cannot
be closed "after the current request"): yes, and the connection is reset
before anything is forwarded; no, and it is relayed as ever. Connections
already open are never asked (tcp_proxy's rule). Hence, over drain_timeout:

    immediate   no new inbound connection from the start
    gradual     fewer and fewer: each refused with probability
                elapsed/drain_timeout (whole seconds, rounded up)

A listener that takes both directions (the redirected port) cannot close
its socket for one of them, so it asks per connection, by the direction it
already tells from the original destination (listener.py); a listener of
one direction asks the same way, and its socket closes when its direction
stops.

This module is pure decisions over a clock and a random source; the
listeners (listener.py) ask it, and the process (control/server.py) starts
and stops the drains.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

INBOUND, OUTBOUND = "inbound", "outbound"
DIRECTIONS = {"inbound": (INBOUND,), "all": (INBOUND, OUTBOUND)}  # Envoy's DrainDirection -> ours


@dataclass(frozen=True)
class Sequence:
    """One direction's drain: when it started (a monotonic clock), how long it lasts (seconds)."""

    start: float
    length: float


def drain_close(strategy: str, sequence: Sequence, now: float, below: Callable[[int], int]) -> bool:
    """Envoy's DrainManagerImpl::drainClose for a drain under way.

    `below(n)`: a random integer in [0, n). Envoy counts whole seconds: the
    time left is truncated, the elapsed time is the drain time minus that.
    """
    if strategy == "immediate":
        return True
    deadline = sequence.start + sequence.length
    if now >= deadline:
        return True
    total = int(sequence.length)
    if total == 0:
        return True
    elapsed = total - int(deadline - now)
    return elapsed > below(total)


class Drain:
    """The drains under way in one process, as the listeners ask about them."""

    def __init__(self, strategy: str, below: Callable[[int], int] | None = None) -> None:
        self.strategy = strategy
        self.below = below or random.SystemRandom().randrange
        self.sequences: dict[str, Sequence] = {}  # direction -> its drain (the first one started)
        self.stopped: set[str] = set()  # directions that take no new connection at all

    def start(self, directions: Iterable[str], length: float, now: float) -> None:
        """Start draining `directions` (one already draining keeps its own timeline)."""
        for direction in directions:
            self.sequences.setdefault(direction, Sequence(now, length))

    def stop(self, directions: Iterable[str]) -> None:
        """Refuse every new connection of `directions` from now on (Envoy's stopListeners)."""
        self.stopped.update(directions)

    def refuses(self, direction: str, now: float) -> bool:
        """Is a new connection of `direction` refused now? False unless it drains."""
        if direction in self.stopped:
            return True
        sequence = self.sequences.get(direction)
        if sequence is None:
            return False
        return drain_close(self.strategy, sequence, now, self.below)
