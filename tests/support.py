"""Test support: the proxy as a real process, and small threaded servers.

The proxy always runs as it would in a pod: inside the pod namespace, as UID
1337, with an empty capability set (or CAP_NET_ADMIN alone when a test needs
SO_MARK), started through `setpriv` so nothing of root's survives the exec.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import yaml

from netns import NetNs

PROXY_UID = 1337
PYTHON = sys.executable


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

    def __init__(self, ns: NetNs, tmp_path, config: dict | None = None, args: tuple[str, ...] = (),
                 caps: tuple[str, ...] = (), loop: str = "uvloop", env: dict | None = None,
                 uid: int = PROXY_UID, wait: bool = True, prefix: tuple[str, ...] = (),
                 access_log: bool = True) -> None:
        argv = [*ns.argv(*prefix, *setpriv_argv(uid, caps)), PYTHON, "-m", "proxy", "run",
                "--log-format", "json", "--loop", loop, *args]
        if not access_log:
            argv += ["--access-log", "off"]
        self._config_dir = None
        if config is not None:
            # pytest's tmp_path is private to root; UID 1337 must read the file
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
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, cwd="/",
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
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            with self._cond:
                self.raw.append(line)
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    pass
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
                self._cond.wait(left)

    def access(self, timeout: float = 10.0, **match) -> dict:
        """The access-log entry whose fields equal `match` (waits for it)."""
        return self.wait_for(lambda e: e.get("type") == "access" and all(e.get(k) == v for k, v in match.items()),
                             timeout, what=f"access entry {match}")

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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        self.proc.stderr.close()
        if self._config_dir is not None:
            shutil.rmtree(self._config_dir, ignore_errors=True)
        print(f"--- proxy pid {self.pid} exited {self.proc.returncode}; its log:")  # shown on failure
        print("\n".join(self.raw))
        return self.proc.returncode


class Server:
    """A threaded TCP server in a namespace; `handler(conn)` runs per connection."""

    def __init__(self, ns: NetNs, addr: tuple, handler: Callable[[socket.socket], None]) -> None:
        self.sock = ns.listen(addr)
        self.addr = addr
        self.handler = handler
        self.accepted: list[tuple] = []
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.accepted.append(peer)
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(30)
            self.handler(conn)

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self.sock.close()
        for t in self._threads:
            t.join(timeout=5)


# --- handlers ---------------------------------------------------------------------------

def identify(name: str) -> Callable[[socket.socket], None]:
    """Say who we are and who called, then echo until EOF."""
    def handler(conn: socket.socket) -> None:
        peer = conn.getpeername()
        conn.sendall(f"{name} {peer[0]}\n".encode())
        while data := conn.recv(65536):
            conn.sendall(data)
    return handler


def digest_sink(conn: socket.socket) -> None:
    """Read until EOF, then answer with the byte count and sha256 of what came."""
    h, n = hashlib.sha256(), 0
    while data := conn.recv(1 << 20):
        h.update(data)
        n += len(data)
    conn.sendall(f"{n} {h.hexdigest()}\n".encode())


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def recv_line(sock: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode()


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)
