"""The proxy as a real process in a namespace, as it runs in a pod.

Used by the demo and the end-to-end tests: `sidecar-proxy run` inside the pod
namespace, as UID 1337, with an empty capability set (or CAP_NET_ADMIN alone
for the mark method), started through `setpriv` so nothing of root's
survives the exec. Its JSON log lines are collected as they come.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import yaml

from ..config import PROXY_UID
from .netns import NetNs

PYTHON = sys.executable  # must be executable by UID 1337 (see README)
SANDBOX_DRAIN_TIMEOUT = "1s"


def setpriv_argv(uid: int = PROXY_UID, caps: tuple[str, ...] = ()) -> list[str]:
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    if caps:
        spec = ",".join(f"+{c}" for c in caps)
        argv += [f"--inh-caps={spec}", f"--ambient-caps={spec}"]
    else:
        argv += ["--inh-caps=-all"]
    return argv + ["--"]


class ProxyProcess:
    """`sidecar-proxy run` in a namespace, its JSON log lines collected."""

    def __init__(self, ns: NetNs, config: dict | None = None, args: tuple[str, ...] = (),
                 caps: tuple[str, ...] = (), loop: str = "uvloop", env: dict | None = None,
                 uid: int = PROXY_UID, wait: bool = True, prefix: tuple[str, ...] = (),
                 access_log: bool = True, enter: str = "ip-netns", cwd: str = "/",
                 command: tuple[str, ...] = ()) -> None:
        """`enter` is how the namespace is entered: "ip-netns" (`ip netns exec`,
        a fresh /sys) or "nsenter" (keeps our mounts: the cgroup method). `cwd`:
        where it runs; anywhere but "/", it is started as the installed
        `sidecar-proxy` command, which (unlike `python -m`) does not put the
        current directory on sys.path. `command`: another command line to run
        the same way instead of `sidecar-proxy run` (`sidecar-envoy ...`; args,
        loop and config are then not used)."""
        into = ns.nsenter_argv if enter == "nsenter" else ns.argv
        program = [PYTHON, "-m", "proxy"] if cwd == "/" else [os.path.join(os.path.dirname(PYTHON), "sidecar-proxy")]
        run = command or (*program, "run", "--log-format", "json", "--loop", loop, *args)
        argv = [*into(*prefix, *setpriv_argv(uid, caps)), *run]
        if not access_log and not command:
            argv += ["--access-log", "off"]
        if not command and "--drain-timeout" not in args and "drain_timeout" not in (config or {}):
            # SIGTERM keeps outbound open for the whole drain timeout (5 s by default):
            # a demo, a test or a benchmark stops its proxy sooner unless it asks otherwise
            argv += ["--drain-timeout", SANDBOX_DRAIN_TIMEOUT]
        self._config_dir = None
        if config is not None and not command:
            # a directory UID 1337 can read (root's temp dirs may be private)
            self._config_dir = tempfile.mkdtemp(prefix="scp-config-")
            os.chmod(self._config_dir, 0o755)
            path = os.path.join(self._config_dir, "proxy.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(config, f)
            os.chmod(path, 0o644)
            argv += ["--config", path]
        self.lines: list[dict] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self.reading = threading.Event()  # clear it to stop reading the proxy's stderr (a stalled pipe)
        self.reading.set()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, cwd=cwd,
                                     env={**os.environ, **(env or {})})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            try:
                self.wait_for(lambda e: e.get("msg", "").startswith("ready"), what="ready")
            except BaseException:
                self.stop(signal.SIGKILL)
                raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None  # started with stderr=PIPE
        for line in self.proc.stderr:
            self.reading.wait()
            line = line.rstrip("\n")
            with self._cond:
                self.raw.append(line)
                with contextlib.suppress(ValueError):  # a line that is not JSON stays in raw only
                    self.lines.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:  # end of output: a waiter learns at once that the process is gone
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[dict], bool], timeout: float = 15.0, what: str = "log line") -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for entry in self.lines:
                    if pred(entry):
                        return entry
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"proxy exited {self.proc.returncode} before {what}: {self.raw[-5:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what} within {timeout}s; last lines: {self.raw[-5:]}")
                self._cond.wait(left if self._reader.is_alive() else min(left, 0.05))

    def access(self, timeout: float = 10.0, **match) -> dict:
        """The access-log entry whose fields equal `match` (waits for it)."""
        return self.wait_for(lambda e: e.get("type") == "access" and all(e.get(k) == v for k, v in match.items()),
                             timeout, what=f"access entry {match}")

    def wait_new_access(self, seen: int, timeout: float) -> dict | None:
        """The first access entry after the first `seen` ones, or None."""
        try:
            self.wait_for(lambda _: len(self.access_entries()) > seen, timeout, what="a new access entry")
        except AssertionError:
            return None
        return self.access_entries()[seen]

    def access_entries(self) -> list[dict]:
        with self._cond:
            return [e for e in self.lines if e.get("type") == "access"]

    def status_field(self, name: str) -> str:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return line.split(":", 1)[1].strip()
        raise KeyError(name)

    def rss_kib(self) -> int:
        return int(self.status_field("VmRSS").split()[0])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0, verbose: bool = True) -> int:
        self.reading.set()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        if self._config_dir is not None:
            shutil.rmtree(self._config_dir, ignore_errors=True)
        if verbose:  # pytest shows this for a failed test
            print(f"--- proxy pid {self.pid} exited {self.proc.returncode}; its log:")
            print("\n".join(self.raw))
        return self.proc.returncode
