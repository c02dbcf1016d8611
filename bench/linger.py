"""What the reset on a worker's death costs (`python -m bench --parts linger`).

Issue 12 asked that a dead worker's clients see a reset, not a clean FIN,
and that the cost of the mechanism be measured here. The mechanism
(datapath/relay.py, control/sockets.py): SO_LINGER 0 on every relayed
socket while it relays, so the kernel resets both peers when the process
dies; the accepted socket inherits it from its listening socket (no call),
the upstream socket gets one setsockopt, and a graceful close turns it off
on both (two more). Three system calls a connection, nothing per byte.

Measured side by side on the workload it can cost most on, short
connections (conn-32: 32 clients, connect, 64 B each way, close), through
one proxy process behind the UID rule, as the matrix runs it (5 chains,
stats, access log to a file):

    on    the proxy as shipped
    off   the same code with the three calls made no-ops (monkeypatched at
          start: `arm_reset`/`disarm_reset` in relay.py and sockets.py)

Runs alternate (on, off, off, on, ...), each with a fresh proxy; the report
gives the medians of conn/s and of the proxy's CPU per connection, and the
median of the per-pair ratios (each `off` run against the `on` run beside
it), which cancels most of the drift a shared machine adds.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable

from proxy.demo.sandbox import ProxyProcess

from . import procstat
from .runner import run_loadgen
from .subjects import PRLIMIT, proxy_config
from .world import PYTHON, SERVICE, BenchWorld

# The proxy's command line, with SO_LINGER's calls made no-ops for `off`.
LAUNCH = """
import sys
if sys.argv[1] == "off":
    from proxy.control import sockets
    from proxy.datapath import relay
    relay.arm_reset = relay.disarm_reset = sockets.arm_reset = lambda sock: None
from proxy.cli import main
sys.exit(main(sys.argv[2:]))
"""
CLIENTS = 32


def one_run(world: BenchWorld, variant: str, seconds: float) -> dict:
    workdir = world.private_dir(f"linger-{variant}")
    config = os.path.join(workdir, "proxy.yaml")
    with open(config, "w") as f:
        json.dump(proxy_config(os.path.join(workdir, "access.log")), f)  # JSON is YAML
    os.chmod(config, 0o644)
    proxy = ProxyProcess(world.pod, prefix=PRLIMIT, command=(
        PYTHON, "-c", LAUNCH, variant, "run", "--config", config, "--log-format", "json", "--drain-timeout", "1s"))
    world.procs.adopt(proxy.proc)
    try:
        cpu0 = procstat.cpu_seconds(proxy.pid)
        raw = run_loadgen(world, {"kind": "conn_rate", "host": SERVICE, "conns": CLIENTS, "seconds": seconds,
                                  "max_ops": 200_000}, timeout=seconds + 90)  # (to the ECHO port)
        cpu = procstat.cpu_seconds(proxy.pid) - cpu0
    finally:
        proxy.stop(verbose=False)
    return {"variant": variant, "cps": raw["cps"], "count": raw["count"], "errors": raw.get("errors", 0),
            "cpu_us_per_conn": cpu / raw["count"] * 1e6 if raw["count"] else None}


def run_linger(pairs: int, seconds: float, log: Callable[[str], None]) -> dict:
    world = BenchWorld()
    runs: list[dict] = []
    try:
        world.set_rules("uid")
        for i in range(pairs):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for variant in order:
                runs.append({"pair": i, **one_run(world, variant, seconds)})
                r = runs[-1]
                log(f"pair {i + 1}/{pairs} {variant:>3}: {r['cps']:,.0f} conn/s, "
                    f"{r['cpu_us_per_conn']:.0f} µs CPU per connection, {r['errors']} errors")
    finally:
        world.close()
    return summarise(runs, seconds)


def summarise(runs: list[dict], seconds: float) -> dict:
    by = {v: [r for r in runs if r["variant"] == v] for v in ("on", "off")}
    pairs = sorted({r["pair"] for r in runs})
    ratio_cps, ratio_cpu = [], []
    for p in pairs:
        on = next(r for r in runs if r["pair"] == p and r["variant"] == "on")
        off = next(r for r in runs if r["pair"] == p and r["variant"] == "off")
        ratio_cps.append(on["cps"] / off["cps"])
        ratio_cpu.append(on["cpu_us_per_conn"] / off["cpu_us_per_conn"])
    med = {v: {"cps": statistics.median(r["cps"] for r in rs),
               "cpu_us_per_conn": statistics.median(r["cpu_us_per_conn"] for r in rs),
               "cps_range": [min(r["cps"] for r in rs), max(r["cps"] for r in rs)],
               "cpu_range": [min(r["cpu_us_per_conn"] for r in rs), max(r["cpu_us_per_conn"] for r in rs)]}
           for v, rs in by.items()}
    return {"seconds": seconds, "clients": CLIENTS, "pairs": len(pairs), "runs": runs, "median": med,
            "ratio_on_over_off": {"cps": statistics.median(ratio_cps), "cpu_us_per_conn": statistics.median(ratio_cpu),
                                  "cps_range": [min(ratio_cps), max(ratio_cps)],
                                  "cpu_range": [min(ratio_cpu), max(ratio_cpu)]}}


def markdown(doc: dict) -> str:
    m, r = doc["median"], doc["ratio_on_over_off"]
    return "\n".join([
        "# What SO_LINGER 0 while relaying costs (the reset on a worker's death)\n",
        f"`{doc['command']}`, {doc['started']}; conn-32 ({doc['clients']} clients: connect, 64 B each way, close), "
        f"{doc['seconds']:g} s per run, {doc['pairs']} pairs of runs, alternating, each with a fresh proxy "
        "(one process, 5 chains, stats, access log to a file).\n",
        "| | conn/s (median; range) | proxy CPU µs per connection (median; range) |",
        "|---|---:|---:|",
        f"| on (as shipped) | {m['on']['cps']:,.0f} ({m['on']['cps_range'][0]:,.0f}-{m['on']['cps_range'][1]:,.0f}) "
        f"| {m['on']['cpu_us_per_conn']:.0f} ({m['on']['cpu_range'][0]:.0f}-{m['on']['cpu_range'][1]:.0f}) |",
        f"| off (three calls made no-ops) | {m['off']['cps']:,.0f} ({m['off']['cps_range'][0]:,.0f}-"
        f"{m['off']['cps_range'][1]:,.0f}) | {m['off']['cpu_us_per_conn']:.0f} ({m['off']['cpu_range'][0]:.0f}-"
        f"{m['off']['cpu_range'][1]:.0f}) |",
        f"| on / off, median of the pairs (range) | x{r['cps']:.3f} ({r['cps_range'][0]:.2f}-{r['cps_range'][1]:.2f}) "
        f"| x{r['cpu_us_per_conn']:.3f} ({r['cpu_range'][0]:.2f}-{r['cpu_range'][1]:.2f}) |",
        ""])


def main(out: str, pairs: int, seconds: float, log: Callable[[str], None], command: str) -> int:
    import datetime
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    log(f"linger: {pairs} pairs of conn-32 runs, SO_LINGER on and off; results in {out}")
    t0 = time.monotonic()
    doc = run_linger(pairs, seconds, log)
    doc.update(started=started, command=command, duration_s=round(time.monotonic() - t0, 1))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "linger.json"), "w") as f:
        json.dump(doc, f, indent=1)
    md = markdown(doc)
    with open(os.path.join(out, "linger.md"), "w") as f:
        f.write(md)
    print(md)
    return 0
