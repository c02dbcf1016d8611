"""Connection limits, as Envoy has them: one per listener, and one for the whole proxy.

Envoy's listener connection limit (stat `listener.<addr>.downstream_cx_overflow`)
and its overload manager's global one (resource monitor
`envoy.resource_monitors.global_downstream_max_connections`, stat
`listener.<addr>.downstream_global_cx_overflow`): a connection that would
pass either is reset at once, before it is anything else (no id, no
upstream, no access-log line) and counted; the connections already open are
untouched. Config: `redirect_max_connections`, a plain listener's
`max_connections`, and the global `max_connections` (`--max-connections`).

A connection is counted when the event loop asks its listener for the
connection's protocol (`admit`), not when its transport comes up: asyncio
and uvloop accept a batch of connections at a time and make every protocol
of the batch before the first `connection_made` runs, so counting later would
let a whole batch past the limit. It is let go when the relay has ended
(`release`, from Listener.ended). A connection handed off to the listener
of its original destination counts there from then on (`move`); the limit
is checked where it was accepted, as Envoy checks it on accept.

With several workers (control/supervisor.py) each holds its share of every
limit (control/worker.py), so the proxy as a whole never passes it; the kernel
spreads connections over the workers by address, so one worker may refuse
while another still has room.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import cast

from .sockopts import arm_reset
from .stats import Stats

log = logging.getLogger("proxy.listener")


class Gate:
    """Connections open through one listener, or through the whole proxy, and their limit."""

    __slots__ = ("limit", "open")

    def __init__(self, limit: int | None) -> None:
        self.limit = sys.maxsize if limit is None else limit
        self.open = 0


class Overflow(asyncio.Protocol):
    """A connection past a limit: reset as soon as the loop hands it over, and counted."""

    __slots__ = ("stats", "stat")

    def __init__(self, stats: Stats, stat: str) -> None:
        self.stats, self.stat = stats, stat

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.stats.inc(self.stat)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            arm_reset(sock)  # a RST: the client learns at once, and no TIME_WAIT is left here
        cast(asyncio.Transport, transport).abort()  # uvloop's is one, without the base class


def admit(listener: Gate, proxy: Gate, stats: Stats, overflow: str, global_overflow: str,
          name: str) -> Overflow | None:
    """Count one more connection through `listener` and `proxy`, or the protocol that refuses it."""
    if listener.open >= listener.limit:
        log.warning("listener %s: %d connections open, its limit: new ones are reset", name, listener.open)
        return Overflow(stats, overflow)
    if proxy.open >= proxy.limit:
        log.warning("%d connections open, max_connections here (with workers, this one's share): "
                    "new ones are reset", proxy.open)
        return Overflow(stats, global_overflow)
    listener.open += 1
    proxy.open += 1
    return None


def move(accepted: Gate, taken: Gate) -> None:
    """A connection handed off (Envoy's use_original_dst) counts on the listener that takes it."""
    accepted.open -= 1
    taken.open += 1


def release(listener: Gate, proxy: Gate) -> None:
    listener.open -= 1
    proxy.open -= 1
