"""Start-up, signals, drain and shutdown of the proxy process.

Start-up does every check that can fail before the first connection:
joining the bypass cgroup, the SO_MARK privilege, binding the admin API,
binding every listener. Any failure there is a `StartupError` with one line
that says whose fault it is; the CLI prints it and exits 1.

The server's state is Envoy's (admin.v3.ServerInfo.State), which the admin
API reports in /ready, /server_info and the `server.state` stat:

    PRE_INITIALIZING (2)  the admin API is up, the listeners are not bound yet
    INITIALIZING (3)      binding the listeners
    LIVE (0)              every listener is bound and serving
    DRAINING (1)          listeners closed (SIGTERM, /drain_listeners,
                          /quitquitquit), or /healthcheck/fail was called

The admin API binds first so a probe sees "not ready" rather than "refused"
while the rest starts. For tests, the environment variable named by
`LISTENER_DELAY_ENV` (seconds) holds the proxy in PRE_INITIALIZING that long
before it binds the listeners: the only way to observe that state from
outside, since binding is otherwise near-instant.

Shutdown (SIGTERM, SIGINT or /quitquitquit): stop accepting, give live
connections up to `drain_timeout` to finish on their own, reset whatever is
left, exit 0. /drain_listeners does only the first step: the process goes on
with the connections it has until SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import itertools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence

from . import plane
from ..datapath.accesslog import AccessLog
from ..config import Config
from ..datapath.listener import Listener, Shared
from ..datapath.localaddrs import LocalAddresses
from .plane import Snapshot
from ..datapath.sockopts import can_mark
from ..datapath.relay import close_idle, idle_sweep_interval
from ..datapath.stats import Stats
from ..datapath.upstream import EXHAUSTION

log = logging.getLogger("proxy.server")

BACKLOG = 4096
LISTENER_DELAY_ENV = "SIDECAR_PROXY_TEST_LISTENER_DELAY"  # test hook, see the module docstring


class State(enum.IntEnum):
    """Envoy's server states, with Envoy's numbers (the `server.state` stat)."""

    LIVE = 0
    DRAINING = 1
    PRE_INITIALIZING = 2
    INITIALIZING = 3


class StartupError(Exception):
    """The proxy cannot start; str() is the one-line reason."""


def join_cgroup(directory: str) -> None:
    """Put this process into the bypass cgroup the init step prepared.

    The init step hands the cgroup's procs file to the proxy's UID, so this
    needs no privilege, and doing it at every start is the design note's
    "update the tasks file after each restart".
    """
    for name in ("cgroup.procs", "tasks"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            try:
                with open(path, "w") as f:
                    f.write(f"{os.getpid()}\n")
            except OSError as exc:
                raise StartupError(f"--cgroup {directory}: cannot join the cgroup ({name}: {exc.strerror}); "
                                   "did the init step hand it to this UID?") from None
            return
    raise StartupError(f"--cgroup {directory}: not a cgroup directory (no cgroup.procs or tasks file)")


def check_mark_privilege(config: Config) -> None:
    marks = {config.mark} | {c.mark for c in config.clusters}
    marks.discard(None)
    for mark in sorted(marks):
        reason = can_mark(mark)
        if reason is not None:
            raise StartupError(f"privilege: SO_MARK {mark:#x} needs CAP_NET_ADMIN, which this process "
                               f"lacks ({reason}); grant it or use another bypass method")


def bind(address: str, port: int, dual_stack: bool, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # one of several workers' sockets on this port (workers.py)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # "::" alone takes IPv4 clients too (as v4-mapped addresses)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
        return sock
    except OSError:
        sock.close()
        raise


def open_listen_sockets(config: Config, reuse_port: bool = False) -> list[tuple[str, socket.socket]]:
    """Bind the redirected port on every configured address (IPv4 and IPv6),
    and every plain listener: (address or plain listener name, socket) pairs."""
    sockets = []
    try:
        addresses = config.addresses
        dual = "::" in addresses and "0.0.0.0" not in addresses
        for address in addresses:
            try:
                sockets.append((address, bind(address, config.port, dual and address == "::", reuse_port)))
            except OSError as exc:
                if address == "::" and addresses == ("::",) and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    log.warning("no IPv6 here (%s); listening on IPv4 only", exc.strerror)
                    sockets.append(("0.0.0.0", bind("0.0.0.0", config.port, False, reuse_port)))
                else:
                    raise StartupError(f"listener: cannot bind {address} port {config.port}: {exc.strerror}") from None
        for plain in config.plain_listeners:
            try:
                sockets.append((plain.name, bind(plain.address, plain.port, False, reuse_port)))
            except OSError as exc:
                raise StartupError(f"plain listener {plain.name}: cannot bind {plain.address} "
                                   f"port {plain.port}: {exc.strerror}") from None
    except BaseException:
        for _, sock in sockets:
            sock.close()
        raise
    return sockets


class Lifecycle:
    """What a running proxy shows the admin API about itself: its configuration
    and command line, its listeners, its state; one process (Proxy) and a
    supervisor of workers (workers.Supervisor) alike."""

    def __init__(self, config: Config, *, argv: Sequence[str] = (), listener_delay: float = 0.0) -> None:
        self.config = config
        self.argv = tuple(argv)  # the command line, for /server_info
        self.listener_delay = listener_delay
        self.listeners: dict[str, list[tuple[str, int]]] = {}  # name -> bound (host, port)s
        self.workers_started = False  # every listener serves (Envoy's listener_manager.workers_started)
        self.stopping = asyncio.Event()
        self.phase = State.PRE_INITIALIZING  # LIVE once every listener serves
        self.draining = False
        self.health_check_failed = False
        self.started_mono, self.started_wall = time.monotonic(), time.time()

    async def hold_listeners(self) -> None:
        """The test hook: wait LISTENER_DELAY_ENV's seconds (or until stopped)
        before binding the listeners."""
        if self.listener_delay > 0:
            log.info("test hook %s: binding the listeners in %gs", LISTENER_DELAY_ENV, self.listener_delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.listener_delay)

    @property
    def state(self) -> State:
        """As Envoy computes it: a failed health check reads DRAINING once LIVE."""
        if self.draining:
            return State.DRAINING
        if self.phase != State.LIVE:
            return self.phase
        return State.DRAINING if self.health_check_failed else State.LIVE


class Proxy(Lifecycle):
    """The running proxy: admin API, listeners, shared state, lifecycle."""

    def __init__(self, config: Config, *, argv: Sequence[str] = (), listener_delay: float = 0.0,
                 sockets: list[tuple[str, socket.socket]] | None = None,
                 conn_ids: itertools.count | None = None) -> None:
        """`sockets`: listening sockets already bound (a worker's share, see
        workers.py) instead of binding them here; `conn_ids`: where connection
        ids come from (a worker's are unique across the workers)."""
        super().__init__(config, argv=argv, listener_delay=listener_delay)
        self.sockets = sockets
        self.conn_ids = conn_ids
        self.stats = Stats()
        self.servers: list[asyncio.base_events.Server] = []
        self.redirect: Listener | None = None
        self.shared: Shared | None = None  # made when run() starts

    async def log_levels_changed(self, changes: list[tuple[str, int]]) -> None:
        """The admin API changed log levels here; one process has nobody else to tell."""

    async def snapshot(self, limit: int) -> Snapshot:
        """The data plane as the admin API reads it (see plane.py)."""
        return plane.take(self.shared, limit)

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        local = LocalAddresses()
        try:
            access_log = AccessLog(config.access_log, config.log_format)
        except OSError as exc:
            raise StartupError(f"access_log {config.access_log}: cannot open it: {exc.strerror}") from None
        self.shared = shared = Shared(config, self.stats, access_log, local)
        if self.conn_ids is not None:
            shared.ids = self.conn_ids
        admin = None
        try:
            local.watch(loop)
            loop.set_exception_handler(self._loop_exception)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            if config.admin_port:
                # imported here: aiohttp is loaded only when the admin API runs
                from ..admin.api import start_admin
                admin = await start_admin(self)
            await self.hold_listeners()
            sweeper = loop.create_task(self._sweep_idle(), name="idle-sweep")
            if not self.stopping.is_set() and not self.draining:
                self.phase = State.INITIALIZING
                await self._start_listeners(loop)
                self.workers_started, self.phase = True, State.LIVE
                if on_ready is not None:
                    on_ready()
            else:  # stopped or drained before serving: sockets handed to us must not take connections
                for _, sock in self.sockets or ():
                    sock.close()
            await self.stopping.wait()
            await self.drain()
            sweeper.cancel()
        finally:
            for server in self.servers:
                server.close()
            if admin is not None:
                await admin.close()
            local.close(loop)
            shared.access_log.close()

    async def _sweep_idle(self) -> None:
        """Close connections quiet for idle_timeout: one timer for all of them."""
        timeout = self.config.idle_timeout
        while True:
            await asyncio.sleep(idle_sweep_interval(timeout))
            close_idle(list(self.shared.live.values()), timeout)

    async def _start_listeners(self, loop: asyncio.AbstractEventLoop) -> None:
        config, shared = self.config, self.shared
        sockets = self.sockets if self.sockets is not None else open_listen_sockets(config)
        plain_by_name = {p.name: p for p in config.plain_listeners}
        try:
            first = next(sock.getsockname()[:2] for name, sock in sockets if name not in plain_by_name)
            self.redirect = Listener(shared, loop, address=first)
            while sockets:
                name, sock = sockets[0]
                plain = plain_by_name.get(name)
                listener = Listener(shared, loop, plain) if plain else self.redirect
                server = await loop.create_server(listener.protocol, sock=sock, backlog=BACKLOG)
                sockets.pop(0)
                self.servers.append(server)
                if self.draining:  # a drain or stop came while we were binding
                    server.close()
                self.listeners.setdefault(listener.name, []).append(sock.getsockname()[:2])
                log.info("listening on %s (%s)", _sockname(sock), listener.name)
        finally:
            for _, sock in sockets:  # not handed to a server: a failure above
                sock.close()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """asyncio reports EMFILE on accept here, once per attempt, with a
        traceback; it already backs off and retries, so say it once a second."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in EXHAUSTION and self.redirect is not None:
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

    async def drain(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.config.drain_timeout
        while self.shared.live and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.shared.live.values())
        if left:
            log.info("drain timeout: resetting %d connections still open", len(left))
        for relay in left:
            relay.close("drain_timeout", reset=True)
        await asyncio.sleep(0)


def _sockname(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
