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
configuration, the worker's index, its sockets), then `ping`, `snapshot`,
`drain`, `stop` and `log`; a worker says `ready` once its listeners serve.
The admin API runs in the supervisor and reads the workers through it:
/stats, /clusters and /connections are their snapshots added up
(datapath/snapshot.merge), without a worker that does not answer; /ready
is LIVE while every worker serves and answers; /drain_listeners,
/quitquitquit, SIGTERM and /logging are passed on to every worker, each of
which drains its own connections (server.py).

Supervision (the figures are watchdog.py's): the supervisor pings every
serving worker each second. One that misses the deadline makes /ready
answer 503 until it answers again; one that stays stuck is killed. A
worker that dies (killed, crashed, or gone from its channel) is started
again on fresh sockets of its own while the others serve, after a wait that
doubles with each death; more deaths than the bound within a minute is a
crash loop, and the supervisor stops the others and exits 1. A worker that
dies before the proxy first serves ends it at once (exit 1): its
replacement would meet the same configuration and environment. While the
proxy stops (SIGTERM), a dead worker is not replaced; after a
/drain_listeners it is, and hears of the drains (its own timeline). The ping's answer carries the
worker's counters, so those of a dead worker (as of its last answer, at
most a second old) stay in /stats; its gauges leave with it. Its clients
see a reset, not a clean end (datapath/relay.py arms SO_LINGER 0 while a
connection relays).

A worker whose supervisor is gone (the control channel closes) drains and
exits: no worker outlives the proxy.

What stays per worker: connection ids are unique (worker i of N counts
i+1, i+1+N, ..., and a replacement goes on from far above), but the loop
guard knows only its own worker's upstream sockets; a connection that loops
back to another worker is forwarded once more, and refused when it reaches
the one that made the socket (after N hops on average).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence

from ..config import Config
from ..datapath.snapshot import Snapshot, merge
from ..datapath.stats import is_gauge
from . import logs
from .channel import Channel, ChannelClosed
from .lifecycle import AdminStarter, Runner, StartupError, State
from .sockets import Bound, check_ports_free, open_listen_sockets
from .watchdog import KILL_AFTER, PING_DEADLINE, PING_INTERVAL, Restarts

log = logging.getLogger("proxy.workers")

READY_TIMEOUT = 30.0  # seconds a worker may take to serve its listeners
REQUEST_TIMEOUT = 5.0  # seconds a worker may take to answer the admin API
EXIT_WAIT = 5.0  # seconds to wait for a worker whose control channel closed to exit
RESTARTS_STAT = "server.worker_restarts"  # ours
MISS_STAT = "server.watchdog_miss"  # Envoy's: a worker that did not answer in time


class WorkerFailed(Exception):
    """The workers could not be kept running; str() is the one-line reason."""


class WorkerProcess:
    """One worker as the supervisor sees it: the process, its control channel, its health."""

    def __init__(self, index: int, generation: int, proc: subprocess.Popen) -> None:
        loop = asyncio.get_running_loop()
        self.index, self.generation, self.proc = index, generation, proc
        self.ready = loop.create_future()
        self.gone = loop.create_future()  # the control channel closed: the worker is ending or ended
        self.channel: Channel | None = None
        self.missed = 0  # pings in a row it did not answer in time
        self.counters: dict[str, int] = {}  # as of its last answer to a ping
        self.watchdog: asyncio.Task | None = None

    def __str__(self) -> str:
        return f"worker {self.index} (pid {self.proc.pid})"

    @property
    def serving(self) -> bool:
        """Ready, alive and answering."""
        return self.ready.done() and not self.gone.done() and not self.missed

    async def connect(self, sock: socket.socket) -> None:
        """Speak the control channel over our end of the worker's socketpair."""
        loop = asyncio.get_running_loop()
        _, self.channel = await loop.create_unix_connection(lambda: Channel(self._heard, self._closed), sock=sock)

    def send(self, message: dict) -> None:
        if self.channel is not None:
            self.channel.send(message)

    async def request(self, op: str, timeout: float = REQUEST_TIMEOUT, **args) -> dict:  # noqa: ASYNC109
        if self.channel is None:
            raise ChannelClosed("no channel")
        return await self.channel.request(op, timeout, **args)

    def _heard(self, message: dict) -> None:
        if message.get("event") == "ready" and not self.ready.done():
            self.ready.set_result(None)

    def _closed(self) -> None:
        if not self.gone.done():
            self.gone.set_result(None)

    async def exit_status(self) -> int:
        return await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)


class Supervisor(Runner):
    """The proxy with N worker processes: admin API, workers, watchdog, lifecycle."""

    def __init__(self, config: Config, *, argv: Sequence[str] = (), listener_delay: float = 0.0,
                 admin: AdminStarter | None = None) -> None:
        super().__init__(config, argv=argv, listener_delay=listener_delay, admin=admin)
        self.workers: list[WorkerProcess] = []  # the current one of each index
        self.failure: str | None = None
        self.restarts = Restarts()
        self.counters: Counter[str] = Counter()  # the supervisor's own stats
        self.retired: Counter[str] = Counter()  # the counters of workers that died
        self.drains: list[dict] = []  # every /drain_listeners so far, for workers that start later
        self.stop_op = "stop"  # what the workers are told when the proxy stops (SIGTERM: terminate)

    @property
    def state(self) -> State:
        """LIVE only while every worker serves and answers (Envoy says DRAINING for a failed health check)."""
        state = super().state
        if state == State.LIVE and not all(w.serving for w in self.workers):
            return State.DRAINING
        return state

    # what the admin API asks --------------------------------------------------------
    async def snapshot(self, limit: int) -> Snapshot:
        live = [w for w in self.workers if w.serving]
        answers = await asyncio.gather(*(w.request("snapshot", limit=limit) for w in live), return_exceptions=True)
        snaps = []
        for worker, answer in zip(live, answers, strict=True):
            if isinstance(answer, dict):  # one that did not answer is left out
                snaps.append(Snapshot.from_json(answer))
                worker.counters = snaps[-1].counters  # fresher than its last ping's
        merged = merge(snaps, limit).add(dict(self.retired)).add(logs.counters())  # and the supervisor's own
        return merged.add({RESTARTS_STAT: self.counters[RESTARTS_STAT], MISS_STAT: self.counters[MISS_STAT]})

    async def log_levels_changed(self, changes: list[tuple[str, int]]) -> None:
        for worker in self.workers:
            worker.send({"op": "log", "changes": changes})

    def drain_listeners(self, inbound_only: bool = False, graceful: bool = False, skip_exit: bool = False) -> None:
        """Each worker drains its own listeners (server.py), from when it hears of it."""
        drain = {"op": "drain", "inbound_only": inbound_only, "graceful": graceful, "skip_exit": skip_exit}
        self.drains.append(drain)
        log.info("draining %s%s: the workers drain their listeners; live connections go on",
                 "inbound" if inbound_only else "all", " gracefully" if graceful else "")
        for worker in self.workers:
            if worker.ready.done():  # the others are told when they are ready (_worker_ready)
                worker.send(drain)

    def _worker_ready(self, worker: WorkerProcess, _: asyncio.Future[None] | None = None) -> None:
        for drain in self.drains:  # drains that came while it started
            worker.send(drain)

    def stop(self) -> None:
        self._stop("stop")

    def terminate(self) -> None:
        self._stop("terminate")

    def _stop(self, how: str) -> None:
        """The workers are told `how` (server.py: stop, or terminate for SIGTERM) when they are stopped."""
        if self.stopping.is_set() and how == "stop" and self.stop_op != "stop":  # /quitquitquit during SIGTERM
            self.stop_op = how
            for worker in self.workers:
                worker.send({"op": how})
        if not self.stopping.is_set():
            self.draining = True
            self.stop_op = how
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
            await self._supervise()
        elif self.failure is None:  # drained before the workers started: nothing serves, wait for the stop
            await self.stopping.wait()
        await self._stop_workers()

    async def _close(self, loop: asyncio.AbstractEventLoop) -> None:
        for worker in self.workers:
            if worker.watchdog is not None:
                worker.watchdog.cancel()
            if worker.proc.poll() is None:
                worker.proc.kill()
                await worker.exit_status()

    # starting workers ------------------------------------------------------------------
    async def _start_workers(self) -> None:
        config, n = self.config, self.config.concurrency
        check_ports_free(config)
        self.counters.update({RESTARTS_STAT: 0, MISS_STAT: 0})
        for index in range(n):
            self.workers.append(await self._spawn(index, 0))
        log.info("%d workers started: %s", n, ", ".join(f"pid {w.proc.pid}" for w in self.workers))

    async def _spawn(self, index: int, generation: int) -> WorkerProcess:
        """Worker `index` on sockets of its own (bound again with SO_REUSEPORT), its watchdog running."""
        share = open_listen_sockets(self.config)
        if not self.listeners:  # what the admin API lists: the addresses as bound
            for bound in share:
                name = self.config.listeners[bound.listener].name
                self.listeners.setdefault(name, []).append(bound.sock.getsockname()[:2])
        try:
            worker = await _spawn(self.config, index, generation, self.config.concurrency, share)
        finally:
            for bound in share:  # the worker has its own descriptors now
                bound.sock.close()
        worker.ready.add_done_callback(lambda _: self._worker_ready(worker))
        worker.watchdog = asyncio.get_running_loop().create_task(self._watch(worker), name=f"watchdog-{index}")
        return worker

    async def _until_all_ready(self) -> None:
        waiting = {asyncio.ensure_future(w.ready) for w in self.workers}
        gone = {asyncio.ensure_future(w.gone) for w in self.workers}
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                while waiting and not stop.done():
                    done, _ = await asyncio.wait(waiting | gone | {stop}, return_when=asyncio.FIRST_COMPLETED)
                    if done & gone:  # before the proxy ever served: a restart would meet the same fate
                        worker = next(w for w in self.workers if w.gone.done())
                        status = await self._reap(worker)
                        self._fail(f"{worker} ended before it served (exit status {status}); stopping the proxy")
                        return
                    waiting -= done
        except TimeoutError:
            self._fail(f"a worker did not serve its listeners within {READY_TIMEOUT:g}s")
        finally:
            stop.cancel()

    # supervision ----------------------------------------------------------------------
    async def _watch(self, worker: WorkerProcess) -> None:
        """Ping `worker` while it lives: a miss makes /ready 503, KILL_AFTER seconds of them kill it."""
        with contextlib.suppress(asyncio.CancelledError):
            await worker.ready
        silent_since: float | None = None
        loop = asyncio.get_running_loop()
        while not worker.gone.done():
            try:
                worker.counters = await worker.request("ping", PING_DEADLINE)
            except ChannelClosed:
                return
            except TimeoutError:
                now = loop.time()
                if silent_since is None:
                    silent_since = now - PING_DEADLINE
                    log.warning("%s has not answered for %gs: /ready answers 503 until it does", worker,
                                PING_DEADLINE)
                worker.missed += 1
                self.counters[MISS_STAT] += 1
                if now - silent_since >= KILL_AFTER:
                    log.error("%s has not answered for %.0fs: killing it", worker, now - silent_since)
                    worker.proc.kill()
                    return
                continue
            if worker.missed:
                log.info("%s answers again after %d missed pings", worker, worker.missed)
                worker.missed, silent_since = 0, None
            await asyncio.sleep(PING_INTERVAL)

    async def _supervise(self) -> None:
        """Until stopped: replace every worker that dies, or give up on a crash loop."""
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            while not self.stopping.is_set() and self.failure is None:
                alive = [w.gone for w in self.workers if not w.gone.done()]  # (futures of ours: never cancelled)
                await asyncio.wait([stop, *alive], return_when=asyncio.FIRST_COMPLETED)
                for worker in [w for w in self.workers if w.gone.done()]:
                    await self._replace(worker, stop)
                    if self.failure is not None or self.stopping.is_set():
                        break
        finally:
            stop.cancel()

    async def _replace(self, worker: WorkerProcess, stop: asyncio.Future) -> None:
        status = await self._reap(worker)
        self.retired.update({name: value for name, value in worker.counters.items() if not is_gauge(name)})
        worker.counters = {}
        if self.stopping.is_set():
            # exit status 0: it drained and exited, as when the SIGTERM went to the whole process group
            log.log(logging.INFO if status == 0 else logging.ERROR,
                    "%s ended on its own (exit status %s) while the proxy stops: not replaced", worker, status)
            self.workers.remove(worker)
            return
        delay = self.restarts.after_death(asyncio.get_running_loop().time())
        if delay is None:
            self._fail(f"{worker} ended on its own (exit status {status}), the {len(self.restarts.deaths)}th "
                       f"death of a worker within {self.restarts.window:g}s: a crash loop; stopping the proxy")
            self.workers.remove(worker)
            return
        log.error("%s ended on its own (exit status %s); starting it again in %gs", worker, status, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stop), delay)
        if self.stopping.is_set():
            self.workers.remove(worker)
            return
        try:
            replacement = await self._spawn(worker.index, worker.generation + 1)
        except StartupError as exc:  # its sockets or its process: counted as another death next round
            log.error("%s", exc)
            self.workers.remove(worker)
            return
        self.workers[self.workers.index(worker)] = replacement
        self.counters[RESTARTS_STAT] += 1
        log.info("worker %d started again: pid %d", worker.index, replacement.proc.pid)

    async def _reap(self, worker: WorkerProcess) -> int:
        """The exit status of a worker whose channel closed (killed if it lingers)."""
        if worker.watchdog is not None:
            worker.watchdog.cancel()
        try:
            async with asyncio.timeout(EXIT_WAIT):
                return await worker.exit_status()
        except TimeoutError:  # it closed the channel but goes on: it is not ours any more
            worker.proc.kill()
            return await worker.exit_status()

    def _fail(self, reason: str) -> None:
        """Stop the proxy for `reason`: run() raises WorkerFailed, which the command logs once, at exit 1."""
        if self.failure is None:
            self.failure = reason
        self.draining = True

    async def _stop_workers(self) -> None:
        for worker in self.workers:
            if worker.watchdog is not None:
                worker.watchdog.cancel()
            worker.send({"op": self.stop_op})
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


async def _spawn(config: Config, index: int, generation: int, count: int, share: list[Bound]) -> WorkerProcess:
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
    worker = WorkerProcess(index, generation, proc)
    await worker.connect(ours)
    worker.send({"op": "start", "index": index, "generation": generation, "count": count, "config": config.to_dict(),
                 "listeners": [[bound.listener, bound.sock.fileno()] for bound in share]})
    return worker
