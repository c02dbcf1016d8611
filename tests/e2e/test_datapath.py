"""The data path end to end: real namespaces, real REDIRECT rules, the proxy as UID 1337.

Each test builds its own pod and remote namespaces (the `world` fixtures),
installs the design note's UID-owner rules, starts `sidecar-proxy run` as
UID 1337 with no capabilities, and plays the app (in the pod) and the
services (in the remote namespace) itself.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import struct
import threading
import time

import pytest
from support import ProxyProcess, Server, digest_sink, echo, identify, recv_all, recv_line, stats_of, wait_until

pytestmark = pytest.mark.netns

MB = 1 << 20


def send_and_digest(sock: socket.socket, total: int) -> str:
    """Send `total` random-ish bytes, half-close, return what the server saw."""
    h = hashlib.sha256()
    block = os.urandom(MB)
    sent = 0
    while sent < total:
        chunk = block[: min(MB, total - sent)]
        sock.sendall(chunk)
        h.update(chunk)
        sent += len(chunk)
    sock.shutdown(socket.SHUT_WR)
    reply = recv_line(sock).split()
    assert reply == [str(total), h.hexdigest()], "bytes changed on the way"
    return reply[1]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_outbound_bytes_arrive_intact(uid_world, tmp_path, loop_name, family):
    """App -> remote service through the proxy; the default "::" listener takes
    IPv4 as v4-mapped (the dual-stack trap) and IPv6 natively."""
    w = uid_world
    addr = ("198.51.100.10", 80) if family == "ipv4" else ("2001:db8:2::10", 80)
    srv = Server(w.remote, addr, digest_sink)
    proxy = ProxyProcess(w.pod, loop=loop_name)
    try:
        assert proxy.status_field("Uid").split()[:2] == ["1337", "1337"]
        assert int(proxy.status_field("CapEff"), 16) == 0
        with w.pod.connect(addr) as c:
            send_and_digest(c, 8 * MB)
        entry = proxy.access(chain="passthrough")
        src = w.POD_V4 if family == "ipv4" else w.POD_V6
        assert entry["direction"] == "outbound" and entry["end"] == "done"
        assert entry["bytes_up"] == 8 * MB and entry["bytes_down"] == len(f"{8 * MB} ") + 65
        assert entry["source"].startswith(src if family == "ipv4" else f"[{src}]")
        # the server saw the pod's address: the proxy's upstream left from the pod IP
        assert srv.accepted[0][0] == src
    finally:
        assert proxy.stop() == 0
        srv.close()


def test_ipv4_on_a_plain_ipv4_socket(uid_world, tmp_path):
    """With separate 0.0.0.0 and :: listeners, IPv4 arrives on an AF_INET socket."""
    w = uid_world
    srv = Server(w.remote, ("198.51.100.10", 80), identify("web"))
    proxy = ProxyProcess(w.pod, config={"addresses": ["0.0.0.0", "::"]})
    try:
        assert len([e for e in proxy.lines if "listening on" in e.get("msg", "")]) == 2
        with w.pod.connect(("198.51.100.10", 80)) as c:
            assert recv_line(c) == "web 192.0.2.1\n"
        assert proxy.access()["destination"] == "198.51.100.10:80"
    finally:
        proxy.stop()
        srv.close()


CHAINS = {
    "clusters": [
        {"name": "web-v2", "endpoints": ["198.51.100.30:8080", "198.51.100.31:8080"], "connect_timeout": "1s"},
    ],
    "chains": [
        {"name": "to-web-v2", "match": {"ports": [80], "destinations": ["198.51.100.10/32"]}, "cluster": "web-v2"},
        {"name": "port-80", "match": {"ports": [80]}, "action": "original"},
        {"name": "no-smtp", "match": {"ports": [25]}, "action": "reject"},
        {"name": "v6-net", "match": {"destinations": ["2001:db8:2::/64"]}, "action": "original"},
        {"name": "v6-host-443", "match": {"destinations": ["2001:db8:2::44/128"], "ports": [443]}, "action": "reject"},
    ],
}


def test_chain_selection_decides_where_bytes_go(uid_world, tmp_path, loop_name):
    w = uid_world
    servers = [
        Server(w.remote, ("198.51.100.10", 80), identify("original-10")),
        Server(w.remote, ("198.51.100.11", 80), identify("original-11")),
        Server(w.remote, ("198.51.100.30", 8080), identify("v2-a")),
        Server(w.remote, ("198.51.100.31", 8080), identify("v2-b")),
        Server(w.remote, ("198.51.100.12", 25), identify("smtp")),
        Server(w.remote, ("2001:db8:2::44", 443), identify("v6-443")),
        Server(w.remote, ("2001:db8:2::44", 80), identify("v6-80")),
        Server(w.remote, ("2001:db8:2::44", 8443), identify("v6-8443")),
    ]
    proxy = ProxyProcess(w.pod, config=CHAINS, loop=loop_name)

    def who(addr):
        try:
            with w.pod.connect(addr) as c:
                line = recv_line(c)
                return line.split()[0] if line else "closed"
        except ConnectionResetError:
            return "reset"

    try:
        # the most specific chain (port + /32) sends 198.51.100.10:80 to the cluster, round robin
        assert [who(("198.51.100.10", 80)) for _ in range(4)] == ["v2-a", "v2-b", "v2-a", "v2-b"]
        assert who(("198.51.100.11", 80)) == "original-11"  # port-only chain
        assert who(("198.51.100.12", 25)) == "reset"  # reject chain
        assert who(("2001:db8:2::44", 443)) == "reset"  # port beats prefix
        assert who(("2001:db8:2::44", 80)) == "v6-80"  # port-80 chain: port beats prefix
        assert who(("2001:db8:2::44", 8443)) == "v6-8443"  # prefix chain
        assert proxy.access(destination="[2001:db8:2::44]:80")["chain"] == "port-80"
        assert proxy.access(chain="no-smtp")["end"] == "rejected"
        assert proxy.access(chain="to-web-v2")["upstream"] in ("198.51.100.30:8080", "198.51.100.31:8080")
        assert proxy.access(chain="v6-net")["destination"] == "[2001:db8:2::44]:8443"
        assert not any(s.addr[1] == 25 and s.accepted for s in servers), "a rejected connection reached its server"
    finally:
        proxy.stop()
        for s in servers:
            s.close()


def test_cluster_tries_next_endpoint_when_one_fails(uid_world, tmp_path, loop_name):
    """.50 fails at once (no route: connect() says so), .40 refuses (a RST later),
    .41 answers: every connection ends up there, with what the client sent first."""
    w = uid_world
    w.pod.exec("ip", "route", "add", "unreachable", "198.51.100.50/32")
    cfg = {"clusters": [{"name": "c", "endpoints": ["198.51.100.50:80", "198.51.100.40:80", "198.51.100.41:80"]}],
           "chains": [{"name": "all", "cluster": "c"}]}
    srv = Server(w.remote, ("198.51.100.41", 80), echo)  # .40 has no listener
    proxy = ProxyProcess(w.pod, config=cfg, loop=loop_name)
    try:
        for i in range(3):  # round robin starts each one further along; all end at .41
            with w.pod.connect(("203.0.113.5", 9)) as c:
                c.sendall(b"hello %d" % i)
                assert c.recv(16) == b"hello %d" % i
        entries = wait_until(lambda: len(proxy.access_entries()) == 3 and proxy.access_entries(), what="3 entries")
        assert {e["upstream"] for e in entries} == {"198.51.100.41:80"}
        stats = stats_of(w.pod)
        assert stats["cluster.c.upstream_cx_total"] == 3 + 2 + 1  # every attempt counts
        assert stats["cluster.c.upstream_cx_connect_fail"] == 2 + 1
    finally:
        proxy.stop()
        srv.close()


def test_a_client_that_only_half_closes_still_gets_its_answer_at_once(uid_world, tmp_path, loop_name):
    """A FIN and nothing else, to a server that answers the FIN: nothing written
    can tell the proxy its upstream is up, so it has to look."""
    w = uid_world

    def answer_at_eof(conn):
        assert conn.recv(1) == b""
        conn.sendall(b"bye\n")

    srv = Server(w.remote, ("198.51.100.10", 80), answer_at_eof)
    proxy = ProxyProcess(w.pod, loop=loop_name)  # connect timeout 5s
    try:
        for _ in range(3):
            start = time.monotonic()
            with w.pod.connect(("198.51.100.10", 80)) as c:
                c.shutdown(socket.SHUT_WR)
                assert recv_line(c) == "bye\n"
            assert time.monotonic() - start < 1.0
    finally:
        proxy.stop()
        srv.close()


def test_half_close_keeps_the_other_direction_open(uid_world, tmp_path, loop_name):
    """Client FIN: the server still answers. Server FIN: the client can still send."""
    w = uid_world

    seen = []

    def server_closes_first(conn):
        conn.sendall(b"bye\n")
        conn.shutdown(socket.SHUT_WR)
        seen.append(hashlib.sha256(recv_all(conn)).hexdigest())

    srv = Server(w.remote, ("198.51.100.10", 80), digest_sink)
    srv2 = Server(w.remote, ("198.51.100.10", 81), server_closes_first)
    proxy = ProxyProcess(w.pod, loop=loop_name)
    try:
        with w.pod.connect(("198.51.100.10", 80)) as c:
            send_and_digest(c, 3 * MB)  # send, FIN, then read the answer
            assert c.recv(1) == b""  # and then the server's FIN
        with w.pod.connect(("198.51.100.10", 81)) as c:
            assert recv_line(c) == "bye\n"
            assert c.recv(1) == b""  # the server's FIN arrived ...
            payload = os.urandom(MB)
            c.sendall(payload)  # ... and our direction still works
            c.shutdown(socket.SHUT_WR)
            assert c.recv(1) == b""
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == [hashlib.sha256(payload).hexdigest()]
        for port in (80, 81):  # both ended normally, each in its own access-log line
            assert proxy.access(destination=f"198.51.100.10:{port}")["end"] == "done"
        assert len(proxy.access_entries()) == 2
    finally:
        proxy.stop()
        srv.close()
        srv2.close()


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("size", [1, 4 * MB], ids=["small", "spliced"])
def test_reset_is_propagated_both_ways(uid_world, tmp_path, loop_name, size):
    """A RST from either side becomes a RST on the other: after a few bytes, and
    in the middle of a bulk transfer that a splice pump is moving."""
    w = uid_world
    got_reset = threading.Event()

    def server_resets(conn):
        n = 0
        while n < size:
            n += len(conn.recv(1 << 20))
        _reset(conn)

    def server_waits(conn):
        try:
            while conn.recv(1 << 20):
                pass
        except ConnectionResetError:
            got_reset.set()

    s1 = Server(w.remote, ("198.51.100.10", 80), server_resets)
    s2 = Server(w.remote, ("198.51.100.10", 81), server_waits)
    proxy = ProxyProcess(w.pod, loop=loop_name)
    block = b"x" * min(size, MB)
    try:
        # the server resets: a reset, not an orderly EOF
        with w.pod.connect(("198.51.100.10", 80), timeout=10) as c, pytest.raises(ConnectionResetError):
            for _ in range(64 if size > 1 else 1):
                c.sendall(block)
            c.recv(10)
        assert proxy.access(destination="198.51.100.10:80")["end"] == "upstream_reset"
        c = w.pod.connect(("198.51.100.10", 81), timeout=10)  # the client resets
        for _ in range(8 if size > 1 else 1):
            c.sendall(block)
        time.sleep(0.2)
        _reset(c)
        assert got_reset.wait(5), "the server saw a FIN, not a RST"
        assert proxy.access(destination="198.51.100.10:81")["end"] == "downstream_reset"
        if size > 1:
            assert stats_of(w.pod)["splice.pumps_total"] >= 2
    finally:
        proxy.stop()
        s1.close()
        s2.close()


def test_upstream_refused_or_timing_out_closes_the_client_promptly(uid_world, tmp_path, loop_name):
    w = uid_world
    # the remote silently drops SYNs to port 81: a connect that never completes
    w.remote.exec("iptables", "-A", "INPUT", "-p", "tcp", "--dport", "81", "-j", "DROP")
    proxy = ProxyProcess(w.pod, loop=loop_name, args=("--connect-timeout", "300ms"))
    try:
        for port, end in ((80, "connect_failed"), (81, "connect_timeout")):
            start = time.monotonic()
            with w.pod.connect(("198.51.100.10", port)) as c:
                assert c.recv(1) == b""  # a FIN: the client sent nothing (Envoy's way; a RST if it had)
            assert time.monotonic() - start < 2.0
            assert proxy.access(destination=f"198.51.100.10:{port}")["end"] == end
    finally:
        proxy.stop()


def test_idle_timeout_closes_quiet_connections(uid_world, tmp_path):
    w = uid_world
    srv = Server(w.remote, ("198.51.100.10", 80), echo)
    proxy = ProxyProcess(w.pod, args=("--idle-timeout", "700ms"))
    try:
        with w.pod.connect(("198.51.100.10", 80)) as c:
            for _ in range(4):  # activity keeps it open past the timeout
                c.sendall(b"ping")
                assert c.recv(4) == b"ping"
                last = time.monotonic()
                time.sleep(0.3)
            assert c.recv(1) == b""  # then silence closes it
            assert 0.6 < time.monotonic() - last < 2.5
        assert proxy.access()["end"] == "idle_timeout"
    finally:
        proxy.stop()
        srv.close()


def test_slow_reader_keeps_proxy_memory_bounded(uid_world, tmp_path, loop_name):
    """A fast sender pushes 200 MB at a reader that takes its time: the proxy
    must hold back the sender (backpressure) instead of buffering."""
    w = uid_world
    total = 200 * MB

    def slow_reader(conn):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        h, n = hashlib.sha256(), 0
        time.sleep(1.0)  # first, not at all
        while data := conn.recv(256 * 1024):
            h.update(data)
            n += len(data)
        conn.sendall(f"{n} {h.hexdigest()}\n".encode())

    srv = Server(w.remote, ("198.51.100.10", 80), slow_reader)
    proxy = ProxyProcess(w.pod, loop=loop_name)
    samples = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append(proxy.rss_kib())
            time.sleep(0.05)

    try:
        baseline = proxy.rss_kib()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with w.pod.connect(("198.51.100.10", 80), timeout=60) as c:
            send_and_digest(c, total)
        done.set()
        sampler.join()
        growth_mib = (max(samples) - baseline) / 1024
        assert growth_mib < 24, f"proxy memory grew by {growth_mib:.1f} MiB while relaying 200 MB"
        assert proxy.access()["bytes_up"] == total
    finally:
        done.set()
        proxy.stop()
        srv.close()


# --- bulk: splice pumps ---------------------------------------------------------------

def pseudo_random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def send_stream(n: int, seed: int):
    """A server that sends `n` bytes nobody could guess, then closes."""
    def handler(conn: socket.socket) -> None:
        conn.sendall(pseudo_random(n, seed))
    return handler


@pytest.mark.parametrize("splice", ["auto", "off"])
def test_bulk_transfers_go_through_splice_pumps(uid_world, tmp_path, loop_name, splice):
    """Uploads and downloads of 16 MiB arrive intact; with splice auto each
    bulk direction was moved by a pump, with splice off by copying."""
    w = uid_world
    sink = Server(w.remote, ("198.51.100.10", 80), digest_sink)
    source = Server(w.remote, ("198.51.100.10", 81), send_stream(16 * MB, seed=5))
    proxy = ProxyProcess(w.pod, loop=loop_name, args=("--splice", splice))
    try:
        with w.pod.connect(("198.51.100.10", 80), timeout=30) as c:
            send_and_digest(c, 16 * MB)
        with w.pod.connect(("198.51.100.10", 81), timeout=30) as c:
            got = recv_all(c)
        assert hashlib.sha256(got).digest() == hashlib.sha256(pseudo_random(16 * MB, seed=5)).digest()
        assert proxy.access(destination="198.51.100.10:80")["bytes_up"] == 16 * MB
        assert proxy.access(destination="198.51.100.10:81")["bytes_down"] == 16 * MB
        stats = stats_of(w.pod)
        if splice == "auto":
            assert stats["splice.pumps_total"] >= 2  # the upload's and the download's bulk direction
            assert stats["splice.pumps_active"] == 0 and stats["splice.unavailable"] == 0
        else:
            assert "splice.pumps_total" not in stats
        assert stats["listener.[__]_5001.downstream_cx_rx_bytes_total"] == 16 * MB
    finally:
        proxy.stop()
        sink.close()
        source.close()


def test_bulk_is_copied_when_no_descriptors_are_left_for_a_pump(uid_world, tmp_path, loop_name):
    """A pump needs four more descriptors; without them the direction keeps copying."""
    w = uid_world
    limit = 64
    sink = Server(w.remote, ("198.51.100.10", 80), digest_sink)
    idle = Server(w.remote, ("198.51.100.10", 81), echo)
    proxy = ProxyProcess(w.pod, loop=loop_name, prefix=("prlimit", f"--nofile={limit}:{limit}", "--"))
    held = []
    try:
        def left() -> int:
            return limit - len(os.listdir(f"/proc/{proxy.pid}/fd"))
        while left() >= 4:  # leave two or three: the bulk connection takes two, a pipe needs two more
            c = w.pod.connect(("198.51.100.10", 81), timeout=5)
            c.sendall(b"x")
            assert c.recv(1) == b"x"  # relayed: both of its descriptors are open
            held.append(c)
        with w.pod.connect(("198.51.100.10", 80), timeout=30) as c:
            send_and_digest(c, 8 * MB)
        for c in held:
            c.close()
        assert proxy.access(destination="198.51.100.10:80")["bytes_up"] == 8 * MB
        stats = wait_until(lambda: (s := stats_of(w.pod))["listener.[__]_5001.downstream_cx_active"] == 0 and s)
        assert stats["splice.unavailable"] >= 1 and stats["splice.pumps_total"] == 0
        assert any("EMFILE making a splice pump" in e.get("msg", "") for e in proxy.lines)
    finally:
        for c in held:
            c.close()
        proxy.stop()
        sink.close()
        idle.close()


def test_an_idle_timeout_with_bytes_stuck_in_a_pipe_resets(uid_world, tmp_path, loop_name):
    """A server that stops reading mid-upload: the idle timeout cannot deliver
    what sits in the splice pipe, so the server must see a RST, not a FIN that
    would make a cut-short upload look complete."""
    w = uid_world
    seen = {}

    def stops_reading(conn):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        n = 0
        while n < 2 * MB:
            n += len(conn.recv(1 << 20))
        time.sleep(2.5)  # past the idle timeout
        try:
            while data := conn.recv(1 << 20):
                n += len(data)
            seen["end"] = "fin"
        except ConnectionResetError:
            seen["end"] = "reset"

    srv = Server(w.remote, ("198.51.100.10", 80), stops_reading)
    proxy = ProxyProcess(w.pod, loop=loop_name, args=("--idle-timeout", "700ms"))
    try:
        c = w.pod.connect(("198.51.100.10", 80), timeout=10)
        c.setblocking(False)
        block, sent, deadline = bytes(1 << 20), 0, time.monotonic() + 2
        while time.monotonic() < deadline:  # as much as the buffers take, until the proxy gives up
            try:
                sent += c.send(block)
            except BlockingIOError:
                time.sleep(0.01)
            except ConnectionResetError:  # the idle timeout reset us too
                break
        assert sent > 4 * MB
        wait_until(lambda: "end" in seen, timeout=10, what="the server to see the end")
        assert seen["end"] == "reset"
        assert proxy.access()["end"] == "idle_timeout"
        assert stats_of(w.pod)["splice.pumps_total"] >= 1
        c.close()
    finally:
        proxy.stop()
        srv.close()
