"""The benchmark's world: a throwaway pod, its rules, the app server, clean-up.

Built on the project's own sandbox (`proxy.demo.netns.PodWorld`): a pod namespace
(192.0.2.1) and a remote namespace owning 198.51.100.0/24, joined by one veth
pair and linked to nothing else. Every process the benchmark starts is
registered here and stopped by its PID when the run ends, also on Ctrl-C,
SIGTERM or an exception; then the namespaces go.

Per-namespace settings made in the pod (they die with it):

* `ip_local_port_range 1024 65535` and `tcp_tw_reuse 1`: the connection-rate
  workload opens tens of thousands of short connections per run; every one
  leaves a TIME_WAIT socket on the client and on the relay's upstream side.
* `nf_conntrack_tcp_timeout_time_wait 10`: the same connections leave
  conntrack entries (two per relayed connection); they must not pile up to
  the table's limit across measurements.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proxy.demo.netns import PodWorld

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IPTABLES = ROOT / "iptables"
PYTHON = sys.executable  # the proxy's venv: UID 1337 must be able to run it (see README)
SERVICE = "198.51.100.10"  # where the app's connections go (the app server)

POD_SYSCTLS = (
    ("net.ipv4.ip_local_port_range", "1024 65535"),
    ("net.ipv4.tcp_tw_reuse", "1"),
)
POD_CONNTRACK_SYSCTLS = (("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "10"),)


class Processes:
    """Every process the benchmark starts, so that each can be stopped by its PID."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, **kwargs)
        self._procs.append(proc)
        return proc

    def adopt(self, proc: subprocess.Popen) -> None:
        self._procs.append(proc)

    def stop_all(self) -> None:
        for proc in reversed(self._procs):
            stop_process(proc, timeout=5)
        self._procs.clear()


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Stop one process we started (by its PID), and any children it forked."""
    if proc.poll() is None:
        children = descendants(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        for pid in children:  # e.g. socat's per-connection forks
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """PIDs of the live descendants of `pid` (one scan of /proc)."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: split after the last ')'
        fields = stat[stat.rindex(b")") + 2:].split()
        parent_of[int(entry)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        found += kids
        frontier += kids
    return found


class BenchWorld:
    """The pod world, its redirect rules (toggled per subject), and the app server."""

    def __init__(self) -> None:
        self.procs = Processes()
        self.tmp = tempfile.mkdtemp(prefix="scp-bench-")
        os.chmod(self.tmp, 0o755)  # UID 1337 reads configs from here
        self.world = PodWorld()
        self.pod, self.remote = self.world.pod, self.world.remote
        self.rules: str | None = None  # None (no rules), "uid", or another label
        # cleanup.sh also undoes the cgroup method's set-up: point it at a path of ours
        self._cgroup_dir = os.path.join(self.tmp, "no-cgroup")
        self.server: subprocess.Popen | None = None
        try:
            for key, value in POD_SYSCTLS:
                self.pod.exec("sysctl", "-q", "-w", f"{key}={value}")
            self._start_server()
        except BaseException:
            self.close()
            raise

    # -- the app server ---------------------------------------------------------------
    def _start_server(self) -> None:
        self.server = self.procs.popen(self.remote.argv(PYTHON, str(HERE / "appserver.py")),
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, cwd="/")
        line = self.server.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the app server did not start (exit {self.server.poll()})")

    def server_alive(self) -> bool:
        return self.server is not None and self.server.poll() is None

    # -- rules ---------------------------------------------------------------------------
    def redirect_sh(self, *args: str) -> float:
        """Run iptables/redirect.sh in the pod; the seconds it took."""
        t0 = time.perf_counter()
        self.pod.exec("sh", str(IPTABLES / "redirect.sh"), *args)
        return time.perf_counter() - t0

    def cleanup_sh(self) -> None:
        self.pod.exec("sh", str(IPTABLES / "cleanup.sh"), "--cgroup-dir", self._cgroup_dir)

    def set_rules(self, wanted: str | None) -> None:
        """None: no rule at all (the `direct` subject); "uid": the design note's UID rule."""
        if wanted == self.rules:
            return
        if self.rules is not None:
            self.cleanup_sh()
            self.rules = None
        if wanted == "uid":
            self.redirect_sh("--method", "uid")
            self.rules = "uid"
            for key, value in POD_CONNTRACK_SYSCTLS:  # conntrack is loaded now
                self.pod.exec("sysctl", "-q", "-w", f"{key}={value}", check=False)
        elif wanted is not None:
            raise ValueError(wanted)

    def forget_rules(self) -> None:
        """Someone else (the rule-scaling experiment) changed the rules: clean up."""
        self.cleanup_sh()
        self.rules = None

    # -- files UID 1337 can read and write -------------------------------------------------
    def private_dir(self, name: str) -> str:
        path = tempfile.mkdtemp(prefix=f"{name}-", dir=self.tmp)
        os.chmod(path, 0o777)
        return path

    def close(self) -> None:
        self.procs.stop_all()
        world = getattr(self, "world", None)
        if world is not None:
            world.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def signals_raise():
    """SIGINT, SIGTERM and SIGHUP become KeyboardInterrupt, so every `finally` runs
    (SIGINT too when the benchmark was started in the background, where a shell
    hands it down ignored)."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
