"""--concurrency N: a supervisor, N worker processes on SO_REUSEPORT, one admin API.

Real namespaces and rules as everywhere in tests/e2e; the proxy runs as UID
1337 with no capabilities, and so do its workers.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from support import (
    ProxyProcess,
    Server,
    admin,
    children_of,
    echo,
    identify,
    recv_line,
    stats_of,
    status_field,
    wait_until,
)

from proxy.control.lifecycle import LISTENER_DELAY_ENV

pytestmark = pytest.mark.netns

SERVICE = ("198.51.100.10", 80)


def gone(pid: int) -> bool:
    try:
        return status_field(pid, "State").startswith("Z")  # exited, not yet reaped by its parent
    except (OSError, StopIteration):
        return True


def reset_by_the_proxy(w, addr) -> None:
    # the RST may even beat connect()'s return
    with pytest.raises(ConnectionResetError), w.pod.connect(addr) as c:
        c.recv(1)


def test_workers_share_the_port_and_answer_as_one_proxy(uid_world, loop_name):
    w = uid_world
    srv = Server(w.remote, SERVICE, identify("web"))
    proxy = ProxyProcess(w.pod, loop=loop_name, args=("--concurrency", "2"))
    held = []
    try:
        pids = children_of(proxy.pid)
        assert len(pids) == 2
        for pid in pids:  # the workers run as the proxy does: UID 1337, no capabilities
            assert status_field(pid, "Uid").split()[:2] == ["1337", "1337"]
            assert int(status_field(pid, "CapEff"), 16) == 0
        for _ in range(20):
            with w.pod.connect(SERVICE) as c:
                assert recv_line(c) == "web 192.0.2.1\n"
        entries = wait_until(lambda: len(proxy.access_entries()) == 20 and proxy.access_entries(), what="20 entries")
        ids = [e["id"] for e in entries]
        assert len(set(ids)) == 20, "connection ids repeat across workers"
        assert {i % 2 for i in ids} == {0, 1}, "one worker took every connection"
        for _ in range(16):  # open ones, listed by /connections whichever worker has them
            c = w.pod.connect(SERVICE)
            assert recv_line(c) == "web 192.0.2.1\n"
            held.append(c)
        s = stats_of(w.pod)
        assert s["listener.[__]_5001.downstream_cx_total"] == 36
        assert s["listener.[__]_5001.downstream_cx_active"] == 16
        assert s["chain.passthrough.cx_total"] == 36 and s["direction.outbound.cx_total"] == 36
        assert s["cluster.original_dst.upstream_cx_total"] == 36
        assert s["server.concurrency"] == 2 and s["server.total_connections"] == 16
        assert s["listener_manager.workers_started"] == 1 and s["server.state"] == 0
        listed = admin(w.pod, "GET", "/connections").json()
        assert listed["total"] == 16 and len(listed["connections"]) == 16
        assert {c["id"] % 2 for c in listed["connections"]} == {0, 1}
        hosts = admin(w.pod, "GET", "/clusters").body
        assert "original_dst::198.51.100.10:80::cx_active::16\n" in hosts
        assert admin(w.pod, "GET", "/ready").brief() == (200, "LIVE\n")
        for c in held:
            c.close()
        held.clear()
        assert proxy.stop() == 0
        assert all(gone(pid) for pid in pids)
    finally:
        for c in held:
            c.close()
        proxy.stop()
        srv.close()


def test_drain_logging_and_quitquitquit_reach_every_worker(uid_world):
    w = uid_world
    srv = Server(w.remote, SERVICE, echo)
    proxy = ProxyProcess(w.pod, args=("--concurrency", "2"))
    try:
        # A refused upstream is logged at info by whichever worker has the connection.
        admin(w.pod, "POST", "/logging?level=warning")
        for _ in range(6):
            reset_by_the_proxy(w, ("198.51.100.11", 80))  # nobody listens there
        time.sleep(0.3)
        assert not any("upstream connect failed" in e.get("msg", "") for e in proxy.lines)
        admin(w.pod, "POST", "/logging?level=info")
        for _ in range(6):
            reset_by_the_proxy(w, ("198.51.100.11", 80))
        failed = wait_until(lambda: [e for e in proxy.lines if "upstream connect failed" in e.get("msg", "")],
                            what="connect failures logged again")
        assert all(e.get("worker") in (0, 1) for e in failed)

        c = w.pod.connect(SERVICE)
        c.sendall(b"before")
        assert c.recv(6) == b"before"
        assert admin(w.pod, "POST", "/drain_listeners").status == 200
        wait_until(lambda: admin(w.pod, "GET", "/ready").status == 503, what="DRAINING")
        time.sleep(0.2)
        for _ in range(6):  # no worker takes new connections any more
            with pytest.raises(ConnectionRefusedError):
                w.pod.connect(SERVICE, timeout=2).close()
        c.sendall(b"after")  # the open one goes on
        assert c.recv(5) == b"after"
        c.close()
        assert admin(w.pod, "POST", "/quitquitquit").status == 200
        proxy.proc.wait(20)
        assert proxy.proc.returncode == 0
    finally:
        proxy.stop()
        srv.close()


def test_a_worker_that_dies_ends_the_proxy(uid_world):
    w = uid_world
    proxy = ProxyProcess(w.pod, args=("--concurrency", "2"))
    try:
        first, second = children_of(proxy.pid)
        os.kill(first, signal.SIGKILL)
        proxy.proc.wait(20)
        assert proxy.proc.returncode == 1
        errors = [e["msg"] for e in proxy.lines if e.get("level") == "error"]
        assert any(f"(pid {first}) ended on its own (exit status -9)" in m for m in errors), errors
        wait_until(lambda: gone(second), timeout=10, what="the other worker to exit")
    finally:
        proxy.stop()


def test_workers_do_not_outlive_their_supervisor(uid_world):
    w = uid_world
    proxy = ProxyProcess(w.pod, args=("--concurrency", "2", "--drain-timeout", "1s"))
    try:
        pids = children_of(proxy.pid)
        proxy.proc.kill()
        proxy.proc.wait(10)
        wait_until(lambda: all(gone(pid) for pid in pids), timeout=10, what="the workers to exit")
    finally:
        proxy.stop()


def test_a_port_held_by_another_proxy_is_a_start_up_error(uid_world):
    """SO_REUSEPORT would let a second proxy of the same UID share the port; it must not."""
    w = uid_world
    first = ProxyProcess(w.pod, args=("--concurrency", "2"))
    try:
        second = ProxyProcess(w.pod, args=("--concurrency", "2", "--admin-port", "15001"), wait=False)
        second.proc.wait(20)
        assert second.proc.returncode == 1
        errors = [e["msg"] for e in second.lines if e.get("level") == "error"]
        assert errors == ["listener redirect: cannot bind [::]:5001: Address already in use"], errors
        second.stop(verbose=False)
        assert admin(w.pod, "GET", "/ready").brief() == (200, "LIVE\n")  # the first one still serves
    finally:
        first.stop()


def test_bad_concurrency_is_one_line(world):
    for value, message in (("0", "--concurrency: 0 is not a number of workers (1-64)"),
                           ("lots", "--concurrency: 'lots' is not a number of workers (1-64)")):
        proxy = ProxyProcess(world.pod, args=("--concurrency", value), wait=False)
        proxy.proc.wait(20)
        assert proxy.proc.returncode == 2
        assert proxy.raw == [f"sidecar-proxy: {message}"]
        proxy.stop(verbose=False)


def test_a_redirect_loop_across_workers_is_still_refused(world):
    """Rules that do not exempt the proxy: a looped connection may land on the
    other worker, which forwards it once more; the worker that made a socket
    refuses it when it comes back to it, so the chain ends and the proxy lives."""
    w = world
    for tool, lo in (("iptables", "127.0.0.1/32"), ("ip6tables", "::1/128")):
        w.pod.exec(tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "!", "-d", lo,
                   "-j", "REDIRECT", "--to-ports", "5001")
    srv = Server(w.remote, SERVICE, echo)
    proxy = ProxyProcess(w.pod, args=("--concurrency", "2"))
    try:
        for _ in range(5):
            reset_by_the_proxy(w, SERVICE)
        entries = wait_until(lambda: (e := proxy.access_entries()) and
                             sum(x["end"] == "loop_guard" for x in e) >= 5 and e, what="5 loops refused")
        time.sleep(0.5)
        assert len(proxy.access_entries()) == len(entries), "a loop went on after it was refused"
        assert len(entries) < 5 * 40  # each loop ended after a few hops (about two per loop with two workers)
        assert not srv.accepted
        assert admin(w.pod, "GET", "/ready").brief() == (200, "LIVE\n")
    finally:
        assert proxy.stop() == 0
        srv.close()


def test_a_drain_while_the_workers_start_leaves_nothing_listening(uid_world):
    w = uid_world
    proxy = ProxyProcess(w.pod, args=("--concurrency", "2"), env={LISTENER_DELAY_ENV: "1s"}, wait=False)
    try:
        wait_until(lambda: admin_up(w), timeout=10, what="the admin API")
        assert admin(w.pod, "POST", "/drain_listeners").status == 200
        time.sleep(2.5)  # the workers have started meanwhile
        assert proxy.alive()
        assert admin(w.pod, "GET", "/ready").brief() == (503, "DRAINING\n")
        with pytest.raises(ConnectionRefusedError):  # no socket of a worker takes connections
            w.pod.connect(SERVICE, timeout=2).close()
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.proc.wait(20)
        assert proxy.proc.returncode == 0
    finally:
        proxy.stop()


def admin_up(w) -> bool:
    try:
        return admin(w.pod, "GET", "/ready").status in (200, 503)
    except OSError:
        return False
