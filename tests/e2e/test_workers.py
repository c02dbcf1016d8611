"""--concurrency N: a supervisor, N worker processes on SO_REUSEPORT, one admin API.

Real namespaces and rules as everywhere in tests/e2e; the proxy runs as UID
1337 with no capabilities, and so do its workers.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

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
from proxy.control.watchdog import RESTART_LIMIT

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


def closed_for_a_refused_upstream(w, addr) -> None:
    """The client sends nothing, its upstream refuses: closed with a FIN, as Envoy does."""
    with w.pod.connect(addr) as c:
        assert c.recv(1) == b""


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
            closed_for_a_refused_upstream(w, ("198.51.100.11", 80))  # nobody listens there
        time.sleep(0.3)
        assert not any("upstream connect failed" in e.get("msg", "") for e in proxy.lines)
        admin(w.pod, "POST", "/logging?level=info")
        for _ in range(6):
            closed_for_a_refused_upstream(w, ("198.51.100.11", 80))
        failed = wait_until(lambda: [e for e in proxy.lines if "upstream connect failed" in e.get("msg", "")],
                            what="connect failures logged again")
        assert all(e.get("worker") in (0, 1) for e in failed)

        c = w.pod.connect(SERVICE)
        c.sendall(b"before")
        assert c.recv(6) == b"before"
        assert admin(w.pod, "POST", "/drain_listeners").status == 200
        wait_until(lambda: stopped_on_every_worker(proxy), what="every worker's listeners stopped")
        assert admin(w.pod, "GET", "/ready").brief() == (200, "LIVE\n")  # as Envoy 1.40
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


def started_pids(proxy: ProxyProcess) -> list[int]:
    """The workers' pids by index, from the supervisor's line "2 workers started: pid X, pid Y"."""
    line = proxy.wait_for(lambda e: " workers started: " in e.get("msg", ""))["msg"]
    return [int(part.split()[1]) for part in line.split(": ", 1)[1].split(", ")]


def started_again(proxy: ProxyProcess, index: int, nth: int = 1, timeout: float = 30.0) -> int:
    """The pid of the nth replacement of worker `index`."""
    prefix = f"worker {index} started again: pid "

    def again() -> list[dict]:
        return [e for e in proxy.lines if e.get("msg", "").startswith(prefix)]

    proxy.wait_for(lambda _: len(again()) >= nth, timeout=timeout, what=f"replacement {nth} of worker {index}")
    return int(again()[nth - 1]["msg"].removeprefix(prefix))


def held_connections(w, n: int) -> dict[int, list]:
    """n open connections through the proxy, each echoing, by the index of the worker that has it."""
    conns = []
    for i in range(n):
        c = w.pod.connect(SERVICE, timeout=5)
        c.sendall(b"%d" % i)
        assert c.recv(8) == b"%d" % i
        conns.append(c)
    ids = {int(e["source"].rpartition(":")[2]): e["id"] for e in admin(w.pod, "GET", "/connections").json()["connections"]}
    by_worker: dict[int, list] = {0: [], 1: []}
    for c in conns:
        by_worker[(ids[c.getsockname()[1]] - 1) % 2].append(c)
    return by_worker


def all_echo(w, n: int) -> None:
    for i in range(n):
        with w.pod.connect(SERVICE, timeout=5) as c:
            c.sendall(b"new%d" % i)
            assert c.recv(8) == b"new%d" % i


def test_a_killed_worker_resets_its_clients_and_is_started_again(uid_world):
    """kill -9 of one worker: its clients see a reset (not a clean end), the other
    worker's connections go on, and a new worker takes its place."""
    w = uid_world
    srv = Server(w.remote, SERVICE, echo)
    proxy = ProxyProcess(w.pod, args=("--concurrency", "2"))
    conns: dict[int, list] = {0: [], 1: []}
    try:
        first, second = started_pids(proxy)
        conns = held_connections(w, 20)
        assert conns[0] and conns[1], "one worker took every connection"
        before = stats_of(w.pod)  # (the supervisor now has the workers' counters)
        assert before["listener.[__]_5001.downstream_cx_total"] == 20
        os.kill(first, signal.SIGKILL)
        for c in conns[0]:  # cut mid-stream: a reset, never an EOF that looks like a complete answer
            c.settimeout(5)
            with pytest.raises(ConnectionResetError):
                c.recv(1)
        for i, c in enumerate(conns[1]):  # the other worker's connections survive
            c.sendall(b"still%d" % i)
            assert c.recv(8) == b"still%d" % i
        third = started_again(proxy, 0)
        assert third not in (first, second) and not gone(third)
        wait_until(lambda: admin(w.pod, "GET", "/ready").brief() == (200, "LIVE\n"), timeout=10, what="LIVE")
        all_echo(w, 20)
        # the dead worker's counters stay in the sums; its gauges left with it
        stats = wait_until(lambda: (x := stats_of(w.pod))["listener.[__]_5001.downstream_cx_active"] == len(conns[1])
                           and x, what="the closed connections to end")
        assert stats["server.worker_restarts"] == 1
        assert stats["listener.[__]_5001.downstream_cx_total"] == 40
        errors = [e["msg"] for e in proxy.lines if e.get("level") == "error"]
        assert f"worker 0 (pid {first}) ended on its own (exit status -9); starting it again in 0.25s" in errors
        for c in conns[1]:
            c.close()
        assert proxy.stop() == 0
    finally:
        for c in conns[0] + conns[1]:
            c.close()
        proxy.stop()
        srv.close()


def test_a_stopped_worker_makes_ready_503_and_is_replaced(uid_world):
    """SIGSTOP: the worker stops answering its watchdog; /ready says 503, and the
    worker is killed and started again; new connections do not hang."""
    w = uid_world
    srv = Server(w.remote, SERVICE, echo)
    proxy = ProxyProcess(w.pod, args=("--concurrency", "2"))
    stopped = None
    try:
        stopped = started_pids(proxy)[0]
        os.kill(stopped, signal.SIGSTOP)
        wait_until(lambda: admin(w.pod, "GET", "/ready").brief() == (503, "DRAINING\n"), timeout=10,
                   what="/ready to say 503")
        proxy.wait_for(lambda e: e.get("msg", "") == f"worker 0 (pid {stopped}) has not answered for 2s: /ready "
                       "answers 503 until it does", what="the watchdog's warning")
        started_again(proxy, 0)
        assert gone(stopped)
        wait_until(lambda: admin(w.pod, "GET", "/ready").brief() == (200, "LIVE\n"), timeout=10, what="LIVE again")
        all_echo(w, 20)
        stats = stats_of(w.pod)
        assert stats["server.watchdog_miss"] >= 1 and stats["server.worker_restarts"] == 1
        assert proxy.stop() == 0
    finally:
        if stopped is not None and not gone(stopped):
            os.kill(stopped, signal.SIGKILL)
        proxy.stop()
        srv.close()


def test_a_worker_that_keeps_dying_is_given_up_on(uid_world):
    """A crash loop does not spin: each restart waits twice as long as the one
    before, and a death beyond the bound stops the proxy with exit 1."""
    w = uid_world
    proxy = ProxyProcess(w.pod, args=("--concurrency", "2"))
    try:
        victim = started_pids(proxy)[0]
        for nth in range(1, RESTART_LIMIT + 1):
            os.kill(victim, signal.SIGKILL)
            victim = started_again(proxy, 0, nth)
        os.kill(victim, signal.SIGKILL)
        assert proxy.proc.wait(30) == 1
        errors = [e["msg"] for e in proxy.lines if e.get("level") == "error"]
        waits = [m.rpartition(" in ")[2] for m in errors if "starting it again in" in m]
        assert waits == ["0.25s", "0.5s", "1s", "2s", "4s"], errors
        assert errors[-1].endswith(f"the {RESTART_LIMIT + 1}th death of a worker within 60s: a crash loop; "
                                   "stopping the proxy"), errors
    finally:
        proxy.stop()


def test_a_proxy_folder_in_the_current_directory_does_not_shadow_the_package(uid_world):
    """Started from a directory holding a `proxy/` package (any source checkout),
    the workers, as UID 1337, still run the proxy's own code."""
    w = uid_world
    top = Path(tempfile.mkdtemp(prefix="scp-shadow-"))  # UID 1337 must reach it by its full path
    here = top / "checkout"
    (here / "proxy").mkdir(parents=True)
    marker = here / "ran"
    trap = f"open({str(marker)!r}, 'w').write('the wrong proxy ran')\nraise SystemExit(3)\n"
    for name in ("__init__.py", "__main__.py"):
        (here / "proxy" / name).write_text(trap)
    for path in (top, here, here / "proxy"):
        os.chmod(path, 0o777)  # UID 1337 may read it, and the trap may write its marker
    srv = Server(w.remote, SERVICE, identify("web"))
    proxy = ProxyProcess(w.pod, args=("--concurrency", "2"), cwd=str(here))
    try:
        for pid in children_of(proxy.pid):  # the workers run where the supervisor does, as UID 1337
            assert os.readlink(f"/proc/{pid}/cwd") == str(here)
            assert status_field(pid, "Uid").split()[:2] == ["1337", "1337"]
        for _ in range(10):
            with w.pod.connect(SERVICE) as c:
                assert recv_line(c) == "web 192.0.2.1\n"
        assert {e.get("worker") for e in proxy.lines if e.get("msg", "").startswith("listening on")} == {0, 1}
        assert not marker.exists()
        assert proxy.stop() == 0
    finally:
        proxy.stop()
        srv.close()
        shutil.rmtree(top)


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


def test_sigterm_to_the_whole_process_group_is_a_clean_stop(uid_world):
    """Ctrl-C in a shell, `timeout` and some runtimes signal every process of the
    group: workers that drain and exit 0 before the supervisor asks are no error."""
    w = uid_world
    proxy = ProxyProcess(w.pod, args=("--concurrency", "2", "--drain-timeout", "1s"))
    try:
        for pid in [proxy.pid, *children_of(proxy.pid)]:
            os.kill(pid, signal.SIGTERM)
        assert proxy.proc.wait(20) == 0
        errors = [e["msg"] for e in proxy.lines if e.get("level") == "error"]
        assert errors == [], errors
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
    for value, message in (("0", "--concurrency: 0 is not a number of workers (1-64, or auto)"),
                           ("lots", "--concurrency: 'lots' is not a number of workers (1-64, or auto)")):
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
        wait_until(lambda: stopped_on_every_worker(proxy), what="every worker's listeners stopped")
        with pytest.raises(ConnectionRefusedError):  # no socket of a worker takes connections
            w.pod.connect(SERVICE, timeout=2).close()
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.proc.wait(20)
        assert proxy.proc.returncode == 0
    finally:
        proxy.stop()


def stopped_on_every_worker(proxy) -> bool:
    """Both workers have logged that their listeners stopped (server.py)."""
    return {e.get("worker") for e in proxy.lines if e.get("msg", "").startswith("stopped inbound and outbound")} \
        == {0, 1}


def admin_up(w) -> bool:
    try:
        return admin(w.pod, "GET", "/ready").status in (200, 503)
    except OSError:
        return False
