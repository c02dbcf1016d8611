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
   as Envoy's worker threads share a port. A worker (worker.py) is a whole
   proxy (server.Proxy: event loop, stats, access-log writer, loop guard)
   that serves the sockets it was given and has no admin API.

The control channel (channel.py) carries `start` (the effective
configuration, the worker's index, its sockets), then `snapshot`, `drain`,
`stop` and `log`; a worker says `ready` once its listeners serve. The admin
API runs in the supervisor and reads the workers through it: /stats,
/clusters and /connections are their snapshots added up
(datapath/snapshot.merge); /ready is LIVE
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
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from functools import partial

from ..config import Config
from ..datapath.snapshot import Snapshot, merge
from . import logs
from .channel import Channel
from .lifecycle import AdminStarter, Runner, StartupError
from .sockets import Bound, open_listen_sockets

log = logging.getLogger("proxy.workers")

READY_TIMEOUT = 30.0  # seconds a worker may take to serve its listeners
REQUEST_TIMEOUT = 5.0  # seconds a worker may take to answer the admin API
EXIT_WAIT = 5.0  # seconds to wait for a worker whose control channel closed to exit


class WorkerFailed(Exception):
    """A worker ended on its own; str() is the one-line reason."""


class WorkerProcess:
    """One worker as the supervisor sees it: the process and its control channel."""

    def __init__(self, index: int, proc: subprocess.Popen) -> None:
        loop = asyncio.get_running_loop()
        self.index, self.proc = index, proc
        self.ready = loop.create_future()
        self.gone = loop.create_future()  # the control channel closed: the worker is ending or ended
        self.channel: Channel | None = None

    def __str__(self) -> str:
        return f"worker {self.index} (pid {self.proc.pid})"

    async def connect(self, sock: socket.socket) -> None:
        """Speak the control channel over our end of the worker's socketpair."""
        loop = asyncio.get_running_loop()
        _, self.channel = await loop.create_unix_connection(lambda: Channel(self._heard, self._closed), sock=sock)

    def send(self, message: dict) -> None:
        if self.channel is not None:
            self.channel.send(message)

    async def request(self, op: str, **args) -> dict:
        assert self.channel is not None
        return await self.channel.request(op, REQUEST_TIMEOUT, **args)

    def _heard(self, message: dict) -> None:
        if message.get("event") == "ready" and not self.ready.done():
            self.ready.set_result(None)

    def _closed(self) -> None:
        if not self.gone.done():
            self.gone.set_result(None)

    async def exit_status(self) -> int:
        return await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)


class Supervisor(Runner):
    """The proxy with N worker processes: admin API, workers, lifecycle."""

    def __init__(self, config: Config, *, argv: Sequence[str] = (), listener_delay: float = 0.0,
                 admin: AdminStarter | None = None) -> None:
        super().__init__(config, argv=argv, listener_delay=listener_delay, admin=admin)
        self.workers: list[WorkerProcess] = []
        self.failure: str | None = None

    # what the admin API asks --------------------------------------------------------
    async def snapshot(self, limit: int) -> Snapshot:
        live = [w for w in self.workers if w.ready.done() and not w.gone.done()]
        answers = await asyncio.gather(*(w.request("snapshot", limit=limit) for w in live))
        return merge((Snapshot.from_json(a) for a in answers), limit).add(logs.counters())  # and our own lines

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

    def _worker_ready(self, worker: WorkerProcess, _: asyncio.Future[None] | None = None) -> None:
        if self.draining:  # a drain came while it started: its listeners close at once
            worker.send({"op": "drain"})

    def stop(self) -> None:
        if not self.stopping.is_set():
            self.draining = True
            log.info("stopping: the workers drain and exit")
            self.stopping.set()

    async def run(self, on_ready=None) -> None:
        await super().run(on_ready)
        if self.failure is not None:
            raise WorkerFailed(self.failure)

    # the run skeleton's steps (lifecycle.Runner.run) ---------------------------------
    async def _serve(self, loop: asyncio.AbstractEventLoop) -> bool:
        await self._start_workers()
        await self._until_all_ready()
        return self.failure is None and not self.stopping.is_set()

    async def _until_stopped(self) -> None:
        if self.workers_started:
            await self._until_stopped_or_failed()
        elif self.failure is None:  # drained before the workers started: nothing serves, wait for the stop
            await self.stopping.wait()
        await self._stop_workers()

    async def _close(self, loop: asyncio.AbstractEventLoop) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                await worker.exit_status()

    # the workers --------------------------------------------------------------------
    async def _start_workers(self) -> None:
        config, n = self.config, self.config.concurrency
        for bound in open_listen_sockets(config):  # nothing else holds the ports
            bound.sock.close()
        shares: list[list[Bound]] = []
        try:
            for _ in range(n):
                shares.append(open_listen_sockets(config, reuse_port=True))
            for bound in shares[0]:
                name = config.listeners[bound.listener].name
                self.listeners.setdefault(name, []).append(bound.sock.getsockname()[:2])
            for index, share in enumerate(shares):
                worker = await _spawn(config, index, n, share)
                worker.ready.add_done_callback(partial(self._worker_ready, worker))
                self.workers.append(worker)
        finally:
            for share in shares:  # the workers have their own descriptors now
                for bound in share:
                    bound.sock.close()
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
        failed = [f"{w}: exit status {s}" for w, s in zip(self.workers, statuses, strict=True) if s != 0]
        if failed and self.failure is None:
            self.failure = "; ".join(failed)


def worker_argv(control_fd: int) -> tuple[list[str], dict[str, str]]:
    """How a worker is started: this interpreter, this very package, nothing from the current directory.

    `-P` keeps the current directory off sys.path (a source checkout there
    would otherwise be imported instead, and run as the proxy's UID), and
    PYTHONPATH names the directory this package was loaded from, so the
    workers run the supervisor's own code wherever it was installed.
    """
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": package_root}
    return [sys.executable, "-P", "-m", "proxy", "worker", "--control", str(control_fd)], env


async def _spawn(config: Config, index: int, count: int, share: list[Bound]) -> WorkerProcess:
    ours, theirs = socket.socketpair()
    try:
        fds = [theirs.fileno(), *(bound.sock.fileno() for bound in share)]
        argv, env = worker_argv(theirs.fileno())
        try:
            # a fork and exec once per worker at start-up: not worth a thread
            proc = subprocess.Popen(argv, env=env, pass_fds=fds, stdin=subprocess.DEVNULL)  # noqa: ASYNC220
        except OSError as exc:
            raise StartupError(f"workers: cannot start worker {index}: {exc.strerror}") from None
    finally:
        theirs.close()
    worker = WorkerProcess(index, proc)
    await worker.connect(ours)
    worker.send({"op": "start", "index": index, "count": count, "config": config.to_dict(),
                 "listeners": [[bound.listener, bound.sock.fileno()] for bound in share]})
    return worker
