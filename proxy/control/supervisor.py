"""Several worker processes on the same ports: Envoy's `--concurrency N`.

Theory of operation
-------------------
Python runs one thread of bytecode at a time, so a proxy that wants more
than one CPU needs processes. With `concurrency: N` above 1 the process
that was started becomes a *supervisor*, which moves no bytes:

1. it does what start-up checks there are (cli.py: the cgroup, SO_MARK)
   and binds the admin API, as one process would;
2. it binds every listening address N times with SO_REUSEPORT, after
   checking with an ordinary bind that nothing else holds the port (a
   second proxy of the same UID could otherwise quietly share it);
3. it starts N workers, `python -m proxy worker`, handing each its own
   socket of every address, and a socketpair as its control channel. The
   kernel spreads new connections over the N sockets by their addresses,
   as Envoy's worker threads share a port. A worker is a whole proxy
   (server.Proxy: event loop, stats, access-log writer, loop guard) that
   serves the sockets it was given and has no admin API.

The control channel carries one JSON object per line. The supervisor sends
`start` (the effective configuration, the worker's index, its sockets),
then `snapshot`, `drain`, `stop` and `log`; a worker answers requests by
their `id` and says `ready` once its listeners serve. The admin API runs in
the supervisor and reads the workers through it: /stats, /clusters and
/connections are their snapshots added up (plane.merge); /ready is LIVE
once every worker is; /drain_listeners, /quitquitquit, SIGTERM and /logging
are passed on to every worker.

A worker that ends on its own (a crash) ends the proxy: the supervisor
stops the others and exits 1, as Envoy does when any of its threads dies,
so the container is restarted whole. A worker whose supervisor is gone (the
control channel closes) drains and exits: no worker outlives the proxy.

What stays per worker: connection ids are unique (worker i of N counts
i+1, i+1+N, ...), but the loop guard knows only its own worker's upstream
sockets; a connection that loops back to another worker is forwarded once
more, and refused when it reaches the one that made the socket (after N
hops on average).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

from . import logs
from . import plane
from ..config import Config, ConfigError, from_data
from .plane import Snapshot
from .server import Lifecycle, Proxy, StartupError, State, open_listen_sockets

log = logging.getLogger("proxy.workers")

READY_TIMEOUT = 30.0  # seconds a worker may take to serve its listeners
REQUEST_TIMEOUT = 5.0  # seconds a worker may take to answer the admin API
CONTROL_LINE_LIMIT = 1 << 30  # a snapshot with many live connections is a long line
EXIT_WAIT = 5.0  # seconds to wait for a worker whose control channel closed to exit


class WorkerFailed(Exception):
    """A worker ended on its own; str() is the one-line reason."""


class BadStart(Exception):
    """`proxy worker` was not started by a supervisor as it should be; str() says how."""


# --- the supervisor -----------------------------------------------------------------

class WorkerProcess:
    """One worker as the supervisor sees it: the process and its control channel."""

    def __init__(self, index: int, proc: subprocess.Popen, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        self.index, self.proc, self.reader, self.writer = index, proc, reader, writer
        self.ready = loop.create_future()
        self.gone = loop.create_future()  # the control channel closed: the worker is ending or ended
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._reading = loop.create_task(self._read(), name=f"worker-{index}-control")

    def __str__(self) -> str:
        return f"worker {self.index} (pid {self.proc.pid})"

    def send(self, message: dict) -> None:
        if not self.gone.done():
            self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def request(self, op: str, **args) -> dict:
        future = asyncio.get_running_loop().create_future()
        request_id = next(self._ids)
        self._pending[request_id] = future
        self.send({"op": op, "id": request_id, **args})
        try:
            return await asyncio.wait_for(future, REQUEST_TIMEOUT)
        finally:
            self._pending.pop(request_id, None)

    async def _read(self) -> None:
        try:
            while line := await self.reader.readline():
                message = json.loads(line)
                if message.get("event") == "ready":
                    if not self.ready.done():
                        self.ready.set_result(None)
                elif (future := self._pending.get(message.get("id"))) is not None and not future.done():
                    future.set_result(message["result"])
        except (OSError, ValueError) as exc:
            log.error("%s: control channel failed: %s", self, exc)
        finally:
            self.gone.set_result(None)
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(WorkerFailed(f"{self} is gone"))
            self.writer.close()

    async def exit_status(self) -> int:
        return await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)


class Supervisor(Lifecycle):
    """The proxy with N worker processes: admin API, workers, lifecycle."""

    def __init__(self, config: Config, *, argv=(), listener_delay: float = 0.0) -> None:
        super().__init__(config, argv=argv, listener_delay=listener_delay)
        self.workers: list[WorkerProcess] = []
        self.failure: str | None = None

    # what the admin API asks --------------------------------------------------------
    async def snapshot(self, limit: int) -> Snapshot:
        live = [w for w in self.workers if w.ready.done() and not w.gone.done()]
        answers = await asyncio.gather(*(w.request("snapshot", limit=limit) for w in live))
        return plane.merge((Snapshot.from_json(a) for a in answers), limit)

    async def log_levels_changed(self, changes: list[tuple[str, int]]) -> None:
        for worker in self.workers:
            worker.send({"op": "log", "changes": changes})

    def drain_listeners(self) -> None:
        if not self.draining:
            self.draining = True
            log.info("draining: the workers close their listeners; live connections go on")
            for worker in self.workers:
                if worker.ready.done():  # the others are told when they are ready (_spawn)
                    worker.send({"op": "drain"})

    def _worker_ready(self, worker: WorkerProcess) -> None:
        if self.draining:  # a drain came while it started: its listeners close at once
            worker.send({"op": "drain"})

    def stop(self) -> None:
        if not self.stopping.is_set():
            self.draining = True
            log.info("stopping: the workers drain and exit")
            self.stopping.set()

    # running ------------------------------------------------------------------------
    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        admin = None
        try:
            if self.config.admin_port:
                from ..admin.api import start_admin  # aiohttp only where the admin API runs
                admin = await start_admin(self)
            await self.hold_listeners()
            if not self.stopping.is_set():
                self.phase = State.INITIALIZING
                await self._start_workers()
                await self._until_all_ready()
            if self.failure is None and not self.stopping.is_set():
                self.workers_started, self.phase = True, State.LIVE
                if on_ready is not None:
                    on_ready()
                await self._until_stopped_or_failed()
            await self._stop_workers()
        finally:
            for worker in self.workers:
                if worker.proc.poll() is None:
                    worker.proc.kill()
                    await worker.exit_status()
            if admin is not None:
                await admin.close()
        if self.failure is not None:
            raise WorkerFailed(self.failure)

    async def _start_workers(self) -> None:
        config, n = self.config, self.config.concurrency
        for share in _refuse_if_taken(config):  # nothing else holds the ports
            share.close()
        shares = []
        try:
            for _ in range(n):
                shares.append(open_listen_sockets(config, reuse_port=True))
            for name, sock in shares[0]:
                self.listeners.setdefault(_listener_name(config, name), []).append(sock.getsockname()[:2])
            for index, share in enumerate(shares):
                worker = await _spawn(config, index, n, share)
                worker.ready.add_done_callback(lambda _, w=worker: self._worker_ready(w))
                self.workers.append(worker)
        finally:
            for share in shares:  # the workers have their own descriptors now
                for _, sock in share:
                    sock.close()
        log.info("%d workers started: %s", n, ", ".join(f"pid {w.proc.pid}" for w in self.workers))

    async def _until_all_ready(self) -> None:
        waiting = {asyncio.ensure_future(w.ready) for w in self.workers}
        gone = {asyncio.ensure_future(w.gone) for w in self.workers}
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                while waiting and not stop.done():
                    done, _ = await asyncio.wait(waiting | gone | {stop}, return_when=asyncio.FIRST_COMPLETED)
                    if done & gone:
                        await self._worker_ended()
                        return
                    waiting -= done
        except TimeoutError:
            self.failure = f"a worker did not serve its listeners within {READY_TIMEOUT:g}s"
        finally:
            stop.cancel()

    async def _until_stopped_or_failed(self) -> None:
        stop = asyncio.ensure_future(self.stopping.wait())
        gone = [asyncio.ensure_future(w.gone) for w in self.workers]
        done, _ = await asyncio.wait([stop, *gone], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if stop not in done:
            await self._worker_ended()

    async def _worker_ended(self) -> None:
        worker = next(w for w in self.workers if w.gone.done())
        try:
            async with asyncio.timeout(EXIT_WAIT):
                status = await worker.exit_status()
        except TimeoutError:  # it closed the channel but goes on: it is not ours any more
            worker.proc.kill()
            status = await worker.exit_status()
        self.failure = f"{worker} ended on its own (exit status {status}); stopping the proxy"
        log.error("%s", self.failure)
        self.draining = True

    async def _stop_workers(self) -> None:
        for worker in self.workers:
            worker.send({"op": "stop"})
        deadline = self.config.drain_timeout + 10
        try:
            async with asyncio.timeout(deadline):
                statuses = [await w.exit_status() for w in self.workers]
        except TimeoutError:
            if self.failure is None:
                self.failure = f"workers still running {deadline:g}s after stop: killed them"
            return
        failed = [f"{w}: exit status {s}" for w, s in zip(self.workers, statuses) if s != 0]
        if failed and self.failure is None:
            self.failure = "; ".join(failed)


def _refuse_if_taken(config: Config) -> list[socket.socket]:
    """Bind every address once without SO_REUSEPORT: a port someone holds is a StartupError."""
    return [sock for _, sock in open_listen_sockets(config)]


def _listener_name(config: Config, name: str) -> str:
    """open_listen_sockets names redirect sockets by address, plain ones by name."""
    return name if any(p.name == name for p in config.plain_listeners) else "redirect"


async def _spawn(config: Config, index: int, count: int, share: list[tuple[str, socket.socket]]) -> WorkerProcess:
    ours, theirs = socket.socketpair()
    try:
        fds = [theirs.fileno(), *(sock.fileno() for _, sock in share)]
        try:
            proc = subprocess.Popen([sys.executable, "-m", "proxy", "worker", "--control", str(theirs.fileno())],
                                    pass_fds=fds, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise StartupError(f"workers: cannot start worker {index}: {exc.strerror}") from None
    finally:
        theirs.close()
    reader, writer = await asyncio.open_unix_connection(sock=ours, limit=CONTROL_LINE_LIMIT)
    worker = WorkerProcess(index, proc, reader, writer)
    worker.send({"op": "start", "index": index, "count": count, "config": config.to_dict(),
                 "listeners": [[name, sock.fileno()] for name, sock in share]})
    return worker


# --- a worker --------------------------------------------------------------------------

class WorkerControl(asyncio.Protocol):
    """The worker's end of its control channel."""

    def __init__(self, proxy: Proxy, pending: bytes = b"") -> None:
        self.proxy = proxy
        self.buffer = pending  # what came after the start message
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.data_received(b"")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            self._handle(json.loads(line))

    def _handle(self, message: dict) -> None:
        op, proxy = message.get("op"), self.proxy
        if op == "snapshot":
            snap = plane.take(proxy.shared, message["limit"]) if proxy.workers_started else Snapshot()
            self._send({"id": message["id"], "result": snap.to_json()})
        elif op == "drain":
            proxy.drain_listeners()
        elif op == "stop":
            proxy.stop()
        elif op == "log":
            logs.apply_levels([tuple(change) for change in message["changes"]])

    def ready(self) -> None:
        self._send({"event": "ready"})

    def _send(self, message: dict) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def eof_received(self) -> bool:
        return False  # the supervisor is gone: connection_lost stops us

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.proxy.stop()


def run_worker(control_fd: int, runner_for: Callable[[str], asyncio.Runner]) -> int:
    """`python -m proxy worker --control FD`: serve the sockets the supervisor hands over."""
    try:
        control = socket.socket(fileno=control_fd)
        start, pending = _first_line(control)
        config = dataclasses.replace(from_data(start["config"]), admin_port=0, concurrency=1)
        index, count = int(start["index"]), int(start["count"])
        sockets = [(name, socket.socket(fileno=fd)) for name, fd in start["listeners"]]
    except OSError as exc:
        raise BadStart(f"--control {control_fd}: {exc.strerror} (workers are started by the proxy itself, "
                       "see --concurrency)") from None
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise BadStart(f"--control {control_fd}: not a start message from a proxy ({exc})") from None
    logs.setup(config.log_format, config.log_level, worker=index)
    for _, sock in sockets:
        sock.setblocking(False)
    proxy = Proxy(config, argv=sys.argv, sockets=sockets, conn_ids=itertools.count(index + 1, count))

    async def serve() -> None:
        protocol = WorkerControl(proxy, pending)
        transport, _ = await asyncio.get_running_loop().create_unix_connection(lambda: protocol, sock=control)
        try:
            await proxy.run(on_ready=protocol.ready)
        finally:
            transport.close()

    with runner_for(config.loop) as runner:
        runner.run(serve())
    return 0


def _first_line(sock: socket.socket) -> tuple[dict, bytes]:
    """The start message, and whatever came after it (read before the loop runs)."""
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ValueError("the control channel closed before the start message")
        data += chunk
    line, _, rest = data.partition(b"\n")
    return json.loads(line), rest
