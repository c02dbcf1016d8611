"""Keeping workers alive: the watchdog that pings them, and when to restart one.

The supervisor (supervisor.py) pings each serving worker over its control
channel every PING_INTERVAL seconds. A worker's event loop answers at once
unless something holds it (a stopped process, a loop blocked in a call that
never returns), so an answer that takes longer than PING_DEADLINE is a
*miss* (Envoy's watchdog_miss): the worker cannot be trusted with new
connections, and /ready answers 503 until it answers again. A worker that
has not answered for KILL_AFTER seconds is stuck and is killed (SIGKILL:
it cannot be asked), which makes it a dead worker like any other.

A dead worker is started again while the others serve (`Restarts` says
when): the first restart after RESTART_FIRST seconds, each further one
twice as late (at most RESTART_LONGEST), so a worker that keeps dying
costs a restart every few seconds, never a spin. More than RESTART_LIMIT
deaths within RESTART_WINDOW seconds is a crash loop: the supervisor gives
up, stops the others and exits 1, so whatever runs the proxy (kubelet)
restarts it whole and shows the crash loop where one looks for it.
"""

from __future__ import annotations

import collections

PING_INTERVAL = 1.0  # seconds between two pings of one worker
PING_DEADLINE = 2.0  # seconds a worker may take to answer before it misses
KILL_AFTER = 6.0  # seconds without an answer before a worker is killed

RESTART_FIRST = 0.25  # seconds before the first restart
RESTART_LONGEST = 8.0  # seconds: the longest wait before a restart
RESTART_LIMIT = 5  # restarts allowed within RESTART_WINDOW; one more death gives up
RESTART_WINDOW = 60.0


class Restarts:
    """The deaths of the last RESTART_WINDOW seconds, and what to do after one more."""

    def __init__(self, first: float = RESTART_FIRST, longest: float = RESTART_LONGEST,
                 limit: int = RESTART_LIMIT, window: float = RESTART_WINDOW) -> None:
        self.first, self.longest, self.limit, self.window = first, longest, limit, window
        self.deaths: collections.deque[float] = collections.deque()

    def after_death(self, now: float) -> float | None:
        """Seconds to wait before starting the dead worker again, or None: a crash loop, give up."""
        while self.deaths and now - self.deaths[0] > self.window:
            self.deaths.popleft()
        self.deaths.append(now)
        if len(self.deaths) > self.limit:
            return None
        return min(self.first * 2 ** (len(self.deaths) - 1), self.longest)
