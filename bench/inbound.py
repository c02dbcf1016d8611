"""Inbound: REDIRECT against TPROXY, the cost of keeping the client's address.

    sudo VENV/bin/python -m bench.inbound [--reps N] [--quick] [--out DIR]

The other direction of the main benchmark: the load generator (loadgen.py)
runs in the remote namespace as the client, the app server (appserver.py) in
the pod, and every connection goes to the pod IP (192.0.2.1). Three modes:

* `direct`: no rule, no proxy (the physical limit);
* `redirect`: `redirect.sh --method uid` and the proxy as it runs by default
  (UID 1337, no capability); the app sees the pod's address;
* `tproxy`: `redirect.sh --method uid --inbound-mode tproxy` and the proxy
  with `inbound_mode: tproxy` and CAP_NET_ADMIN; the app sees the client's.

Workloads (loadgen.py's, sized as in workloads.py): connection rate
(`conn-32`: conn/s and the proxy's CPU per 1,000 connections), one
connection's 64-byte ping-pong (`rr-1`: p50, p99) and bulk both ways over one
connection (`bulk-up-1`, `bulk-down-1`: MB/s and CPU per GB).

The machine is shared and noisy, so the modes of one repetition run back to
back, in an order rotated per repetition, each with a fresh proxy; the
report gives medians over the repetitions and the ratio tproxy / redirect
per repetition, then its median. Results: OUT/inbound.json (every
measurement) and OUT/inbound.md (the table), also printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from proxy.demo.netns import PodWorld
from proxy.demo.sandbox import ProxyProcess

from . import procstat
from .runner import LOADGEN, MeasurementError, metrics
from .subjects import PRLIMIT
from .workloads import Workload, workloads
from .world import HERE, IPTABLES, POD_CONNTRACK_SYSCTLS, POD_SYSCTLS, PYTHON, BenchWorld, signals_raise

MODES = ("direct", "redirect", "tproxy")
WORKLOADS = ("conn-32", "rr-1", "bulk-up-1", "bulk-down-1")


@dataclass(frozen=True)
class Mode:
    """What runs.metrics needs of a subject: its name and whether a relay is measured."""

    name: str

    @property
    def kind(self) -> str:
        return "direct" if self.name == "direct" else "proxy"


class InboundWorld(BenchWorld):
    """The bench world turned around: the app server in the pod, the client outside."""

    def _start_server(self) -> None:
        for key, value in POD_SYSCTLS:  # the client makes the short connections now
            self.remote.exec("sysctl", "-q", "-w", f"{key}={value}")
        self.server = self.procs.popen(self.pod.argv(PYTHON, str(HERE / "appserver.py")),
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, cwd="/")
        line = self.server.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the app server did not start (exit {self.server.poll()})")

    def set_mode(self, mode: str) -> None:
        """The rules of `mode` (none for direct), replacing the previous mode's."""
        if mode == self.rules:
            return
        self.cleanup_sh()
        self.rules = None
        if mode == "direct":
            return
        extra = ("--inbound-mode", "tproxy") if mode == "tproxy" else ()
        self.pod.exec("sh", str(IPTABLES / "redirect.sh"), "--method", "uid", "--ipv6", "off", *extra)
        self.rules = mode
        for key, value in POD_CONNTRACK_SYSCTLS:
            self.pod.exec("sysctl", "-q", "-w", f"{key}={value}", check=False)


def start_proxy(world: InboundWorld, mode: str) -> ProxyProcess | None:
    if mode == "direct":
        return None
    config = {"access_log": "off"}
    caps: tuple[str, ...] = ()
    if mode == "tproxy":
        config["inbound_mode"] = "tproxy"
        caps = ("net_admin",)
    proxy = ProxyProcess(world.pod, config=config, caps=caps, prefix=PRLIMIT)
    world.procs.adopt(proxy.proc)
    return proxy


# the rule each mode's connections must pass (counted), by its comment
PATH_RULE = {"redirect": ("nat", "inbound to proxy port 5001"),
             "tproxy": ("mangle", "inbound to proxy port 5001, tproxy")}


def path_packets(world: InboundWorld, mode: str) -> int:
    """Packets counted so far by the rule that takes `mode`'s connections to the proxy."""
    table, comment = PATH_RULE[mode]
    out = world.pod.exec("iptables-save", "-c", "-t", table).stdout
    return sum(int(line[1:].split(":")[0]) for line in out.splitlines()
               if line.endswith(f'--comment "sidecar-proxy: {comment}" -j TPROXY --on-port 5001 --on-ip 0.0.0.0 '
                                '--tproxy-mark 0x539/0xffffffff') or f'"sidecar-proxy: {comment}" -j REDIRECT' in line)


def measure(world: InboundWorld, mode: str, workload: Workload) -> dict:
    """One workload against a fresh proxy in `mode`: its metrics and raw numbers. A run
    whose connections did not pass the mode's rule (counted) is a failure."""
    world.set_mode(mode)
    before = path_packets(world, mode) if mode != "direct" else 0
    proxy = start_proxy(world, mode)
    try:
        cpu0 = procstat.cpu_seconds(proxy.pid) if proxy else 0.0
        spec = workload.spec(PodWorld.POD_V4)
        proc = subprocess.run(world.remote.argv(PYTHON, LOADGEN, json.dumps(spec)), capture_output=True, text=True,
                              timeout=workload.seconds + 90, cwd="/", check=False)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise MeasurementError(f"loadgen {spec['kind']} exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
        raw = json.loads(lines[-1])
        if proxy is not None:
            time.sleep(0.1)
            raw["cpu_s"] = procstat.cpu_seconds(proxy.pid) - cpu0
            if not proxy.alive():
                raise MeasurementError(f"the proxy died during {workload.name}")
    finally:
        if proxy is not None:
            proxy.stop(verbose=False)
    if mode != "direct" and path_packets(world, mode) <= before:
        raise MeasurementError(f"{mode}: no packet passed the rule {PATH_RULE[mode][1]!r}")
    return {"metrics": metrics(workload, raw, Mode(mode)), "raw": raw, "errors": raw.get("errors", 0)}


def run(reps: int, quick: bool) -> dict:
    loads = [w for w in workloads(quick) if w.name in WORKLOADS]
    runs: list[dict] = []
    failures: list[str] = []
    world = InboundWorld()
    try:
        for rep in range(reps):
            for workload in loads:
                order = MODES[rep % len(MODES):] + MODES[:rep % len(MODES)]
                for mode in order:
                    print(f"bench.inbound: rep {rep + 1}/{reps} {workload.name} {mode}", file=sys.stderr, flush=True)
                    try:
                        result = measure(world, mode, workload)
                    except (MeasurementError, OSError, subprocess.SubprocessError, AssertionError,
                            ValueError) as exc:
                        failures.append(f"rep {rep + 1} {workload.name} {mode}: {exc}")
                        continue
                    runs.append({"rep": rep, "workload": workload.name, "mode": mode, **result})
    finally:
        world.close()
    return {"runs": runs, "failures": failures, "workloads": [w.name for w in loads],
            "metrics": {w.name: [[m.key, m.label, m.better] for m in w.metrics] for w in loads},
            "reps": reps, "quick": quick}


def summarise(doc: dict) -> dict:
    """Medians per workload, mode and metric; the median over repetitions of tproxy / redirect."""
    out: dict = {}
    for name in doc["workloads"]:
        for key, _, _ in doc["metrics"][name]:
            row: dict = {}
            for mode in MODES:
                values = [r["metrics"][key] for r in doc["runs"]
                          if r["workload"] == name and r["mode"] == mode and r["metrics"][key] is not None]
                row[mode] = statistics.median(values) if values else None
            ratios = []
            for rep in range(doc["reps"]):
                pair = {r["mode"]: r["metrics"][key] for r in doc["runs"]
                        if r["workload"] == name and r["rep"] == rep and r["mode"] in ("redirect", "tproxy")}
                if pair.get("redirect") and pair.get("tproxy"):
                    ratios.append(pair["tproxy"] / pair["redirect"])
            row["ratio"] = statistics.median(ratios) if ratios else None
            row["ratio_range"] = [min(ratios), max(ratios)] if ratios else None
            out[f"{name} {key}"] = row
    return out


def markdown(doc: dict) -> str:
    lines = ["| workload | metric | direct | redirect | tproxy | tproxy / redirect | its range |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name in doc["workloads"]:
        for key, label, better in doc["metrics"][name]:
            row = doc["summary"][f"{name} {key}"]
            arrow = "↑" if better == "higher" else "↓"
            cells = [_fmt(row[m]) for m in MODES]
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
            spread = "-" if row["ratio_range"] is None else "{:.2f}-{:.2f}".format(*row["ratio_range"])
            lines.append(f"| {name} | {label} {arrow} | {' | '.join(cells)} | {ratio} | {spread} |")
    text = "\n".join(lines) + "\n"
    if doc["failures"]:
        text += "\nFailures:\n" + "\n".join(f"- {f}" for f in doc["failures"]) + "\n"
    return text


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.inbound", description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    p.add_argument("--quick", action="store_true", help="short workloads (a smoke run)")
    p.add_argument("--out", default=str(HERE / "results"), help="where inbound.json and inbound.md go")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (network namespaces, iptables)")
    if not 1 <= args.reps <= 50:
        p.error(f"--reps: {args.reps} is not 1-50")
    with signals_raise():
        doc = run(args.reps, args.quick)
    doc["summary"] = summarise(doc)
    doc["command"] = "python -m bench.inbound" + (f" --reps {args.reps}" if args.reps != 5 else "") + \
        (" --quick" if args.quick else "")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "inbound.json"), "w") as f:
        json.dump(doc, f, indent=1)
    text = markdown(doc)
    with open(os.path.join(args.out, "inbound.md"), "w") as f:
        f.write(f"# Inbound: REDIRECT against TPROXY\n\n`{doc['command']}`\n\n{text}")
    print(text)
    return 1 if doc["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
