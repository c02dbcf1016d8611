"""One measurement: a subject started fresh, one workload against it, its numbers.

The load generator (loadgen.py) runs as its own process in the pod namespace,
as root: not UID 1337, so its connections are redirected to the subject. The
subject's CPU time is read from /proc around the workload; for the idle
workload, its memory before and after the connections are opened.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time

from . import procstat
from .subjects import Running, Subject
from .workloads import Workload
from .world import HERE, PYTHON, SERVICE, BenchWorld, stop_process

LOADGEN = str(HERE / "loadgen.py")


class MeasurementError(RuntimeError):
    pass


# What a failed measurement raises (a subject that does not start, a load
# generator that fails or hangs, output that does not parse): recorded, and the
# run goes on. ProxyProcess says "did not start" with an AssertionError.
FAILURES = (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError, AssertionError)


ALL_CPUS = frozenset(os.sched_getaffinity(0))
ONE_CPU = max(ALL_CPUS)


def loadgen_argv(world: BenchWorld, spec: dict, cpu: int | None = None) -> list[str]:
    pin = ("taskset", "-c", str(cpu)) if cpu is not None else ()
    return world.pod.argv(*pin, PYTHON, LOADGEN, json.dumps(spec))


def run_loadgen(world: BenchWorld, spec: dict, timeout: float, cpu: int | None = None) -> dict:
    proc = subprocess.run(loadgen_argv(world, spec, cpu), capture_output=True, text=True, timeout=timeout,
                          cwd="/", check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise MeasurementError(f"loadgen {spec['kind']} exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
    return json.loads(lines[-1])


def pin(pids: list[int], cpus: frozenset[int]) -> None:
    """Every thread of these processes onto `cpus`."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


def measure(world: BenchWorld, subject: Subject, workload: Workload) -> dict:
    """Run one workload against a fresh instance of one subject; the metrics, raw numbers and errors."""
    if workload.kind == "idle" and subject.kind == "direct":
        return {"metrics": {m.key: None for m in workload.metrics}, "raw": {"skipped": "no relay to measure"},
                "errors": 0}
    world.set_rules(subject.rules)
    running = subject.start(world, workload.port)
    try:
        if workload.one_cpu:
            pin([world.server.pid, *(running.pids() if running else [])], frozenset({ONE_CPU}))
        if workload.kind == "idle":
            raw = _idle(world, running, workload)
        else:
            raw = _timed(world, running, workload)
        if running is not None and not running.alive():
            raise MeasurementError(f"{subject.name} died during {workload.name}: {running.output()}")
    finally:
        if running is not None:
            running.stop()
        if workload.one_cpu:
            pin([world.server.pid], ALL_CPUS)
    if not world.server_alive():
        raise MeasurementError("the app server died")
    return {"metrics": metrics(workload, raw, subject), "raw": raw, "errors": raw.get("errors", 0)}


def _timed(world: BenchWorld, running: Running | None, workload: Workload) -> dict:
    spec = workload.spec(SERVICE)
    cpu0 = procstat.cpu_seconds(running.pid) if running else 0.0
    raw = run_loadgen(world, spec, timeout=workload.seconds + 90, cpu=ONE_CPU if workload.one_cpu else None)
    if running is not None:
        time.sleep(0.1)  # let per-connection processes (socat) end and be reaped
        raw["cpu_s"] = procstat.cpu_seconds(running.pid) - cpu0
    return raw


def _idle(world: BenchWorld, running: Running, workload: Workload) -> dict:
    spec = workload.spec(SERVICE)
    proc = world.procs.popen(loadgen_argv(world, spec), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        _expect(proc, "started", 15)
        time.sleep(0.2)
        before = procstat.memory_kib(running.pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        ready = _expect(proc, "ready", workload.seconds + 30)
        opened = int(ready.split()[1])
        time.sleep(0.5)  # let the relay settle (socat: the last forks)
        after = procstat.memory_kib(running.pid)
        proc.stdin.write("close\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=30)
        raw = json.loads(out.strip().splitlines()[-1])
    finally:
        stop_process(proc, timeout=5)
    raw.update(before=before, after=after, opened=opened)
    return raw


def _expect(proc: subprocess.Popen, word: str, timeout: float) -> str:
    """The loadgen's next stdout line, which must start with `word` (bounded wait)."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise MeasurementError(f"loadgen: no '{word}' within {timeout:g}s")
    finally:
        sel.close()
    line = proc.stdout.readline()
    if not line.startswith(word):
        raise MeasurementError(f"loadgen: expected '{word}', got {line!r}: {proc.stderr.read()[-400:]}")
    return line


def metrics(workload: Workload, raw: dict, subject: Subject) -> dict:
    """The workload's metrics from its raw numbers (None: not applicable to this subject)."""
    out: dict[str, float | None] = {}
    relay = subject.kind != "direct"
    for m in workload.metrics:
        if m.relay_only and not relay:
            out[m.key] = None
        elif m.key == "cpu_s_per_gb":
            out[m.key] = raw["cpu_s"] / (raw["bytes"] / 1e9) if raw["bytes"] else None
        elif m.key == "cpu_s_per_1000":
            out[m.key] = raw["cpu_s"] / (raw["count"] / 1000) if raw["count"] else None
        elif m.key == "kib_per_conn":
            out[m.key] = (raw["after"]["pss"] - raw["before"]["pss"]) / raw["opened"] if raw["opened"] else None
        elif m.key == "rss_kib_per_conn":
            out[m.key] = (raw["after"]["rss"] - raw["before"]["rss"]) / raw["opened"] if raw["opened"] else None
        else:
            out[m.key] = raw[m.key]
    for key, value in out.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            print(f"bench: {subject.name} {workload.name}: {key} = {value} (not a positive number)", file=sys.stderr)
            out[key] = None
    return out
