"""Liveness under faults: a log nobody reads, floods of bad connections.

Real namespaces and rules as everywhere in tests/e2e; the proxy runs as UID
1337 with no capabilities.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import termios
import time

import pytest
from support import ProxyProcess, Server, admin, echo, stats_of, wait_until

from proxy.control.logs import SUPPRESS_INTERVAL
from proxy.demo.netns import PodWorld

pytestmark = pytest.mark.netns

SERVICE = ("198.51.100.10", 80)
PIPE_SIZE = 65536  # Linux's default pipe capacity


def unread_bytes(proxy: ProxyProcess) -> int:
    """Bytes waiting in the proxy's stderr pipe."""
    assert proxy.proc.stderr is not None
    raw = fcntl.ioctl(proxy.proc.stderr.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", raw)[0]


def fill_stderr(proxy: ProxyProcess) -> None:
    """Fill the proxy's stderr pipe to the last byte (through /proc: a description
    of our own, non-blocking). Our reader may take one more chunk before it stops."""
    fd = os.open(f"/proc/{proxy.pid}/fd/2", os.O_WRONLY | os.O_NONBLOCK)
    try:
        while True:
            for chunk in (b"#" * 63 + b"\n", b"\n"):
                with contextlib.suppress(BlockingIOError):
                    while True:
                        os.write(fd, chunk)
            time.sleep(0.2)
            if unread_bytes(proxy) == PIPE_SIZE:
                return
    finally:
        os.close(fd)


def dial_directly(w) -> None:
    """Dial the redirected port from outside the pod; the proxy resets it (the RST may beat connect's return)."""
    with contextlib.suppress(ConnectionResetError):
        w.remote.connect((PodWorld.POD_V4, 5001), timeout=5).close()


def echoes(c, data: bytes) -> bool:
    c.sendall(data)
    return c.recv(len(data)) == data


def test_a_stalled_stderr_and_a_flood_of_direct_dials_stall_nothing(uid_world):
    """stderr is a pipe nobody reads; 1,000 peers dial :5001 directly (a
    warning each, and an access-log line each): the relays and /ready go on."""
    w = uid_world
    srv = Server(w.remote, SERVICE, echo)
    proxy = ProxyProcess(w.pod)
    try:
        before = w.pod.connect(SERVICE)
        assert echoes(before, b"before")
        proxy.reading.clear()  # nobody reads the proxy's stderr from now on ...
        fill_stderr(proxy)  # ... and it is full to the last byte: any write to it blocks
        for _ in range(1000):
            dial_directly(w)
        assert admin(w.pod, "GET", "/ready").brief() == (200, "LIVE\n")
        assert echoes(before, b"during")
        with w.pod.connect(SERVICE) as during:
            assert echoes(during, b"new")
        stats = wait_until(lambda: (s := stats_of(w.pod))["listener.[__]_5001.loop_guard_refused"] == 1000 and s,
                           what="1000 refusals counted")
        assert stats["server.log_lines_suppressed"] >= 1000 - 100, "the warnings were not rate-limited"
        assert unread_bytes(proxy) == PIPE_SIZE, "the pipe drained: it was not a stall"
        proxy.reading.set()
        time.sleep(SUPPRESS_INTERVAL)  # past the last one-second window of the flood
        dial_directly(w)  # a line after the flood says what was left out
        proxy.wait_for(lambda e: "more like this" in e.get("msg", "") and "dialled the redirected port" in e["msg"],
                       what="the count of warnings left out")
        before.close()
        assert proxy.stop() == 0
    finally:
        proxy.stop()
        srv.close()


def test_a_proxy_whose_stderr_is_stuck_still_stops(uid_world):
    """SIGTERM with log lines and access-log lines waiting for a pipe nobody
    reads: the proxy drains and exits 0 all the same (the writers are left behind)."""
    w = uid_world
    proxy = ProxyProcess(w.pod, args=("--drain-timeout", "1s"))
    try:
        proxy.reading.clear()
        fill_stderr(proxy)
        for _ in range(50):
            dial_directly(w)
        wait_until(lambda: stats_of(w.pod)["listener.[__]_5001.loop_guard_refused"] == 50, what="50 refusals")
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(20) == 0
    finally:
        proxy.stop()


def test_with_workers_the_log_counters_add_up(uid_world):
    """Every refused dial is a warning logged or one counted as left out, whichever
    worker had it: /stats adds the workers' counts up like any other counter."""
    w = uid_world
    proxy = ProxyProcess(w.pod, args=("--concurrency", "2"), access_log=False)
    try:
        for _ in range(300):
            dial_directly(w)
        wait_until(lambda: stats_of(w.pod)["listener.[__]_5001.loop_guard_refused"] == 300, what="300 refusals")
        stats = stats_of(w.pod)

        def logged() -> list[dict]:  # (the lines reach us a moment after /stats counts them)
            return [e for e in proxy.lines if "dialled the redirected port directly" in e.get("msg", "")]

        wait_until(lambda: len(logged()) + stats["server.log_lines_suppressed"] == 300,
                   what="lines logged + lines left out = 300")
        assert stats["server.log_lines_suppressed"] > 0
        assert {e["worker"] for e in logged()} == {0, 1}
        assert stats["server.log_lines_dropped"] == 0
    finally:
        proxy.stop()
