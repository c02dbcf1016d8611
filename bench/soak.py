"""The soak (`python -m bench --parts soak`): mixed load and faults for ten minutes.

Not a timed test: it asserts nothing while it runs; it reports what a long
run did to the proxy and to the bytes it carried, and the run fails (exit 1)
if a byte came back wrong, a cut stream looked complete, the proxy died, or
its supervisor did not stop cleanly at the end.

The set-up is the benchmark's world (world.py): the UID rule in a throwaway
pod, the app server in the remote namespace, the proxy as UID 1337 with two
workers (`--concurrency 2`), access log on (a file). The load is
soakload.py in the pod: `clients` connection loops of echo (every byte
checked), slow readers, client resets and refused upstreams. Every
`fault_every` seconds one fault from FAULTS, in turn:

    kill     SIGKILL one worker: the supervisor starts it again; its clients
             must see a reset
    stop     SIGSTOP one worker: the watchdog must find it stuck and kill it
             (it is SIGCONTed after KILL_WAIT seconds if it is still there,
             which counts as a watchdog failure)
    direct   a burst of DIRECT_DIALS connections straight to the redirected
             port with a line of garbage each (refused, logged rate-limited)
    admin    /ready and /stats from the admin API must answer

Two worker deaths per FAULTS cycle stay under the supervisor's crash-loop
bound (watchdog.py: more than 5 within 60 s). The proxy's resident memory
and open descriptors (supervisor and workers added up) are sampled every
SAMPLE_EVERY seconds; the report gives them at the start (the proxy ready,
no load yet) and at the end (load stopped, two seconds later).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable

from proxy.demo.sandbox import ProxyProcess

from .world import HERE, PYTHON, SERVICE, BenchWorld, descendants

FAULTS = ("kill", "direct", "admin", "direct", "stop", "direct", "admin", "direct")
DIRECT_DIALS = 50
KILL_WAIT = 12.0  # seconds a stopped worker may stay before the watchdog is said to have failed
SAMPLE_EVERY = 30.0
CLIENTS = 16
ADMIN = ("127.0.0.1", 15000)


def workers_of(pid: int) -> list[int]:
    return [p for p in descendants(pid) if _cmdline(p).count("worker")]


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def footprint(pid: int) -> dict:
    """Resident memory (KiB) and open descriptors of the proxy: supervisor and workers added up."""
    rss = fds = 0
    own = {"rss_kib": 0, "fds": 0}
    pids = [pid, *workers_of(pid)]
    for p in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            count = len(os.listdir(f"/proc/{p}/fd"))
            rss, fds = rss + kib, fds + count
            if p == pid:
                own = {"rss_kib": kib, "fds": count}
    return {"rss_kib": rss, "fds": fds, "processes": len(pids), "supervisor": own}


def admin_get(world: BenchWorld, path: str) -> tuple[int, str]:
    with world.pod.connect(ADMIN, timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def stats(world: BenchWorld) -> dict[str, int]:
    _, body = admin_get(world, "/stats")
    return {k: int(v) for k, _, v in (line.partition(": ") for line in body.splitlines()) if v.isdigit()}


class Faults:
    """Injects one fault at a time and counts what happened."""

    def __init__(self, world: BenchWorld, proxy: ProxyProcess) -> None:
        self.world, self.proxy = world, proxy
        self.counts: Counter[str] = Counter()
        self.stopped: list[tuple[int, float]] = []  # (pid, when) of workers we SIGSTOPped

    def inject(self, kind: str) -> None:
        self.check_stopped()
        getattr(self, kind)()
        self.counts[kind] += 1

    def _a_worker(self) -> int | None:
        alive = [p for p in workers_of(self.proxy.pid) if p not in {s for s, _ in self.stopped}]
        return alive[self.counts["picked"] % len(alive)] if alive else None

    def _signal_a_worker(self, sig: int) -> int | None:
        """Send `sig` to one worker (by its PID), taking them in turn; which one, if any."""
        pid = self._a_worker()
        self.counts["picked"] += 1
        if pid is None:
            return None
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return None
        return pid

    def kill(self) -> None:
        self._signal_a_worker(signal.SIGKILL)

    def stop(self) -> None:
        pid = self._signal_a_worker(signal.SIGSTOP)
        if pid is not None:
            self.stopped.append((pid, time.monotonic()))

    def check_stopped(self, final: bool = False) -> None:
        """A stopped worker the watchdog has not killed in KILL_WAIT seconds is a failure (then SIGCONTed)."""
        for pid, when in list(self.stopped):
            if not os.path.exists(f"/proc/{pid}") or _state(pid) == "Z":
                self.stopped.remove((pid, when))
                self.counts["stopped_and_killed_by_watchdog"] += 1
            elif final or time.monotonic() - when > KILL_WAIT:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                self.stopped.remove((pid, when))
                self.counts["stopped_not_killed"] += 1

    def direct(self) -> None:
        for _ in range(DIRECT_DIALS):
            try:
                with self.world.pod.connect(("127.0.0.1", 5001), timeout=2) as s:
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    s.settimeout(2)
                    s.recv(1)
            except OSError:
                pass

    def admin(self) -> None:
        try:
            admin_get(self.world, "/ready")
            admin_get(self.world, "/stats")
            self.counts["admin_answered"] += 1
        except OSError:
            self.counts["admin_failed"] += 1


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:].split()[0].decode()
    except OSError:
        return "?"


def run_soak(seconds: float, fault_every: float, log: Callable[[str], None], clients: int = CLIENTS) -> dict:
    """The soak, start to end; its report as a dict (soak.json)."""
    world = BenchWorld()
    proxy = None
    load = None
    try:
        world.set_rules("uid")
        logdir = world.private_dir("soak")
        proxy = ProxyProcess(world.pod, config={"access_log": os.path.join(logdir, "access.log")},
                             args=("--concurrency", "2"))
        world.procs.adopt(proxy.proc)
        time.sleep(1.0)
        samples = [{"t": 0.0, **footprint(proxy.pid)}]
        log(f"proxy ready (pid {proxy.pid}, workers {workers_of(proxy.pid)}): "
            f"{samples[0]['rss_kib'] / 1024:.1f} MiB resident, {samples[0]['fds']} descriptors")
        spec = {"host": SERVICE, "clients": clients, "seconds": seconds, "report": 30}
        load = world.procs.popen(world.pod.argv(PYTHON, str(HERE / "soakload.py"), json.dumps(spec)),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, cwd="/")
        lines: list[dict] = []
        reader = threading.Thread(target=lambda: lines.extend(json.loads(x) for x in load.stdout), daemon=True)
        reader.start()
        faults = Faults(world, proxy)
        started = time.monotonic()
        next_fault, next_sample, i = started + fault_every, started + SAMPLE_EVERY, 0
        while load.poll() is None and proxy.alive():
            now = time.monotonic()
            if now >= next_fault and now - started < seconds - fault_every:
                faults.inject(FAULTS[i % len(FAULTS)])
                i += 1
                next_fault += fault_every
            if now >= next_sample:
                samples.append({"t": round(now - started, 1), **footprint(proxy.pid)})
                progress = next((x["progress"] for x in reversed(lines) if "progress" in x), {})
                log(f"{now - started:5.0f}s: {progress.get('connections', 0):,} connections, "
                    f"{progress.get('bytes_checked', 0) / 1e9:.2f} GB checked, "
                    f"{samples[-1]['rss_kib'] / 1024:.1f} MiB, {samples[-1]['fds']} fds, faults {dict(faults.counts)}")
                next_sample += SAMPLE_EVERY
            time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            load.wait(60)
        reader.join(10)
        settle = time.monotonic() + KILL_WAIT  # a worker stopped near the end: the watchdog's time to find it
        while faults.stopped and time.monotonic() < settle:
            faults.check_stopped()
            time.sleep(0.2)
        faults.check_stopped(final=True)
        proxy_alive = proxy.alive()
        time.sleep(2.0)
        end = {"t": round(time.monotonic() - started, 1), **footprint(proxy.pid)} if proxy_alive else None
        counters = stats(world) if proxy_alive else {}
        exit_status = proxy.stop(verbose=False)
        done = next((x["done"] for x in lines if "done" in x), None)
        return report(seconds, fault_every, clients, done, samples, end, faults.counts, counters,
                      proxy_alive, exit_status)
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        if proxy is not None:
            proxy.stop(signal.SIGKILL, verbose=False)
        world.close()


def report(seconds: float, fault_every: float, clients: int, done: dict | None, samples: list[dict],
           end: dict | None, faults: Counter, counters: dict[str, int], alive: bool, exit_status: int) -> dict:
    done = done or {}
    failures = []
    if not done:
        failures.append("the load generator gave no final count")
    # (a refused upstream may end a client with a FIN if its bytes had not reached the proxy yet, as
    # in Envoy: refused_clean_end is counted, not a failure)
    for key in ("corrupted", "truncated_clean", "refused_answered", "hung"):
        if done.get(key):
            failures.append(f"{key}: {done[key]}")
    if faults.get("stopped_not_killed"):
        failures.append(f"the watchdog left {faults['stopped_not_killed']} stopped worker(s)")
    if not alive:
        failures.append("the proxy died during the soak")
    elif exit_status != 0:
        failures.append(f"the proxy exited {exit_status} on SIGTERM")
    keep = ("server.worker_restarts", "server.watchdog_miss", "server.log_lines_dropped",
            "server.log_lines_suppressed", "listener.[__]_5001.downstream_cx_total",
            "listener.[__]_5001.loop_guard_refused", "cluster.original_dst.upstream_cx_connect_fail")
    return {"seconds": seconds, "fault_every_s": fault_every, "clients": clients, "load": done,
            "faults": {k: v for k, v in faults.items() if k != "picked"},
            "start": samples[0], "end": end, "samples": samples,
            "stats": {k: counters[k] for k in keep if k in counters}, "exit_status": exit_status,
            "failures": failures}


def markdown(doc: dict, command: str) -> str:
    load, start, end = doc["load"], doc["start"], doc["end"] or {}
    served = load.get("served", 0)
    sup = end.get("supervisor", {})
    lines = [f"# Soak: {doc['seconds'] / 60:g} minutes of mixed load and faults\n",
             f"`{command}`, {doc.get('started', '')}; {doc['clients']} client loops; a fault every "
             f"{doc['fault_every_s']:g} s; the proxy with `--concurrency 2`.\n",
             "| what | figure |", "|---|---:|",
             f"| connections opened | {load.get('connections', 0):,} |",
             f"| echo and slow-reader streams served whole | {served:,} |",
             f"| bytes checked | {load.get('bytes_checked', 0):,} |",
             f"| corrupted | {load.get('corrupted', 0)} |",
             f"| cut streams that ended with a clean FIN | {load.get('truncated_clean', 0)} |",
             f"| reset by the client (on purpose) | {load.get('reset_by_client', 0):,} |",
             f"| refused upstream, reset by the proxy | {load.get('refused_reset', 0):,} |",
             f"| reset by the proxy otherwise (cut by a fault) | {load.get('reset_by_peer', 0):,} |",
             f"| hung (no answer in 30 s) | {load.get('hung', 0)} |",
             f"| faults: worker killed / stopped (watchdog killed it) / direct-dial bursts / admin reads | "
             f"{doc['faults'].get('kill', 0)} / {doc['faults'].get('stop', 0)} "
             f"({doc['faults'].get('stopped_and_killed_by_watchdog', 0)}) / {doc['faults'].get('direct', 0)} / "
             f"{doc['faults'].get('admin_answered', 0)} of {doc['faults'].get('admin', 0)} |",
             f"| worker restarts (`server.worker_restarts`) | {doc['stats'].get('server.worker_restarts', '-')} |",
             f"| resident memory, start → end (supervisor + workers) | {start['rss_kib'] / 1024:.1f} MiB → "
             f"{end.get('rss_kib', 0) / 1024:.1f} MiB |",
             f"| open descriptors, start → end | {start['fds']} → {end.get('fds', '-')} |",
             f"| the supervisor alone (never restarted): memory, descriptors, start → end | "
             f"{start['supervisor']['rss_kib'] / 1024:.1f} → {sup.get('rss_kib', 0) / 1024:.1f} MiB, "
             f"{start['supervisor']['fds']} → {sup.get('fds', '-')} |",
             f"| exit status on SIGTERM | {doc['exit_status']} |",
             ""]
    lines += ["Samples (every 30 s; supervisor and workers, a restarted worker starts small again): "
              + ", ".join(f"{s['t']:g}s {s['rss_kib'] / 1024:.1f} MiB/{s['fds']} fds" for s in doc["samples"]) + "\n"]
    if doc["failures"]:
        lines += ["**Failures:** " + "; ".join(doc["failures"]) + "\n"]
    return "\n".join(lines)


def main(out: str, seconds: float, fault_every: float, log: Callable[[str], None], command: str) -> int:
    import datetime
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    log(f"soak: {seconds:g} s of mixed load, a fault every {fault_every:g} s; results in {out}")
    doc = run_soak(seconds, fault_every, log)
    doc.update(started=started, command=command)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "soak.json"), "w") as f:
        json.dump(doc, f, indent=1)
    md = markdown(doc, command)
    with open(os.path.join(out, "soak.md"), "w") as f:
        f.write(md)
    print(md)
    return 1 if doc["failures"] else 0

