"""Start-up, signals, drain and shutdown of the proxy process.

Start-up does every check that can fail before the first connection:
joining the bypass cgroup, the SO_MARK privilege, binding every listener.
Any failure there is a `StartupError` with one line that says whose fault it
is; the CLI prints it and exits 1.

Shutdown (SIGTERM or SIGINT): stop accepting, give live connections up to
`drain_timeout` to finish on their own, reset whatever is left, exit 0.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

from .accesslog import AccessLog
from .config import Config
from .listener import Listener, Shared
from .localaddrs import LocalAddresses
from .sockopts import can_mark
from .stats import Stats
from .upstream import EXHAUSTION

log = logging.getLogger("proxy.server")

BACKLOG = 4096


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


def bind(address: str, port: int, dual_stack: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def open_listen_sockets(config: Config) -> list[tuple[str, socket.socket]]:
    """Bind the redirected port on every configured address (IPv4 and IPv6)."""
    sockets = []
    try:
        addresses = config.addresses
        dual = "::" in addresses and "0.0.0.0" not in addresses
        for address in addresses:
            try:
                sockets.append((address, bind(address, config.port, dual and address == "::")))
            except OSError as exc:
                if address == "::" and addresses == ("::",) and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    log.warning("no IPv6 here (%s); listening on IPv4 only", exc.strerror)
                    sockets.append(("0.0.0.0", bind("0.0.0.0", config.port, False)))
                else:
                    raise StartupError(f"listener: cannot bind {address} port {config.port}: {exc.strerror}") from None
        for plain in config.plain_listeners:
            try:
                sockets.append((plain.name, bind(plain.address, plain.port, False)))
            except OSError as exc:
                raise StartupError(f"plain listener {plain.name}: cannot bind {plain.address} "
                                   f"port {plain.port}: {exc.strerror}") from None
    except BaseException:
        for _, sock in sockets:
            sock.close()
        raise
    return sockets


class Proxy:
    """The running proxy: listeners, shared state, lifecycle."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats()
        self.servers: list[asyncio.base_events.Server] = []
        self.stopping = asyncio.Event()

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        sockets = open_listen_sockets(config)
        local = LocalAddresses()
        self.shared = shared = Shared(config, self.stats, AccessLog(config.access_log, config.log_format), local)
        local.watch(loop)
        loop.set_exception_handler(self._loop_exception)
        plain_by_name = {p.name: p for p in config.plain_listeners}
        try:
            redirect = Listener(shared, loop)
            for name, sock in sockets:
                listener = Listener(shared, loop, plain_by_name[name]) if name in plain_by_name else redirect
                server = await loop.create_server(listener.protocol, sock=sock, backlog=BACKLOG)
                self.servers.append(server)
                log.info("listening on %s (%s)", _sockname(sock), listener.name)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            if on_ready is not None:
                on_ready()
            await self.stopping.wait()
            await self.drain()
        finally:
            for server in self.servers:
                server.close()
            local.close(loop)
            shared.access_log.close()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """asyncio reports EMFILE on accept here, once per attempt, with a
        traceback; it already backs off and retries, so say it once a second."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in EXHAUSTION:
            self.stats.inc("listener.redirect.resource_exhaustion")
            now = time.monotonic()
            if now - self.shared.exhaustion_logged >= 1.0:
                self.shared.exhaustion_logged = now
                log.warning("out of resources on accept (%s): backing off", errno.errorcode.get(exc.errno))
            return
        loop.default_exception_handler(context)

    def stop(self) -> None:
        """Stop accepting now; run() then drains and returns."""
        if not self.stopping.is_set():
            for server in self.servers:
                server.close()
            log.info("stopping: no new connections; draining %d live ones", len(self.shared.live))
            self.stopping.set()

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
