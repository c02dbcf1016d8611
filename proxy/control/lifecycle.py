"""A proxy process's life: start-up checks, Envoy's server states, and the run
skeleton a single process (server.Proxy) and a supervisor of workers
(supervisor.Supervisor) share.

Start-up does every check that can fail before the first connection:
joining the bypass cgroup, the SO_MARK privilege, binding the admin API,
binding every listener. Any failure there is a `StartupError` with one line
that says whose fault it is; the CLI prints it and exits 1.

The server's state is Envoy's (admin.v3.ServerInfo.State), which the admin
API reports in /ready, /server_info and the `server.state` stat:

    PRE_INITIALIZING (2)  the admin API is up, the listeners are not bound yet
    INITIALIZING (3)      binding the listeners (or starting the workers)
    LIVE (0)              every listener is bound and serving
    DRAINING (1)          stopping (SIGTERM, /quitquitquit; server.py), or
                          /healthcheck/fail was called (/drain_listeners leaves
                          the state LIVE, as in Envoy)

`Runner.run` is the one skeleton: signals, the admin API first (so a probe
sees "not ready" rather than "refused" while the rest starts), the test
hook's hold, serving, waiting to be stopped, and closing everything in
reverse. For tests, the environment variable named by `LISTENER_DELAY_ENV`
(seconds) holds the proxy in PRE_INITIALIZING that long before it binds the
listeners: the only way to observe that state from outside, since binding is
otherwise near-instant.

`Lifecycle` is the contract of the admin API (admin/api.py): everything it
may read or call on a running proxy, whichever kind of runner it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import resource
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from ..config import Config, hostport
from ..datapath.snapshot import Snapshot
from ..datapath.sockopts import can_mark, can_transparent

log = logging.getLogger("proxy.server")

LISTENER_DELAY_ENV = "SIDECAR_PROXY_TEST_LISTENER_DELAY"  # test hook, see the module docstring


class State(enum.IntEnum):
    """Envoy's server states, with Envoy's numbers (the `server.state` stat)."""

    LIVE = 0
    DRAINING = 1
    PRE_INITIALIZING = 2
    INITIALIZING = 3


class StartupError(Exception):
    """The proxy cannot start; str() is the one-line reason."""


class Lifecycle(Protocol):
    """What the admin API may read and call on a running proxy."""

    config: Config
    argv: tuple[str, ...]  # the command line, for /server_info
    listeners: dict[str, list[tuple[str, int]]]  # listener name -> its bound (host, port)s
    workers_started: bool  # every listener serves (Envoy's listener_manager.workers_started)
    draining: bool
    health_check_failed: bool  # /healthcheck/fail was called
    started_mono: float  # time.monotonic() at start, for uptimes
    started_wall: float  # time.time() at start: when the configuration took effect (/config_dump)

    @property
    def state(self) -> State: ...

    async def snapshot(self, limit: int) -> Snapshot:
        """The data plane (every worker's, added up), with at most `limit` live connections."""

    def stop(self) -> None:
        """Stop accepting, drain, exit (/quitquitquit; SIGTERM keeps outbound open meanwhile)."""

    def drain_listeners(self, inbound_only: bool = False, graceful: bool = False, skip_exit: bool = False) -> None:
        """Envoy's /drain_listeners (`inboundonly`, `graceful`, `skip_exit`: the listeners are not
        stopped); live connections and the process go on."""

    async def log_levels_changed(self, changes: list[tuple[str, int]]) -> None:
        """The admin API changed log levels here: tell whoever else logs (the workers)."""


class AdminServer(Protocol):
    address: tuple[str, int]  # where it listens (the kernel's port, if the configuration said 0)

    async def close(self) -> None: ...


AdminStarter = Callable[[Lifecycle], Awaitable[AdminServer]]


# --- start-up checks -------------------------------------------------------------------

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
    """SO_MARK and IP_TRANSPARENT, where the config needs them: a StartupError naming
    the capability and why, before any socket is opened."""
    if config.inbound_mode == "tproxy":
        reason = can_transparent()
        if reason is not None:
            raise StartupError(f"privilege: inbound_mode tproxy needs CAP_NET_ADMIN, which this process lacks "
                               f"({reason}): IP_TRANSPARENT lets the listener take TPROXY'd connections and the "
                               "connection to the app come from the client's address; grant it or use "
                               "inbound_mode redirect")
    marks = {m for m in (config.mark, *(c.mark for c in config.clusters)) if m is not None}
    if config.inbound_mode == "tproxy":
        marks.add(config.tproxy_mark)
    for mark in sorted(marks):
        reason = can_mark(mark)
        if reason is not None:
            raise StartupError(f"privilege: SO_MARK {mark:#x} needs CAP_NET_ADMIN, which this process "
                               f"lacks ({reason}); grant it or use another bypass method")


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one, which needs no privilege; (before, after).

    Every proxied connection costs two descriptors (four while it splices);
    runtimes often start processes at a soft 1024 under a hard limit far
    above it, and the proxy would refuse connections with EMFILE it could
    have taken.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel's ceiling for one process is nr_open
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("open files: cannot raise the soft limit %d to %d: %s", soft, target, exc)
        return soft, soft
    return soft, target


def write_admin_address(path: str, address: tuple[str, int]) -> None:
    """Write where the admin API listens, as Envoy's --admin-address-path does (`127.0.0.1:15000`)."""
    try:
        with open(path, "w") as f:
            f.write(hostport(*address))
    except OSError as exc:
        raise StartupError(f"--admin-address-path {path}: cannot write it: {exc.strerror}") from None


# --- the run skeleton --------------------------------------------------------------------

class Runner:
    """What both kinds of proxy process share: their state and how they run.

    A subclass fills in four steps: `_open` (what must exist before the admin
    API answers), `_serve` (start serving; True once it does), `_until_stopped`
    (serve until told to stop, then drain) and `_close` (let go of everything,
    also after a failure).
    """

    def __init__(self, config: Config, *, argv: Sequence[str] = (), listener_delay: float = 0.0,
                 admin: AdminStarter | None = None) -> None:
        """`admin`: starts the admin API (unless `config.admin_port` is None); None for a worker."""
        self.config = config
        self.argv = tuple(argv)
        self.listener_delay = listener_delay
        self.start_admin = admin
        self.listeners: dict[str, list[tuple[str, int]]] = {}
        self.workers_started = False
        self.stopping = asyncio.Event()
        self.phase = State.PRE_INITIALIZING  # LIVE once every listener serves
        self.draining = False
        self.health_check_failed = False
        self.started_mono, self.started_wall = time.monotonic(), time.time()

    @property
    def state(self) -> State:
        """As Envoy computes it: a failed health check reads DRAINING once LIVE."""
        if self.draining:
            return State.DRAINING
        if self.phase != State.LIVE:
            return self.phase
        return State.DRAINING if self.health_check_failed else State.LIVE

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.terminate)
        admin = None
        try:
            await self._open(loop)
            if self.start_admin is not None and self.config.admin_port is not None:
                admin = await self.start_admin(self)
                if self.config.admin_address_path:
                    write_admin_address(self.config.admin_address_path, admin.address)
            await self._hold_listeners()
            if not self.stopping.is_set() and not self.draining:
                self.phase = State.INITIALIZING
                if await self._serve(loop):
                    self.workers_started, self.phase = True, State.LIVE
                    if on_ready is not None:
                        on_ready()
            await self._until_stopped()
        finally:
            await self._close(loop)
            if admin is not None:
                await admin.close()

    async def _hold_listeners(self) -> None:
        """The test hook: wait LISTENER_DELAY_ENV's seconds (or until stopped)
        before binding the listeners."""
        if self.listener_delay > 0:
            log.info("test hook %s: binding the listeners in %gs", LISTENER_DELAY_ENV, self.listener_delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.listener_delay)

    async def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        """What must exist before the admin API answers."""

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> bool:
        raise NotImplementedError

    async def _until_stopped(self) -> None:
        raise NotImplementedError

    async def _close(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let go of everything `_open` and `_serve` made (also after a failure)."""

    def stop(self) -> None:
        raise NotImplementedError

    def terminate(self) -> None:
        """SIGTERM, SIGINT: as Istio drains a sidecar (server.py); stop() unless a runner knows better."""
        self.stop()

    def drain_listeners(self, inbound_only: bool = False, graceful: bool = False, skip_exit: bool = False) -> None:
        raise NotImplementedError

    async def snapshot(self, limit: int) -> Snapshot:
        raise NotImplementedError

    async def log_levels_changed(self, changes: list[tuple[str, int]]) -> None:
        raise NotImplementedError
