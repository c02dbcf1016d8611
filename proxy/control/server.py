"""One proxy process: the data path's listeners, its idle sweep, drain and shutdown.

It runs on its own (`--concurrency 1`, with the admin API) or as one worker
of a supervisor (supervisor.py, worker.py: without an admin API, on sockets
the supervisor bound). The run skeleton, the states and the start-up checks
are lifecycle.py's.

Draining, as Istio drains a sidecar (the decisions are datapath/drain.py's):

    SIGTERM, SIGINT                  inbound drains (drain_strategy) over drain_timeout;
                                     outbound is still accepted (the app may still be
                                     shutting down); live connections go on. At the
                                     end of drain_timeout every listener closes, what
                                     is left is reset, exit 0.
    /quitquitquit                    the app is done: every listener closes now, live
                                     connections get drain_timeout (exit 0 as soon as
                                     none is left), what is left is reset.
    /drain_listeners[?inboundonly]   Envoy's: the listeners of the direction (all, or
                                     inbound) stop now; the process goes on, LIVE.
    ...&graceful                     Envoy's: they accept as ever for drain_time, then
                                     stop (Envoy's drain shows only on HTTP).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
from collections.abc import Sequence

from ..config import Config, hostport
from ..datapath import snapshot
from ..datapath.accesslog import AccessLog
from ..datapath.drain import DIRECTIONS, INBOUND, OUTBOUND
from ..datapath.listener import Listener, Shared
from ..datapath.localaddrs import LocalAddresses
from ..datapath.relay import close_idle, idle_sweep_interval
from ..datapath.snapshot import Snapshot
from ..datapath.stats import Stats
from ..datapath.upstream import EXHAUSTION
from . import logs
from .lifecycle import AdminStarter, Runner, StartupError
from .sockets import BACKLOG, Bound, check_ports_free, open_listen_sockets

log = logging.getLogger("proxy.server")


class Proxy(Runner):
    """The running proxy: listeners, shared state, lifecycle."""

    def __init__(self, config: Config, *, argv: Sequence[str] = (), listener_delay: float = 0.0,
                 admin: AdminStarter | None = None, sockets: list[Bound] | None = None,
                 conn_ids: itertools.count | None = None) -> None:
        """`sockets`: listening sockets already bound (a worker's share, see
        supervisor.py) instead of binding them here; `conn_ids`: where connection
        ids come from (a worker's are unique across the workers)."""
        super().__init__(config, argv=argv, listener_delay=listener_delay, admin=admin)
        self.sockets = sockets
        self.conn_ids = conn_ids
        self.stats = Stats()
        self.servers: list[tuple[asyncio.Server, Listener]] = []
        self.stop_at: float | None = None  # loop time at which a SIGTERM drain ends
        self.timers: list[asyncio.TimerHandle] = []  # the ends of graceful drains
        self.graceful: set[str] = set()  # the directions ("inbound", "all") of graceful drains under way
        self.redirect: Listener | None = None
        self.shared: Shared | None = None  # made when run() starts
        self.local: LocalAddresses | None = None
        self.sweeper: asyncio.Task | None = None

    async def log_levels_changed(self, changes: list[tuple[str, int]]) -> None:
        """One process has nobody else to tell."""

    async def snapshot(self, limit: int) -> Snapshot:
        """The data plane as the admin API reads it (see datapath/snapshot.py)."""
        return self.take(limit)

    def counters(self) -> dict[str, int]:
        """Every counter and gauge now (what a worker's answer to a ping carries)."""
        counters = dict(self.stats.counters)
        counters.update(logs.counters())
        return counters

    def take(self, limit: int) -> Snapshot:
        """The data plane now (empty before run() has made it)."""
        snap = snapshot.take(self.shared, limit) if self.shared is not None else Snapshot()
        return snap.add(logs.counters())

    # the run skeleton's steps (lifecycle.Runner.run) ------------------------------------
    async def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        config = self.config
        try:
            access_log = AccessLog(config.access_log, config.log_format)
        except OSError as exc:
            raise StartupError(f"access_log {config.access_log}: cannot open it: {exc.strerror}") from None
        self.local = LocalAddresses()
        self.shared = Shared(config, self.stats, access_log, self.local, loop, self.conn_ids)
        self.local.watch(loop)
        loop.set_exception_handler(self._loop_exception)
        self.sweeper = loop.create_task(self._sweep_idle(), name="idle-sweep")

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> bool:
        config, shared = self.config, self.shared
        assert shared is not None  # made by _open
        if self.sockets is None:  # (a worker's come from the supervisor)
            check_ports_free(config)
        sockets = self.sockets if self.sockets is not None else open_listen_sockets(config)
        self.sockets = sockets
        firsts: dict[int, tuple[str, int]] = {}  # a listener's stats are named by its first bound address
        for index, sock in sockets:
            firsts.setdefault(index, sock.getsockname()[:2])
        listeners = [Listener(shared, loop, spec, firsts.get(i)) for i, spec in enumerate(config.listeners)]
        redirect = config.redirect
        self.redirect = next((lr for lr in listeners if lr.spec is redirect), listeners[0] if listeners else None)
        while sockets:
            index, sock = sockets[0]
            listener = listeners[index]
            server = await loop.create_server(listener.protocol, sock=sock, backlog=BACKLOG)
            sockets.pop(0)
            self.servers.append((server, listener))
            self._close_stopped()  # a drain or stop came while we were binding
            self.listeners.setdefault(listener.name, []).append(sock.getsockname()[:2])
            log.info("listening on %s (%s)", hostport(*sock.getsockname()[:2]), listener.name)
        return True

    async def _until_stopped(self) -> None:
        await self.stopping.wait()
        await self._drain()

    async def _close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        for timer in self.timers:
            timer.cancel()
        for server, _ in self.servers:
            server.close()
        for bound in self.sockets or ():  # never handed to a server: stopped early, or a failure
            bound.sock.close()
        if self.local is not None:
            self.local.close(loop)
        if self.shared is not None:
            self.shared.close()

    # while running --------------------------------------------------------------------------
    async def _sweep_idle(self) -> None:
        """Close connections quiet for idle_timeout: one timer for all of them."""
        shared = self.shared
        assert shared is not None  # made by _open, before this task
        interval = idle_sweep_interval(shared.shortest_idle_timeout)
        while True:
            await asyncio.sleep(interval)
            close_idle(list(shared.live.values()))

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """asyncio reports EMFILE on accept here, once per attempt, with a
        traceback; it already backs off and retries, so say it once a second."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in EXHAUSTION and self.redirect is not None and self.shared:
            self.shared.note_exhaustion(self.redirect.names, "out of resources on accept "
                                        f"({errno.errorcode.get(exc.errno)}): backing off")
            return
        loop.default_exception_handler(context)

    # draining ----------------------------------------------------------------------------
    def drain_listeners(self, inbound_only: bool = False, graceful: bool = False, skip_exit: bool = False) -> None:
        """Envoy's /drain_listeners: the listeners of a direction stop now, or
        (graceful) once drain_time is over, taking connections as ever until then
        (Envoy 1.40 does: only HTTP connections hear of its drain). With
        skip_exit they never stop (Envoy 1.40: a graceful drain still counts as
        under way). Live connections, the process and its state (LIVE, as in
        Envoy) go on."""
        direction = "inbound" if inbound_only else "all"
        directions = DIRECTIONS[direction]
        if not graceful:
            if skip_exit:
                log.info("drain_listeners: skip_exit: %s listeners go on", direction)
                return
            self._stop_directions(directions)
            log.info("drain_listeners: %s listeners stopped; %d live connections go on", direction, self._live())
        elif not ({direction, "all"} & self.graceful):  # Envoy: a drain already under way is not restarted
            self.graceful.add(direction)
            if skip_exit:
                log.info("drain_listeners: %s drain under way; skip_exit: its listeners go on", direction)
                return
            loop = asyncio.get_running_loop()
            self.timers.append(loop.call_later(self.config.drain_time, self._stop_directions, directions))
            log.info("drain_listeners: %s listeners stop in %gs; until then they accept as ever",
                     direction, self.config.drain_time)

    def terminate(self) -> None:
        """SIGTERM: inbound drains over drain_timeout while outbound is still
        accepted; then run() stops every listener, resets what is left and returns."""
        if not self.stopping.is_set():
            self.draining = True
            loop = asyncio.get_running_loop()
            self.stop_at = loop.time() + self.config.drain_timeout
            if self.shared is not None:
                self.shared.drain.start((INBOUND,), self.config.drain_timeout, loop.time())
            log.info("stopping: inbound drains (%s), outbound is accepted for %gs; %d live connections",
                     self.config.drain_strategy, self.config.drain_timeout, self._live())
            self.stopping.set()

    def stop(self) -> None:
        """/quitquitquit (the app is done): every listener stops now; live
        connections get drain_timeout (no more if a SIGTERM drain is under way);
        then run() resets what is left and returns."""
        if self.stopping.is_set():
            self._stop_directions((INBOUND, OUTBOUND))
        else:
            self.draining = True
            self.stop_at = asyncio.get_running_loop().time() + self.config.drain_timeout
            self._stop_directions((INBOUND, OUTBOUND))
            log.info("stopping: no new connections; draining %d live ones", self._live())
            self.stopping.set()

    def _stop_directions(self, directions: tuple[str, ...]) -> None:
        """Envoy's stopListeners: no new connection of `directions` from now on."""
        if self.shared is not None:
            if not set(directions) <= self.shared.drain.stopped:
                log.info("stopped %s: no new connections", " and ".join(directions))
            self.shared.drain.stop(directions)
        self._close_stopped()

    def _close_stopped(self) -> None:
        """Close the sockets of every listener all of whose directions are stopped
        (a listener of both directions refuses one of them per connection)."""
        stopped = self.shared.drain.stopped if self.shared is not None else set()
        for server, listener in self.servers:
            if server.is_serving() and _directions(listener) <= stopped:
                server.close()

    def _accepting(self) -> bool:
        return any(server.is_serving() for server, _ in self.servers)

    def _live(self) -> int:
        return len(self.shared.live) if self.shared is not None else 0

    async def _drain(self) -> None:
        """The rest of a SIGTERM drain: wait for its end (or for nothing left to
        serve), then stop every listener and reset what is still open."""
        if self.shared is None:
            return
        live, loop = self.shared.live, asyncio.get_running_loop()
        deadline = self.stop_at if self.stop_at is not None else loop.time()
        while loop.time() < deadline and (live or self._accepting()):  # noqa: ASYNC110 (a look every 50 ms)
            await asyncio.sleep(0.05)
        self._stop_directions((INBOUND, OUTBOUND))
        left = list(live.values())
        if left:
            log.info("drain timeout: resetting %d connections still open", len(left))
        for relay in left:
            relay.close("drain_timeout", reset=True)
        await asyncio.sleep(0)


def _directions(listener: Listener) -> set[str]:
    """The directions a listener's connections can take (listener.py decides which)."""
    direction = listener.spec.direction
    if direction != "any":
        return {direction}
    return {INBOUND, OUTBOUND} if listener.spec.original_dst else {OUTBOUND}
