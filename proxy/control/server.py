"""One proxy process: the data path's listeners, its idle sweep, drain and shutdown.

It runs on its own (`--concurrency 1`, with the admin API) or as one worker
of a supervisor (supervisor.py, worker.py: without an admin API, on sockets
the supervisor bound). The run skeleton, the states and the start-up checks
are lifecycle.py's.

Shutdown (SIGTERM, SIGINT or /quitquitquit): stop accepting, give live
connections up to `drain_timeout` to finish on their own, reset whatever is
left, exit 0. /drain_listeners does only the first step: the process goes on
with the connections it has until SIGTERM.
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
        self.servers: list[asyncio.Server] = []
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
            self.servers.append(server)
            if self.draining:  # a drain or stop came while we were binding
                server.close()
            self.listeners.setdefault(listener.name, []).append(sock.getsockname()[:2])
            log.info("listening on %s (%s)", hostport(*sock.getsockname()[:2]), listener.name)
        return True

    async def _until_stopped(self) -> None:
        await self.stopping.wait()
        await self._drain()

    async def _close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        for server in self.servers:
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

    def _close_listeners(self) -> None:
        self.draining = True
        for server in self.servers:
            server.close()

    def drain_listeners(self) -> None:
        """Stop accepting; live connections go on, and so does the process."""
        if not self.draining:
            self._close_listeners()
            log.info("draining: listeners closed, no new connections; %d live ones go on", self._live())

    def stop(self) -> None:
        """Stop accepting now; run() then drains and returns."""
        if not self.stopping.is_set():
            self._close_listeners()
            log.info("stopping: no new connections; draining %d live ones", self._live())
            self.stopping.set()

    def _live(self) -> int:
        return len(self.shared.live) if self.shared is not None else 0

    async def _drain(self) -> None:
        if self.shared is None:
            return
        live, loop = self.shared.live, asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        while live and loop.time() < deadline:  # noqa: ASYNC110 (a look every 50 ms, once per drain)
            await asyncio.sleep(0.05)
        left = list(live.values())
        if left:
            log.info("drain timeout: resetting %d connections still open", len(left))
        for relay in left:
            relay.close("drain_timeout", reset=True)
        await asyncio.sleep(0)
