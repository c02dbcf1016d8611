"""Where the proxy's time goes under the connection-rate workload (py-spy).

Connections per second is where a Python proxy loses to a C one: every
connection costs an accept, a SO_ORIGINAL_DST, a chain lookup, an upstream
socket and connect, two transports, stats and an access-log entry, all on
one thread. This samples the proxy (`--loop uvloop`, the benchmark's config)
while 32 clients open short connections through it:

* `py-spy record --gil --format raw`: collapsed Python stacks of the thread
  holding the GIL (what occupies the interpreter), summarised here as
  the top functions by own ("self") samples and by inclusive samples, and
  by source file (profile-conn.txt);
* the same with `--native`: C frames too (uvloop, libuv, libc), which shows
  the system calls underneath (profile-conn-native.txt), summarised for the
  event loop's thread only (the access-log thread mostly waits);
* `py-spy record --format flamegraph`: profile-conn.svg, to look at.

py-spy leaves out samples where the thread is idle (waiting in epoll), so
the percentages are shares of the proxy's busy time. Sampling pauses the
process briefly (--native needs that), so the connection rate during the
profile is lower than in the benchmark and is not reported.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import time

from .runner import loadgen_argv
from .subjects import BY_NAME
from .world import SERVICE, BenchWorld, stop_process

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return here if os.path.exists(here) else shutil.which("py-spy")


def _frame(raw: str) -> tuple[str, str]:
    """(function, file) of one collapsed-stack frame, line numbers dropped."""
    m = _FRAME.match(raw.strip())
    if not m:
        return raw.strip(), ""
    path = m.group("file")
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if "/proxy/" in path:
        path = "proxy/" + path.rsplit("/proxy/", 1)[1]
    return m.group("func"), path


LOOP_THREAD = "Runner.run ("  # a frame only the event loop's thread has


def category(function: str, path: str) -> str:
    """Where a leaf frame's time goes, broadly."""
    if path.startswith("libc.so"):
        return "libc: system calls, futex"
    if path.startswith("proxy/"):
        return "Python: proxy/"
    if path.endswith((".c", ".h", ".so", ".pyx")) or path.startswith("python3") or ".so." in path:
        return "C: uvloop, libuv, CPython"
    return "Python: standard library"


def summarise(raw_path: str, top: int = 20, loop_thread_only: bool = False) -> dict:
    """Top functions by self and inclusive samples, self samples per file and per
    category, and the share of each thread (the event loop's, the access log's)."""
    self_counts: collections.Counter = collections.Counter()
    incl_counts: collections.Counter = collections.Counter()
    by_file: collections.Counter = collections.Counter()
    by_category: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            thread = "event loop" if LOOP_THREAD in stack else (
                "access log" if "AccessLog._run" in stack else "other")
            if loop_thread_only and thread != "event loop":
                continue
            frames = [_frame(x) for x in stack.split(";")]
            frames = [fr for fr in frames if not fr[0].startswith(("process ", "thread "))]
            if not frames:
                continue
            total += n
            threads[thread] += n
            leaf = frames[-1]
            self_counts[f"{leaf[0]} ({leaf[1]})"] += n
            by_file[leaf[1] or "?"] += n
            by_category[category(*leaf)] += n
            for fr in {f"{fr[0]} ({fr[1]})" for fr in frames}:
                incl_counts[fr] += n

    def pct(counter, k=top):
        ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:k]  # ties: by name, reproducibly
        return [{"function": key, "samples": v, "percent": round(100 * v / total, 1) if total else 0.0}
                for key, v in ranked]
    return {"samples": total, "self": pct(self_counts), "inclusive": pct(incl_counts), "by_file": pct(by_file),
            "by_category": pct(by_category), "threads": pct(threads), "loop_thread_only": loop_thread_only}


def resummarise(profile: dict, directory: str) -> dict:
    """The summaries again from the raw files an earlier run left (if they are there)."""
    files = profile.get("files", {})
    raw, native = (os.path.join(directory, files.get(k, "")) for k in ("raw", "native"))
    if not (files and os.path.isfile(raw) and os.path.isfile(native)):
        return profile
    out = summarise(raw)
    out["native"] = summarise(native, loop_thread_only=True)
    out["files"] = files
    return out


def profile_connections(world: BenchWorld, out_dir: str, seconds: float, log) -> dict:
    tool = py_spy()
    if tool is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy: the bench extra)")
    subject = BY_NAME["proxy-uvloop"]
    world.set_rules(subject.rules)
    running = subject.start(world, 9003)
    load = None
    paths = {"raw": os.path.join(out_dir, "profile-conn.txt"),
             "native": os.path.join(out_dir, "profile-conn-native.txt"),
             "flamegraph": os.path.join(out_dir, "profile-conn.svg")}
    try:
        spec = {"kind": "conn_rate", "host": SERVICE, "conns": 32, "seconds": 3 * seconds + 5,
                "max_ops": 3_000_000}
        load = world.procs.popen(loadgen_argv(world, spec), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, cwd="/")
        time.sleep(1.5)
        for what, extra, fmt in (("raw", ("--gil",), "raw"), ("native", ("--native",), "raw"),
                                 ("flamegraph", (), "flamegraph")):
            log(f"py-spy: {what}, proxy pid {running.pid}, {seconds:g}s")
            # by its bare name: the flame graph's title shows the command line
            subprocess.run(["py-spy", "record", "--pid", str(running.pid), "--duration", str(int(seconds)),
                            "--rate", "200", *extra, "--format", fmt, "-o", os.path.basename(paths[what])],
                           check=True, capture_output=True, timeout=seconds + 60, cwd=out_dir,
                           env={**os.environ, "PATH": f"{os.path.dirname(tool)}{os.pathsep}{os.environ['PATH']}"})
        load.communicate(timeout=3 * seconds + 60)
    finally:
        if load is not None:
            stop_process(load, timeout=5)
        running.stop()
    summary = summarise(paths["raw"])
    summary["native"] = summarise(paths["native"], loop_thread_only=True)
    summary["files"] = {k: os.path.basename(v) for k, v in paths.items()}
    return summary
