"""What one short connection costs a relay: system calls by name, CPU, context switches.

`python -m bench --parts syscalls`. For each subject, started fresh:

1. a warm-up (a tenth of the connections: Envoy creates its ORIGINAL_DST
   host, the proxy its first objects) under `perf trace -s`, which names the
   system calls the subject makes;
2. N short connections (32 clients, each: connect, send 64 B, read 64 B,
   close, again; the conn-32 workload with a count instead of a duration),
   not traced: user and system CPU from /proc/PID/stat and context switches
   from /proc/PID/task/*/status, before and after;
3. N more, counted: `perf stat` on the `syscalls:sys_enter_<name>`
   tracepoint of each call named in 1 (and of ALWAYS, a relay's usual calls, in
   case perf trace missed them), and on `raw_syscalls:sys_enter` (every
   call: what 1 did not name shows as "other"), for the subject's processes
   and threads, enabled just before the connections and disabled just after
   (perf's control FIFO, acknowledged), so that start-up and clean-up are
   not in the counts.

Everything is divided by the connections made in that pass. Counting with
tracepoints (in-kernel counters, nothing is recorded) costs the subject
little and loses nothing; `strace -c -f` stops the process at every call
(ptrace) and changes what it measures, and `perf trace -s` records every
event and can lose some when the relay is busy, so it only names the calls.
The CPU figures come from the pass with no tracing at all. (Counting all of
the ~360 `sys_enter_*` tracepoints at once works too, but perf then takes
some 14 s to close them, for every measurement.)

What is measured is the relay's own processes: for the proxy with workers,
the supervisor and its workers; for Envoy, all its threads. For `direct`
(no relay), it is the app server: a uvloop server's accepted end of each
connection, what a relay pays on its downstream side at the least.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import time

from . import procstat
from .runner import MeasurementError, run_loadgen
from .subjects import Subject
from .workloads import ECHO
from .world import SERVICE, BenchWorld, stop_process

# Envoy, HAProxy and the proxy, each as one worker and (Envoy, the proxy) as two; the
# floor of the proxy's design (bench/floor.py).
SUBJECTS = ("direct", "proxy-uvloop", "proxy-uvloop-c2", "uvloop-floor", "envoy", "envoy-c2", "haproxy")
CLIENTS = 32
ENTER = "syscalls:sys_enter_"
TOTAL = "raw_syscalls:sys_enter"


def connections(quick: bool) -> int:
    return 300 if quick else 20_000


def perf_can_count() -> str | None:
    """None if `perf stat` counts system-call tracepoints here, else why not."""
    try:
        probe = subprocess.run(["perf", "stat", "-x,", "-e", TOTAL, "--", "true"], capture_output=True, text=True,
                               timeout=30, check=False)
    except FileNotFoundError:
        return "perf (apt: linux-perf)"
    except subprocess.TimeoutExpired:
        return "perf stat did not answer within 30 s"
    if probe.returncode != 0:
        return f"perf cannot count {TOTAL}: {probe.stderr.strip()[-200:]}"
    return None


TRACEFS = ("/sys/kernel/tracing/events/syscalls", "/sys/kernel/debug/tracing/events/syscalls")
# Counted whatever `perf trace` saw: a relay's calls for every connection.
# perf trace attaches late and drops events on a busy machine; without these,
# a warm-up it missed left even accept4 out of the counts.
ALWAYS = ("accept4", "socket", "connect", "setsockopt", "getsockopt", "getsockname", "getpeername", "ioctl",
          "read", "write", "recvfrom", "sendto", "shutdown", "close", "epoll_ctl", "epoll_wait")

# perf trace -s: "   accept4    1000    0    12.345 ..." under a "----" rule, per thread
_SUMMARY_ROW = re.compile(r"^\s+([a-z_0-9]+)\s+\d+\s+\d+\s")


def name_calls(pids: list[int], workdir: str, run) -> list[str]:
    """The system calls `pids` make while `run()` runs, by `perf trace -s`."""
    out, err = os.path.join(workdir, "perf-trace.txt"), os.path.join(workdir, "perf-trace.err")
    with open(err, "w") as errors:
        proc = subprocess.Popen(["perf", "trace", "-s", "-p", ",".join(map(str, pids)), "-o", out],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
    try:
        # perf trace opens its output file before it attaches, which takes it
        # 0.2 s on an idle machine and over a second on a loaded one (it reads
        # every system call's tracepoint format first). A SIGINT before then
        # kills it with nothing written.
        deadline = time.monotonic() + 30
        while not os.path.exists(out):
            if proc.poll() is not None:
                raise MeasurementError(f"perf trace exited {proc.returncode}: {_tail(err)}")
            if time.monotonic() > deadline:
                raise MeasurementError(f"perf trace did not start within 30 s: {_tail(err)}")
            time.sleep(0.05)
        time.sleep(0.5)  # attached by then (a call it misses is still counted, as "other")
        if proc.poll() is not None:
            raise MeasurementError(f"perf trace exited {proc.returncode}: {_tail(err)}")
        run()
    finally:
        stop_process(proc, sig=signal.SIGINT, timeout=30)
    names = set(ALWAYS)
    with open(out) as f:
        for line in f:
            row = _SUMMARY_ROW.match(line)
            if row:
                names.add(row.group(1))
    tracefs = next((d for d in TRACEFS if os.path.isdir(d)), None)
    if tracefs:  # a name perf trace knows but the kernel has no tracepoint for goes into "other"
        names = {n for n in names if os.path.isdir(os.path.join(tracefs, f"sys_enter_{n}"))}
    return sorted(names)


class SyscallCounter:
    """`perf stat` counting system calls of some processes (all their threads,
    and threads they start), by name and all together, switched on and off on cue."""

    def __init__(self, pids: list[int], names: list[str], workdir: str, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.out, self.err = os.path.join(workdir, "perf-stat.csv"), os.path.join(workdir, "perf-stat.err")
        ctl, ack = os.path.join(workdir, "perf-ctl"), os.path.join(workdir, "perf-ack")
        os.mkfifo(ctl)
        os.mkfifo(ack)
        events = [f"{ENTER}{n}" for n in names] + [TOTAL]
        with open(self.err, "w") as errors:
            self.proc = subprocess.Popen(
                ["perf", "stat", "-x,", "--no-big-num", "-e", ",".join(events),
                 "-p", ",".join(str(p) for p in pids), "--delay=-1", f"--control=fifo:{ctl},{ack}", "-o", self.out],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
        self._ack = os.open(ack, os.O_RDONLY | os.O_NONBLOCK)
        self._ctl = self._open_writer(ctl)

    def _open_writer(self, path: str) -> int:
        """The control FIFO, once perf has opened its end (bounded, and not if perf died)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise MeasurementError(f"perf stat did not start: {self._stderr()}") from None
                time.sleep(0.01)

    def _command(self, word: str) -> None:
        os.write(self._ctl, f"{word}\n".encode())
        deadline = time.monotonic() + self.timeout
        got = b""
        while b"ack\n" not in got:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise MeasurementError(f"perf stat did not acknowledge '{word}': {self._stderr()}")
            ready, _, _ = select.select([self._ack], [], [], min(left, 0.5))
            if ready:
                got += os.read(self._ack, 64)

    def enable(self) -> None:
        self._command("enable")

    def disable(self) -> None:
        self._command("disable")

    def counts(self) -> dict[str, int]:
        """Stop perf; {system call name: count, TOTAL: all system calls}."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            raise MeasurementError("perf stat did not stop on SIGINT") from None
        counts = {}
        with open(self.out) as f:
            for line in f:
                # CSV: value,unit,event,run time,percentage,...; "<not counted>" when it never ran
                fields = line.strip().split(",")
                if len(fields) < 3 or not fields[0].isdigit():
                    continue
                event, value = fields[2], int(fields[0])
                if event == TOTAL:
                    counts[TOTAL] = value
                elif event.startswith(ENTER) and value:
                    counts[event.removeprefix(ENTER)] = value
        if TOTAL not in counts:
            raise MeasurementError(f"perf stat counted nothing: {self._stderr()}")
        return counts

    def _stderr(self) -> str:
        return _tail(self.err) if self.proc.poll() is not None else "(still running)"

    def close(self) -> None:
        for fd in (getattr(self, "_ctl", None), getattr(self, "_ack", None)):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        stop_process(self.proc, sig=signal.SIGINT, timeout=5)


def _tail(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()[-300:]
    except OSError:
        return ""


def _spec(count: int) -> dict:
    # a count, not a duration: the duration is only a bound
    return {"kind": "conn_rate", "host": SERVICE, "conns": CLIENTS, "seconds": 120, "max_ops": count}


def _made(raw: dict) -> int:
    made = raw["count"] + raw["errors"]
    if not raw["count"]:
        raise MeasurementError(f"no connection succeeded: {raw.get('error_sample')}")
    return made


def measure(world: BenchWorld, subject: Subject, count: int) -> dict:
    """One subject, fresh: per-connection CPU and context switches, then system calls."""
    world.set_rules(subject.rules)
    running = subject.start(world, ECHO)
    root = running.pid if running else world.server.pid  # direct: the app server
    workdir = world.private_dir(f"perf-{subject.name}")
    counter = None
    try:
        names = name_calls(procstat.tree(root), workdir,
                           lambda: run_loadgen(world, _spec(max(50, count // 10)), timeout=150))  # warm-up

        cpu0, switches0 = procstat.cpu_split(root), procstat.context_switches(root)
        plain = run_loadgen(world, _spec(count), timeout=150)
        cpu1, switches1 = procstat.cpu_split(root), procstat.context_switches(root)
        n = _made(plain)

        counter = SyscallCounter(procstat.tree(root), names, workdir)
        counter.enable()
        counted = run_loadgen(world, _spec(count), timeout=150)
        counter.disable()
        calls = counter.counts()
        m = _made(counted)
        if running is not None and not running.alive():
            raise MeasurementError(f"{subject.name} died: {running.output()}")
    finally:
        if counter is not None:
            counter.close()
        if running is not None:
            running.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if not world.server_alive():
        raise MeasurementError("the app server died")
    total = calls.pop(TOTAL)
    return {
        "connections": n, "errors": plain["errors"] + counted["errors"], "cps": plain["cps"],
        "user_us": (cpu1[0] - cpu0[0]) / n * 1e6, "system_us": (cpu1[1] - cpu0[1]) / n * 1e6,
        "voluntary": (switches1[0] - switches0[0]) / n, "involuntary": (switches1[1] - switches0[1]) / n,
        "counted_connections": m, "syscalls_total": total / m,
        "syscalls": {name: value / m for name, value in sorted(calls.items())},
        # calls perf trace did not name (it attached late, or a name without a tracepoint)
        "syscalls_unnamed": max(0, total - sum(calls.values())) / m,
    }


# The per-connection figures of a run, and how the table shows them.
FIGURES = (
    ("user_us", "CPU µs, user ↓"),
    ("system_us", "CPU µs, system ↓"),
    ("cpu_us", "CPU µs, user + system ↓"),
    ("voluntary", "context switches, voluntary ↓"),
    ("involuntary", "context switches, involuntary ↓"),
    ("syscalls_total", "system calls, all ↓"),
)
SHOWN = 0.05  # a system call made less often than this per connection by every subject goes into "other"


def summarise(runs: list[dict]) -> dict:
    """summary[subject] = medians over the repetitions: figures, and calls per connection by name."""
    out = {}
    for name in dict.fromkeys(r["subject"] for r in runs):
        ok = [r for r in runs if r["subject"] == name and not r.get("failed")]
        if not ok:
            continue
        for r in ok:
            r["cpu_us"] = r["user_us"] + r["system_us"]
        names = sorted({c for r in ok for c in r["syscalls"]})
        out[name] = {
            "repetitions": len(ok),
            "cps": statistics.median(r["cps"] for r in ok),
            "errors": sum(r["errors"] for r in ok),
            **{key: statistics.median(r[key] for r in ok) for key, _ in FIGURES},
            "syscalls_unnamed": statistics.median(r["syscalls_unnamed"] for r in ok),
            "syscalls": {c: statistics.median(r["syscalls"].get(c, 0.0) for r in ok) for c in names},
        }
    return out


def other_calls(cell: dict, shown: list[str]) -> float:
    """A subject's calls per connection that are not in `shown`, unnamed ones included."""
    return sum(v for c, v in cell["syscalls"].items() if c not in shown) + cell["syscalls_unnamed"]


def shown_calls(summary: dict) -> list[str]:
    """The system calls some subject makes at least SHOWN times per connection,
    most frequent first (by the largest count any subject has)."""
    peak: dict[str, float] = {}
    for cell in summary.values():
        for call, value in cell["syscalls"].items():
            peak[call] = max(peak.get(call, 0.0), value)
    return sorted((c for c, v in peak.items() if v >= SHOWN), key=lambda c: (-peak[c], c))


# Calls that do one job under different names. Which one a relay uses is its
# library's choice (libuv reads with read(2), libevent with readv(2), HAProxy
# with recvfrom(2)), so "a call Envoy does not make" is judged per job. libuv
# (>= 1.45) hands its epoll_ctl changes to the kernel in batches through
# io_uring (IORING_OP_EPOLL_CTL): its io_uring_enter(2) is epoll_ctl's job.
JOBS = {
    "read": "receive", "readv": "receive", "recvfrom": "receive", "recvmsg": "receive",
    "write": "send", "writev": "send", "sendto": "send", "sendmsg": "send",
    "epoll_wait": "wait for events", "epoll_pwait": "wait for events", "epoll_pwait2": "wait for events",
    "epoll_ctl": "epoll_ctl", "io_uring_enter": "epoll_ctl",
}


def missing_in(summary: dict, ours: str, theirs: str) -> list[tuple[str, float]] | None:
    """System calls `ours` makes per connection (at least SHOWN times) whose job
    (JOBS) `theirs` practically never does (fewer than 0.01 times); None if
    either was not measured."""
    if ours not in summary or theirs not in summary:
        return None
    mine, other = summary[ours]["syscalls"], summary[theirs]["syscalls"]
    done_by_them: dict[str, float] = {}
    for call, value in other.items():
        job = JOBS.get(call, call)
        done_by_them[job] = done_by_them.get(job, 0.0) + value
    return [(c, v) for c, v in sorted(mine.items(), key=lambda kv: (-kv[1], kv[0]))
            if v >= SHOWN and done_by_them.get(JOBS.get(c, c), 0.0) < 0.01]
