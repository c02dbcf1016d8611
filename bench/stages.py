"""Where one short connection's time goes inside the proxy, stage by stage.

    VENV/bin/python -m bench.stages [--connections N] [--rounds R] [--access-log on|off] [--out DIR]

No namespace, no rule, no root: one process on loopback runs the proxy's own
data path (a plain listener with its Relay, Connector, stats and access log,
as `proxy run` builds them) on uvloop, beside an echo backend and clients
shaped as the benchmark's conn-32: connect, 64 B, 64 B back, close, 16 at a
time. Each stage the data path goes through is timed with
time.perf_counter_ns around the protocol callback (or the call inside one)
that runs it; the time includes what the kernel does inside the call (on
loopback, a send delivers to the receiving socket within the sending call).

Every round runs the same connections three ways, in a rotated order:
`direct` (the clients to the backend, no proxy), `proxy` (through the proxy,
untimed) and `timed` (through the proxy, every stage timed). The first two
give the proxy's whole cost per connection (the process's CPU, proxy minus
direct); the third splits it. The timing costs something itself (a wrapper
call and two clock reads per timed call): the table shows the whole cost
timed and untimed, and a stage's figure includes its share of that cost.
The stages do not add up to the whole: the event loop's own work between
the callbacks (accept, epoll, the close() of each socket) is in no stage.
Medians over the rounds.

What it leaves out: the redirect. The listener has no original destination,
so SO_ORIGINAL_DST, the loop guard's check and chain selection among many
chains are not in it (`python -m bench --parts syscalls` measures the whole
redirected path beside Envoy). What it is for: seeing which stage a change
makes cheaper, to a microsecond or two, where a whole run's CPU per
connection moves by ten between two runs of the same code on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import uvloop

from proxy.config import Cluster, Config, Endpoint, plain_listener
from proxy.datapath import listener as listener_mod
from proxy.datapath import relay as relay_mod
from proxy.datapath import upstream as upstream_mod
from proxy.datapath.accesslog import AccessLog
from proxy.datapath.localaddrs import LocalAddresses
from proxy.datapath.stats import Stats

PAYLOAD = b"x" * 64
PARALLEL = 16
WARM_UP = 800

# (label, module, name): a stage is a call of `name` in `module` ("Class.method" or a
# function); two spaces of indent per level say which stage's time a stage is part of.
# A stage whose name the code no longer has is left out (an older or newer version).
STAGES: tuple[tuple[str, Any, str], ...] = (
    ("accept: Relay, limits", listener_mod, "Listener.protocol"),
    ("accepted: decide, chain, start the upstream", relay_mod, "Downstream.connection_made"),
    ("  the attempt (Connector._next)", upstream_mod, "Connector._next"),
    ("    socket, connect(), loop-guard key", upstream_mod, "open_socket"),
    ("      loop-guard key (getsockname)", upstream_mod, "OwnSockets.add"),
    ("    connect timer (Relay.attach)", relay_mod, "Relay.attach"),
    ("event loop: create_connection's steps", upstream_mod, "_Start.step"),
    ("upstream transport made", relay_mod, "Upstream.connection_made"),
    ("  SO_LINGER 0 armed", relay_mod, "arm_reset"),
    ("  confirmed: counted, client resumed", relay_mod, "Relay.confirm"),
    ("client's bytes", relay_mod, "Downstream.data_received"),
    ("upstream's bytes", relay_mod, "Upstream.data_received"),
    ("upstream's FIN", relay_mod, "Upstream.eof_received"),
    ("client's FIN: both ways done, close", relay_mod, "Downstream.eof_received"),
    ("  SO_LINGER 0 turned off", relay_mod, "disarm_reset"),
    ("sockets closed", relay_mod, "Side.connection_lost"),
    ("  ended: counters, access log", listener_mod, "Listener.ended"),
)


def _target(module: Any, name: str) -> tuple[Any, str, Any] | None:
    """(the object holding it, its attribute name, the function) or None if it is not there."""
    owner_name, _, attribute = name.rpartition(".")
    owner = getattr(module, owner_name, None) if owner_name else module
    if owner is None:
        return None
    found = owner.__dict__.get(attribute) if isinstance(owner, type) else getattr(owner, attribute, None)
    return None if found is None else (owner, attribute, found)


class Timer:
    """perf_counter_ns around every stage's call, summed per stage."""

    def __init__(self) -> None:
        self.ns: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._originals: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        """Wrap every stage that exists in this version of the code."""
        for label, module, name in STAGES:
            target = _target(module, name)
            if target is not None:
                owner, attribute, original = target
                self._originals.append((owner, attribute, original))
                setattr(owner, attribute, self._wrap(label, original))

    def uninstall(self) -> None:
        for where, name, original in reversed(self._originals):
            setattr(where, name, original)
        self._originals.clear()

    def _wrap(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        clock, ns, calls = time.perf_counter_ns, self.ns, self.calls

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return function(*args, **kwargs)
            finally:
                ns[label] += clock() - started
                calls[label] += 1
        return timed


class Echo(asyncio.Protocol):
    """The backend: answers the 64 bytes, then its FIN."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)
        self.transport.write_eof()

    def eof_received(self) -> bool:
        return True


class Client(asyncio.Protocol):
    """One conn-32 connection: 64 bytes out, read to the end, close."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(PAYLOAD)

    def eof_received(self) -> bool:
        self.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def connections(port: int, count: int) -> None:
    loop = asyncio.get_running_loop()

    async def one_client(n: int) -> None:
        for _ in range(n):
            done: asyncio.Future[None] = loop.create_future()
            await loop.create_connection(partial(Client, done), "127.0.0.1", port)
            await done

    share, extra = divmod(count, PARALLEL)
    await asyncio.gather(*(one_client(share + (i < extra)) for i in range(PARALLEL)))


async def measure(count: int, rounds: int, access_log: bool, log_dir: str) -> dict:
    loop = asyncio.get_running_loop()
    backend = await loop.create_server(Echo, "127.0.0.1", 0, backlog=1024)
    backend_port = backend.sockets[0].getsockname()[1]
    spec = plain_listener("stages", "127.0.0.1", 1, "backend")
    config = Config(access_log="off", splice="off", listeners=(spec,),
                    clusters=(Cluster("backend", (Endpoint("127.0.0.1", backend_port),)),))
    log = AccessLog(os.path.join(log_dir, "access.log") if access_log else "off", "json")
    shared = listener_mod.Shared(config, Stats(), log, LocalAddresses(), loop)
    front = listener_mod.Listener(shared, loop, spec)
    # looked up at each accept (the proxy hands create_server the bound method): so it can be timed
    server = await loop.create_server(lambda: front.protocol(), "127.0.0.1", 0, backlog=1024)
    proxy_port = server.sockets[0].getsockname()[1]
    timer = Timer()  # its wrappers are in place only while a `timed` way runs
    stages = [label for label, module, name in STAGES if _target(module, name) is not None]
    runs: list[dict] = []
    try:
        await connections(backend_port, WARM_UP)
        await connections(proxy_port, WARM_UP)
        for r in range(rounds):
            ways = ["direct", "proxy", "timed"]
            ways = ways[r % 3:] + ways[:r % 3]
            run: dict = {"round": r}
            for way in ways:
                timer.ns.clear()
                timer.calls.clear()
                if way == "timed":
                    timer.install()
                started = time.process_time()
                await connections(backend_port if way == "direct" else proxy_port, count)
                run[way] = (time.process_time() - started) / count * 1e6
                if way == "timed":
                    timer.uninstall()
                    run["stages"] = {label: timer.ns[label] / count / 1000 for label in stages}
                    run["calls"] = {label: timer.calls[label] / count for label in stages}
            runs.append(run)
    finally:
        timer.uninstall()
        server.close()
        backend.close()
        shared.close()
    return {"connections": count, "rounds": rounds, "access_log": access_log, "stages": stages, "runs": runs,
            "python": sys.version.split()[0], "uvloop": uvloop.__version__,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def summarise(doc: dict) -> dict:
    """Medians over the rounds: the whole cost, and each stage's time and calls per connection."""
    runs, median = doc["runs"], statistics.median
    return {
        "direct": median([r["direct"] for r in runs]),
        "proxy": median([r["proxy"] - r["direct"] for r in runs]),
        "timed": median([r["timed"] - r["direct"] for r in runs]),
        "stages": {s: median([r["stages"][s] for r in runs]) for s in doc["stages"]},
        "calls": {s: median([r["calls"][s] for r in runs]) for s in doc["stages"]},
    }


def markdown(doc: dict) -> str:
    s = summarise(doc)
    lines = [
        "# Where a short connection's time goes in the proxy, stage by stage",
        "",
        f"`python -m bench.stages`, {doc['when']}; Python {doc['python']}, uvloop {doc['uvloop']}; "
        f"{doc['rounds']} rounds of {doc['connections']:,} connections (connect, 64 B, 64 B back, close; "
        f"{PARALLEL} at a time) on loopback, one process; access log {'on' if doc['access_log'] else 'off'}. "
        "Medians over the rounds, µs per connection.",
        "",
        "| | µs per connection | calls per connection |",
        "|---|---:|---:|",
        f"| the process, no proxy (clients and backend: `direct`) | {s['direct']:.1f} | |",
        f"| **the proxy's whole cost** (through it, minus `direct`; untimed) | **{s['proxy']:.1f}** | |",
        f"| the same, every stage timed | {s['timed']:.1f} | |",
    ]
    for label in doc["stages"]:
        depth = (len(label) - len(label.lstrip(" "))) // 2
        name = ("&nbsp;&nbsp;" * depth) + ("of which: " if depth else "") + label.strip()
        lines.append(f"| {name} | {s['stages'][label]:.1f} | {s['calls'][label]:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=5000, help="connections per round and way (default 5000)")
    p.add_argument("--rounds", type=int, default=9, help="rounds (default 9)")
    p.add_argument("--access-log", choices=("on", "off"), default="on",
                   help="the proxy's access log, JSON to a file, as in the benchmark (default on)")
    p.add_argument("--out", help="also write stages.json and stages.md here")
    args = p.parse_args(argv)
    if args.connections < PARALLEL or args.rounds < 1:
        p.error(f"--connections must be at least {PARALLEL} and --rounds at least 1")
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as log_dir:
        doc = uvloop.run(measure(args.connections, args.rounds, args.access_log == "on", log_dir))
    text = markdown(doc)
    print(text, end="")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "stages.json"), "w") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.join(args.out, "stages.md"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
