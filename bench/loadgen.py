"""The load generator: one process in the pod namespace, the "app" of the pod.

Standalone on purpose (stdlib and uvloop only, run by path): it runs as root,
not as the proxy's UID, so every connection it opens to a service address is
redirected to whatever listens on the redirected port (or, for `direct`, goes
straight to the app server when no rule is installed).

    python loadgen.py '{"kind": "bulk_up", "host": "198.51.100.10", "conns": 8, "seconds": 3}'

prints one JSON object on its last stdout line. Every loop is bounded in time
(`seconds`) and in count (`max_ops`); a connection that fails is counted in
`errors`, never retried.

Kinds (ports as in appserver.py):

    bulk_up     conns x (write zeros for `seconds`, wait for the sink's acknowledgement)
    bulk_down   conns x (ask for `seconds` of zeros, read to EOF)
    rr_latency  one connection, 64-byte ping-pongs, blocking socket; p50/p99
    rr_rate     conns connections, each 64-byte ping-pongs back to back
    conn_rate   conns workers, each: connect, 64 B, read 64 B, close, again
    connect_latency  sequential connections to each of `targets` in turn;
                connect() time and first echo time, per target
    idle        print "started", wait for a line on stdin, open `conns`
                connections (one 1-byte echo each), print "ready N", hold
                them until another line on stdin, close, report
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import struct
import sys
import time

SINK, SOURCE, ECHO = 9001, 9002, 9003
CHUNK = bytes(256 * 1024)
ACK_UNIT = 4 << 20  # the sink acknowledges every 4 MiB (a multiple of CHUNK)
MSG = b"x" * 64
_U64 = struct.Struct("!Q")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


# --- bulk ---------------------------------------------------------------------------

class BulkUp(asyncio.Protocol):
    """Writes whole ACK_UNITs of zeros until the deadline, then waits until the
    sink has acknowledged every byte (see appserver.py), then closes."""

    def __init__(self, deadline: float, done: asyncio.Future) -> None:
        self.deadline, self.done = deadline, done
        self.paused = False
        self.sent = self.acked = 0
        self.finished = False  # no more writes
        self.reply = b""

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=1 << 20)
        self.loop = asyncio.get_running_loop()
        self._pump()

    def _pump(self) -> None:
        transport = self.transport
        while not self.paused and not self.finished and not transport.is_closing():
            if self.sent % ACK_UNIT == 0 and time.monotonic() >= self.deadline:
                self.finished = True
                self._check()
                return
            transport.write(CHUNK)
            self.sent += len(CHUNK)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.loop.call_soon(self._pump)

    def data_received(self, data: bytes) -> None:
        self.reply += data
        if len(self.reply) >= 8:
            whole = len(self.reply) - len(self.reply) % 8
            self.acked = _U64.unpack_from(self.reply, whole - 8)[0]
            self.reply = self.reply[whole:]
            self._check()

    def _check(self) -> None:
        if self.finished and self.acked >= self.sent and not self.done.done():
            self.done.set_result(self.acked)
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            unacked = self.sent - self.acked
            self.done.set_exception(exc or ConnectionError(f"closed with {unacked} bytes unacknowledged"))


class BulkDown(asyncio.Protocol):
    def __init__(self, ms: int, done: asyncio.Future) -> None:
        self.ms, self.done = ms, done
        self.count = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(_U64.pack(self.ms))

    def data_received(self, data: bytes) -> None:
        self.count += len(data)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(self.count)
            else:
                self.done.set_exception(exc)


async def bulk(spec: dict) -> dict:
    loop = asyncio.get_running_loop()
    up = spec["kind"] == "bulk_up"
    seconds = spec["seconds"]
    start = time.monotonic()
    deadline = start + seconds
    futures, opening = [], []  # (the tasks are kept: the loop holds only weak references to them)
    for _ in range(spec["conns"]):
        done = loop.create_future()
        factory = (lambda d=done: BulkUp(deadline, d)) if up else (lambda d=done: BulkDown(int(seconds * 1000), d))
        futures.append(done)
        opening.append(loop.create_task(_open(loop, factory, spec["host"], SINK if up else SOURCE, done)))
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), seconds + 30)
    elapsed = time.monotonic() - start
    total = sum(r for r in results if isinstance(r, int))
    errors = sum(1 for r in results if not isinstance(r, int))
    return {"bytes": total, "seconds": elapsed, "mb_per_s": total / elapsed / 1e6, "errors": errors,
            "error_sample": [repr(r) for r in results if not isinstance(r, int)][:3]}


async def _open(loop, factory, host: str, port: int, done: asyncio.Future) -> None:
    try:
        await loop.create_connection(factory, host, port)
    except OSError as exc:
        if not done.done():
            done.set_exception(exc)


# --- request/response ---------------------------------------------------------------

def rr_latency(spec: dict) -> dict:
    """One connection, blocking socket: the least client overhead per round trip."""
    sock = socket.create_connection((spec["host"], ECHO), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples: list[int] = []
    clock = time.perf_counter_ns
    deadline = time.monotonic() + spec["seconds"]
    warmup = spec.get("warmup", 200)
    try:
        for i in range(spec["max_ops"] + warmup):
            t0 = clock()
            sock.sendall(MSG)
            got = 0
            while got < 64:
                chunk = sock.recv(64 - got)
                if not chunk:
                    raise ConnectionError("echo closed")
                got += len(chunk)
            if i >= warmup:
                samples.append(clock() - t0)
                if time.monotonic() >= deadline:
                    break
    finally:
        sock.close()
    samples.sort()
    us = [s / 1000 for s in samples]
    return {"count": len(us), "p50_us": percentile(us, 0.5), "p99_us": percentile(us, 0.99),
            "mean_us": sum(us) / len(us), "errors": 0}


class PingPong(asyncio.Protocol):
    """Back-to-back 64-byte round trips on one connection, pure callbacks."""

    def __init__(self, state: dict) -> None:
        self.state = state
        self.got = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(MSG)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        while self.got >= 64:
            self.got -= 64
            state = self.state
            if state["stop"]:
                self.transport.close()
                return
            state["count"] += 1
            self.transport.write(MSG)

    def connection_lost(self, exc) -> None:
        if exc is not None:
            self.state["errors"] += 1
        self.state["open"] -= 1
        if self.state["open"] == 0 and not self.state["closed"].done():
            self.state["closed"].set_result(None)


async def rr_rate(spec: dict) -> dict:
    loop = asyncio.get_running_loop()
    state = {"count": 0, "errors": 0, "stop": False, "open": 0, "closed": loop.create_future()}
    transports = []
    for _ in range(spec["conns"]):
        try:
            tr, _ = await loop.create_connection(lambda: PingPong(state), spec["host"], ECHO)
            state["open"] += 1
            transports.append(tr)
        except OSError:
            state["errors"] += 1
    # count only once every connection is up
    state["count"] = 0
    start = time.monotonic()
    while time.monotonic() - start < spec["seconds"] and state["count"] < spec["max_ops"]:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # a look every 50 ms at a counter the protocols bump
    count, elapsed = state["count"], time.monotonic() - start
    state["stop"] = True
    if state["open"]:
        try:
            await asyncio.wait_for(state["closed"], 10)
        except TimeoutError:
            for tr in transports:
                tr.abort()
    return {"count": count, "seconds": elapsed, "rps": count / elapsed, "errors": state["errors"]}


# --- connection set-up (rule scaling) -----------------------------------------------

def connect_latency(spec: dict) -> dict:
    """Sequential connections to each target in turn, blocking sockets: the time
    connect() takes (the SYN's way through the nat rules, and the handshake) and
    the time until a 64-byte echo came back through the relay."""
    targets = [tuple(t) for t in spec["targets"]]
    connect_ns: dict[tuple, list[int]] = {t: [] for t in targets}
    echo_ns: dict[tuple, list[int]] = {t: [] for t in targets}
    errors = 0
    clock = time.perf_counter_ns
    deadline = time.monotonic() + spec["seconds"]
    for i in range(spec["samples"] * len(targets)):
        if time.monotonic() >= deadline:
            break
        target = targets[i % len(targets)]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = clock()
            sock.connect(target)
            t1 = clock()
            sock.sendall(MSG)
            got = 0
            while got < 64:
                chunk = sock.recv(64 - got)
                if not chunk:
                    raise ConnectionError("closed")
                got += len(chunk)
            t2 = clock()
        except (OSError, ConnectionError):
            errors += 1
            continue
        finally:
            sock.close()
        connect_ns[target].append(t1 - t0)
        echo_ns[target].append(t2 - t0)
    out = {}
    for t in targets:
        c = sorted(x / 1000 for x in connect_ns[t])
        e = sorted(x / 1000 for x in echo_ns[t])
        out[f"{t[0]}:{t[1]}"] = {"count": len(c), "connect_p50_us": percentile(c, 0.5),
                                 "connect_p99_us": percentile(c, 0.99), "echo_p50_us": percentile(e, 0.5),
                                 "echo_p99_us": percentile(e, 0.99)}
    return {"targets": out, "errors": errors}


# --- connection rate ------------------------------------------------------------------

class OneShot(asyncio.Protocol):
    def __init__(self, done: asyncio.Future) -> None:
        self.done = done
        self.got = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(MSG)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= 64:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            if exc is None and self.got >= 64:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc or ConnectionError(f"short reply ({self.got} bytes)"))


async def conn_rate(spec: dict) -> dict:
    loop = asyncio.get_running_loop()
    host, seconds, max_ops = spec["host"], spec["seconds"], spec["max_ops"]
    state = {"count": 0, "errors": 0, "sample": []}
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < deadline and state["count"] + state["errors"] < max_ops:
            done = loop.create_future()
            t0 = time.perf_counter()
            try:
                await loop.create_connection(lambda d=done: OneShot(d), host, ECHO)
                await asyncio.wait_for(done, 10)
            except (OSError, TimeoutError, ConnectionError) as exc:
                state["errors"] += 1
                if len(state["sample"]) < 3:
                    state["sample"].append(repr(exc))
                await asyncio.sleep(0.01)
                continue
            latencies.append(time.perf_counter() - t0)
            state["count"] += 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(spec["conns"])))
    elapsed = time.monotonic() - start
    latencies.sort()
    return {"count": state["count"], "seconds": elapsed, "cps": state["count"] / elapsed,
            "errors": state["errors"], "error_sample": state["sample"],
            "p50_ms": percentile(latencies, 0.5) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000}


# --- idle concurrency -----------------------------------------------------------------

class Holder(asyncio.Protocol):
    def __init__(self, ready: asyncio.Future) -> None:
        self.ready = ready

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(b"i")

    def data_received(self, data: bytes) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def connection_lost(self, exc) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("closed before the echo"))


async def idle(spec: dict) -> dict:
    """Open, prove each connection is relayed (1-byte echo), hold, report."""
    loop = asyncio.get_running_loop()
    transports, errors = [], 0
    sem = asyncio.Semaphore(spec.get("parallel", 200))
    deadline = float("inf")

    async def one() -> None:
        nonlocal errors
        async with sem:
            if time.monotonic() > deadline:
                errors += 1
                return
            ready = loop.create_future()
            try:
                tr, _ = await loop.create_connection(lambda: Holder(ready), spec["host"], ECHO)
                await asyncio.wait_for(ready, 10)
            except (OSError, TimeoutError, ConnectionError):
                errors += 1
                return
            transports.append(tr)

    print("started", flush=True)  # the parent reads the relay's memory before we open any
    await loop.run_in_executor(None, sys.stdin.readline)
    start = time.monotonic()
    deadline = start + spec["seconds"]
    await asyncio.gather(*(one() for _ in range(spec["conns"])))
    opened = time.monotonic() - start
    print(f"ready {len(transports)}", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    for tr in transports:
        tr.close()
    await asyncio.sleep(0.2)
    return {"count": len(transports), "errors": errors, "open_seconds": opened}


async def run_async(spec: dict) -> dict:
    kind = spec["kind"]
    if kind in ("bulk_up", "bulk_down"):
        return await bulk(spec)
    if kind == "rr_rate":
        return await rr_rate(spec)
    if kind == "conn_rate":
        return await conn_rate(spec)
    if kind == "idle":
        return await idle(spec)
    raise SystemExit(f"loadgen: unknown kind {kind!r}")


def main() -> None:
    spec = json.loads(sys.argv[1])
    spec.setdefault("max_ops", 10_000_000)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if spec["kind"] == "rr_latency":
        result = rr_latency(spec)
    elif spec["kind"] == "connect_latency":
        result = connect_latency(spec)
    else:
        import uvloop
        result = uvloop.run(run_async(spec))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
