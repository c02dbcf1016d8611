"""The data path, side by side with real Envoy: the same bootstrap, the same traffic.

One bootstrap holds every scenario, each on its own destination port of
Istio's virtualOutbound listener (original_dst listener filter, tcp_proxy):
the passthrough (ORIGINAL_DST), round robin over three endpoints, a second
attempt after a refused endpoint, a refused, a timed-out and a black-holed
upstream (Istio's BlackHoleCluster), a tcp_proxy naming a cluster that does
not exist, a chain without filters, and an idle timeout. The file is run by
real Envoy 1.40 and by sidecar-envoy on each event loop, each with the same
command line as UID 1337 in a fresh pod behind the project's own
iptables/redirect.sh, and gets the same connections. What each client and
each server saw is written down as plain data, and the proxy's must equal
Envoy's, aspect by aspect:

* which upstream answered each connection;
* bytes intact both ways, and a half-close each way that leaves the other
  direction open;
* how a connection without an upstream ends for its client (a FIN or a RST),
  when the client has sent nothing, bytes, or only its FIN: the proxy is
  stopped (SIGSTOP) while the client connects and writes, so what it sent
  is there before the proxy looks, on both sides alike;
* the idle timeout: a connection kept busy outlives it, a quiet one is
  closed, and how its client and its server see the end;
* the change of every stat both emit (but the few that count timing, below);
* the access-log lines (response flags, bytes, upstream host) of the
  connections that found no upstream.

Envoy runs once per module; each event loop's run is compared with it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from envoyproc import LOOPS, PROCESS_STATS, subject, write_bootstrap
from support import recv_all, recv_line

from proxy.demo.netns import PodWorld, ThreadedServer

pytestmark = pytest.mark.netns

REDIRECT = Path(__file__).resolve().parents[2] / "iptables" / "redirect.sh"
PORT = 15001
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
LOG_FORMAT = "%FILTER_CHAIN_NAME% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %UPSTREAM_HOST%\n"
IDLE_TIMEOUT = 1.0  # seconds, the idle scenario's tcp_proxy idle_timeout
CONNECT_TIMEOUT = 0.5  # seconds, the timed-out scenario's cluster connect_timeout
PAYLOAD = random.Random(11).randbytes(1 << 20)  # 1 MiB each way

# servers in the remote namespace
WEB, WEB6 = ("198.51.100.20", 80), ("2001:db8:2::20", 80)
SINK = ("198.51.100.21", 80)  # reads to EOF, then answers with the count and digest
SPEAKER = ("198.51.100.22", 80)  # sends PAYLOAD and its FIN first, then reads to EOF
IDLE_ECHO = ("198.51.100.23", 80)
RR = [("198.51.100.31", 80), ("198.51.100.32", 80), ("198.51.100.33", 80)]
REFUSING = ("198.51.100.40", 80)  # nobody listens: the remote's kernel answers the SYN with a RST
RETRY_LIVE = ("198.51.100.41", 80)
SILENT = ("198.51.100.42", 80)  # the remote drops every SYN to it
ANY = "198.51.100.99"  # a destination for the chains by port (no server there)

# stats left out: the process's (PROCESS_STATS), and cluster.retry., whose refused attempts
# depend on where Envoy's round robin starts (at random)
NOT_COMPARED = (*PROCESS_STATS, "cluster.retry.")

# tcp_proxy's flush counters: Envoy counts one when a client's last bytes and its FIN come
# together (its writes wait for the next turn of its loop); the proxy writes at once and
# never counts them (README, "Differences from Envoy")
NEVER_COUNTED = ("upstream_flush_total", "upstream_flush_active")
# flow control: how often a 1 MiB upload pauses the client depends on how fast the server
# reads and on each one's buffers (Envoy's high-water mark is the listener's 1 MiB
# per_connection_buffer_limit_bytes, the proxy's 256 KiB plus the kernel's): it
# differs from one run to the next of the same proxy
TIMING = ("downstream_flow_control_paused_reading_total", "downstream_flow_control_resumed_reading_total")
# an ORIGINAL_DST cluster's hosts leave at a sweep every cleanup_interval (5 s) whose phase is
# each process's own, so which destinations of this longer run are still listed at its end, and
# how often the set changed, depend on when the sweeps fell (test_original_dst_hosts.py compares
# them where the timing is held)
SWEPT = ("PassthroughCluster.membership_change", "PassthroughCluster.membership_healthy",
         "PassthroughCluster.membership_total")

# destination ports of the chains
P_RR, P_RETRY, P_REFUSED, P_TIMEOUT, P_BLACKHOLE, P_IDLE = 81, 83, 84, 85, 9, 86
P_NO_CLUSTER, P_NO_FILTER = 87, 88  # a tcp_proxy naming no cluster there is; a chain without filters
GAUGES = ("_active", "_buffered")  # compared as they are at the end; counters by how much they moved
LOG = "failures.log"  # beside the bootstrap
LOGGED = ("refused", "timed_out", "black_holed", "no_such_cluster")  # the FAILURES whose chains write it
FAILURES = {"refused": (ANY, P_REFUSED), "timed_out": (ANY, P_TIMEOUT), "black_holed": (ANY, P_BLACKHOLE),
            "passthrough_refused": REFUSING, "no_such_cluster": (ANY, P_NO_CLUSTER),
            "chain_without_filters": (ANY, P_NO_FILTER)}


def _address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _cluster(name: str, endpoints: list[tuple[str, int]], connect_timeout: str = "2s") -> dict:
    cluster: dict[str, Any] = {"name": name, "type": "STATIC", "connect_timeout": connect_timeout}
    if endpoints:
        cluster["load_assignment"] = {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _address(*e)}} for e in endpoints]}]}
    return cluster


def _chain(name: str, port: int | None, cluster: str, log: str | None = None, **tcp: Any) -> dict:
    if log is not None:  # how each connection ended, in Envoy's words
        tcp["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": log, "log_format": {"text_format_source": {"inline_string": LOG_FORMAT}}}}]
    chain: dict[str, Any] = {"name": name, "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": TCP_PROXY, "stat_prefix": name, "cluster": cluster, **tcp}}]}
    if port is not None:
        chain["filter_chain_match"] = {"destination_port": port}
    return chain


def bootstrap(log: str) -> dict:
    """The bootstrap; the chains where connections fail write their access log to `log`."""
    return {
        "admin": {"address": _address("127.0.0.1", 15000)},
        "static_resources": {
            "listeners": [{
                "name": "virtualOutbound",
                "address": _address("0.0.0.0", PORT),
                "additional_addresses": [{"address": _address("::", PORT)}],
                "traffic_direction": "OUTBOUND",
                "listener_filters": [{"name": "envoy.filters.listener.original_dst", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}],
                "filter_chains": [
                    _chain("round-robin", P_RR, "rr"),
                    _chain("retry", P_RETRY, "retry", max_connect_attempts=2),
                    _chain("refused", P_REFUSED, "refused", log),
                    _chain("timed-out", P_TIMEOUT, "timed-out", log),
                    _chain("black-holed", P_BLACKHOLE, "BlackHoleCluster", log),
                    _chain("idle", P_IDLE, "idle", idle_timeout=f"{IDLE_TIMEOUT}s"),
                    _chain("no-cluster", P_NO_CLUSTER, "no-such-cluster", log),
                    {"name": "no-filters", "filter_chain_match": {"destination_port": P_NO_FILTER}},
                    _chain("passthrough", None, "PassthroughCluster"),
                ],
            }],
            "clusters": [
                {"name": "PassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                 "connect_timeout": "2s"},
                _cluster("BlackHoleCluster", []),
                {**_cluster("rr", RR), "lb_policy": "ROUND_ROBIN"},
                _cluster("retry", [REFUSING, RETRY_LIVE]),
                _cluster("refused", [REFUSING]),
                _cluster("timed-out", [SILENT], connect_timeout=f"{CONNECT_TIMEOUT}s"),
                _cluster("idle", [IDLE_ECHO]),
            ],
        },
    }


# --- servers ----------------------------------------------------------------------

def identify(name: str) -> Callable[[socket.socket], None]:
    def handler(conn: socket.socket) -> None:
        conn.sendall(f"{name}\n".encode())
        recv_all(conn)
    return handler


def sink(conn: socket.socket) -> None:
    data = recv_all(conn)
    conn.sendall(f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode())


class Speaker:
    """Sends PAYLOAD and its FIN, then reads what the client still sends (kept in `heard`)."""

    def __init__(self) -> None:
        self.heard: list[bytes] = []

    def __call__(self, conn: socket.socket) -> None:
        conn.sendall(PAYLOAD)
        conn.shutdown(socket.SHUT_WR)
        self.heard.append(recv_all(conn))


class Echo:
    """Echoes until the end, and writes down how that end came: eof or reset."""

    def __init__(self) -> None:
        self.ends: list[str] = []

    def __call__(self, conn: socket.socket) -> None:
        self.ends.append(ending(conn, echo=True))


def ending(sock: socket.socket, echo: bool = False) -> str:
    """Read until the connection ends: 'eof' (a FIN), 'reset' (a RST) or 'nothing' (no end in 15 s)."""
    sock.settimeout(15)
    try:
        while data := sock.recv(65536):
            if echo:
                sock.sendall(data)
        return "eof"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except TimeoutError:
        return "nothing"


# --- the traffic --------------------------------------------------------------------

def answers(world: PodWorld) -> dict[str, Any]:
    """Which upstream answered each connection."""
    def who(addr: tuple[str, int]) -> str:
        with world.pod.connect(addr) as c:
            return recv_line(c).strip()

    turns = [who((ANY, P_RR)) for _ in range(6)]
    # Envoy starts its round robin at a random endpoint: compare the cycle from rr-1 on
    start = turns.index("rr-1") if "rr-1" in turns else 0
    return {
        "passthrough": [who(WEB), who(WEB6)],
        "round_robin": turns[start:] + turns[:start],
        "retry": [who((ANY, P_RETRY)) for _ in range(4)],
    }


def bytes_and_half_close(world: PodWorld, speaker: Speaker) -> dict[str, Any]:
    """1 MiB up, the client's FIN, the answer after it; 1 MiB down, the server's FIN, bytes up after it.
    A socket error is an observation too (the other side may not have had it)."""
    seen: dict[str, Any] = {}
    try:
        with world.pod.connect(SINK) as c:
            c.sendall(PAYLOAD)
            c.shutdown(socket.SHUT_WR)
            c.settimeout(15)
            seen["upload intact, answer after the client's FIN"] = (
                recv_line(c) == f"{len(PAYLOAD)} {hashlib.sha256(PAYLOAD).hexdigest()}\n")
            seen["then"] = ending(c)
    except OSError as exc:
        seen["upload"] = f"failed: {exc}"
    try:
        with world.pod.connect(SPEAKER) as c:
            c.settimeout(15)
            seen["download intact"] = recv_all(c) == PAYLOAD
            c.sendall(b"after your FIN\n" * 1000)
            c.shutdown(socket.SHUT_WR)  # the server's FIN came already: what ends now is for the server to see
    except OSError as exc:
        seen["download"] = f"failed: {exc}"
    deadline = time.monotonic() + 10
    while not speaker.heard and time.monotonic() < deadline:
        time.sleep(0.05)
    seen["bytes up after the server's FIN, then its end"] = bool(speaker.heard) and (
        speaker.heard[-1] == b"after your FIN\n" * 1000)
    return seen


def failures(world: PodWorld, pid: int) -> dict[str, str]:
    """How a connection whose upstream fails ends for a client that has sent nothing,
    for one that has sent bytes, and for one that has sent only its FIN (the last two
    while the proxy is stopped, so what they sent is there before it looks)."""
    seen = {}
    silent = {name: world.pod.connect(addr) for name, addr in FAILURES.items()}
    os.kill(pid, signal.SIGSTOP)
    try:
        spoke = {name: world.pod.connect(addr) for name, addr in FAILURES.items()}
        for sock in spoke.values():
            sock.sendall(b"hello\n")
        done = {name: world.pod.connect(addr) for name, addr in FAILURES.items()}
        for sock in done.values():
            sock.shutdown(socket.SHUT_WR)
    finally:
        os.kill(pid, signal.SIGCONT)
    for kind, socks in (("nothing sent", silent), ("bytes sent", spoke), ("only a FIN sent", done)):
        for name, sock in socks.items():
            with sock:
                seen[f"{name}, {kind}"] = ending(sock)
    return seen


def idle(world: PodWorld, echo: Echo) -> dict[str, Any]:
    """Kept busy past the idle timeout, then quiet until the proxy closes it."""
    with world.pod.connect((ANY, P_IDLE)) as c:
        c.settimeout(5)
        busy = []
        for i in range(4):  # 1.5 s of traffic: longer than the timeout, never idle for as long
            if i:
                time.sleep(IDLE_TIMEOUT / 2)
            c.sendall(b"ping\n")
            busy.append(recv_line(c) == "ping\n")
        quiet_from = time.monotonic()
        client_end = ending(c)
        not_before = time.monotonic() - quiet_from >= IDLE_TIMEOUT * 0.9
    deadline = time.monotonic() + 10
    while not echo.ends and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"kept open while busy": all(busy), "client sees": client_end, "not before the timeout": not_before,
            "server sees": echo.ends[-1] if echo.ends else "nothing"}


def logged(path: str, lines: int, timeout: float = 10.0) -> list[str]:
    """The access log's lines once there are `lines` of them (or after `timeout`), sorted."""
    deadline = time.monotonic() + timeout
    while True:
        text = Path(path).read_text() if Path(path).exists() else ""
        if text.count("\n") >= lines or time.monotonic() > deadline:
            return sorted(text.splitlines())
        time.sleep(0.1)


def observe(kind: str, bootstrap_path: str) -> dict[str, Any]:
    """Everything one subject's clients and servers saw, as plain data."""
    log = os.path.join(os.path.dirname(bootstrap_path), LOG)
    Path(log).unlink(missing_ok=True)
    world = PodWorld()
    speaker, echo = Speaker(), Echo()
    servers: list[ThreadedServer] = []
    try:
        world.remote.exec("iptables", "-A", "INPUT", "-d", SILENT[0], "-p", "tcp", "-j", "DROP")
        servers = [ThreadedServer(world.remote, WEB, identify("web")),
                   ThreadedServer(world.remote, WEB6, identify("web6")),
                   ThreadedServer(world.remote, SINK, sink), ThreadedServer(world.remote, SPEAKER, speaker),
                   ThreadedServer(world.remote, IDLE_ECHO, echo),
                   ThreadedServer(world.remote, RETRY_LIVE, identify("retry-live")),
                   *(ThreadedServer(world.remote, addr, identify(f"rr-{i}")) for i, addr in enumerate(RR, 1))]
        world.pod.exec("sh", str(REDIRECT), "--method", "uid", "--proxy-port", str(PORT))
        runner = subject(kind, world.pod, bootstrap_path)
        try:
            before = runner.settled_stats()
            seen = {"answers": answers(world), "bytes": bytes_and_half_close(world, speaker),
                    "failures": failures(world, runner.pid), "idle": idle(world, echo)}
            # a line for each connection of the logging chains, three of each (failures())
            seen["failure log"] = logged(log, 3 * len(LOGGED))
            after = runner.settled_stats()
            seen["stats"] = {name: value if name.endswith(GAUGES) else value - before.get(name, 0)
                             for name, value in after.items()}
        except BaseException:
            print(f"--- {kind}'s log:\n{runner.log()}")
            raise
        finally:
            runner.stop()
        return seen
    finally:
        for server in servers:
            server.close()
        world.close()


@pytest.fixture(scope="module")
def observed(netns_prerequisites):
    """subject -> what it saw; each subject runs once, when a test first asks."""
    directory = tempfile.mkdtemp(prefix="scp-conformance-")
    os.chmod(directory, 0o777)  # the access log is written as UID 1337
    try:
        path = write_bootstrap(directory, bootstrap(os.path.join(directory, LOG)))
        yield functools.cache(functools.partial(observe, bootstrap_path=path))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def agree(observed, loop: str, aspect: str) -> dict[str, Any]:
    envoy, ours = observed("envoy")[aspect], observed(loop)[aspect]
    differ = {key: (envoy.get(key), ours.get(key)) for key in envoy.keys() | ours.keys()
              if envoy.get(key) != ours.get(key)}
    assert not differ, f"{aspect}: where sidecar-envoy ({loop}) differs from Envoy, (envoy, ours): {differ}"
    return envoy


@pytest.mark.parametrize("loop", LOOPS)
def test_the_same_upstream_answers(observed, loop):
    envoy = agree(observed, loop, "answers")
    assert envoy["passthrough"] == ["web", "web6"]
    assert sorted(envoy["round_robin"]) == ["rr-1", "rr-1", "rr-2", "rr-2", "rr-3", "rr-3"]
    assert envoy["retry"] == ["retry-live"] * 4


@pytest.mark.parametrize("loop", LOOPS)
def test_bytes_and_half_close_both_ways(observed, loop):
    envoy = agree(observed, loop, "bytes")
    assert envoy == {"upload intact, answer after the client's FIN": True, "then": "eof", "download intact": True,
                     "bytes up after the server's FIN, then its end": True}


@pytest.mark.parametrize("loop", LOOPS)
def test_an_upstream_that_fails_ends_the_client_alike(observed, loop):
    envoy = agree(observed, loop, "failures")
    assert set(envoy.values()) <= {"eof", "reset"}, envoy  # ended, one way or the other


@pytest.mark.parametrize("loop", LOOPS)
def test_idle_timeout(observed, loop):
    envoy = agree(observed, loop, "idle")
    assert envoy["kept open while busy"] and envoy["not before the timeout"], envoy
    assert envoy["client sees"] in ("eof", "reset") and envoy["server sees"] in ("eof", "reset"), envoy


@pytest.mark.parametrize("loop", LOOPS)
def test_stats_move_alike(observed, loop):
    """Every stat both emit moved by as much (a gauge: ended alike), but where Envoy is random."""
    envoy, ours = observed("envoy")["stats"], observed(loop)["stats"]
    shared = sorted(set(envoy) & set(ours))
    for family in ("listener.0.0.0.0_15001.", "cluster.timed-out.", "cluster.BlackHoleCluster.", "tcp.idle."):
        assert any(n.startswith(family) for n in shared), f"no {family} stats in common"
    differ = [f"{name}: envoy {envoy[name]}, sidecar-envoy {ours[name]}" for name in shared
              if not name.startswith(NOT_COMPARED) and not name.endswith((*NEVER_COUNTED, *TIMING, *SWEPT))
              and envoy[name] != ours[name]]
    assert not differ, f"stats that moved differently ({loop}):\n  " + "\n  ".join(differ)


@pytest.mark.parametrize("loop", LOOPS)
def test_failures_are_logged_alike(observed, loop):
    """The access log of each connection that found no upstream: its response flags and bytes."""
    envoy, ours = observed("envoy")["failure log"], observed(loop)["failure log"]
    assert len(envoy) == 3 * len(LOGGED), envoy
    assert ours == envoy, f"access-log lines, envoy:\n{envoy}\nsidecar-envoy ({loop}):\n{ours}"
