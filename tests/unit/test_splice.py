"""The splice pump's pipe: big enough, or no pump at all (the relay keeps copying)."""

from __future__ import annotations

import errno
import fcntl
import os
import socket

import pytest

from proxy.datapath import splice


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def refuse_sizes_above(limit: int, monkeypatch) -> None:
    """F_SETPIPE_SZ as for a UID over fs.pipe-user-pages-soft: nothing above `limit`."""
    real = fcntl.fcntl

    def fake(fd, cmd, arg=0):
        if cmd == splice._F_SETPIPE_SZ and arg > limit:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real(fd, cmd, arg)
    monkeypatch.setattr(splice.fcntl, "fcntl", fake)


def test_the_pipe_is_a_mebibyte():
    a, b = socket.socketpair()
    with a, b:
        pump = splice.Pump(None, None, None, a.fileno(), b.fileno())
        assert pump.capacity == splice.PIPE_SIZE
        pump.close()


def test_a_quarter_mebibyte_pipe_still_makes_a_pump(monkeypatch):
    refuse_sizes_above(splice.MIN_PIPE_SIZE, monkeypatch)
    a, b = socket.socketpair()
    with a, b:
        pump = splice.Pump(None, None, None, a.fileno(), b.fileno())
        assert pump.capacity == splice.MIN_PIPE_SIZE
        pump.close()


def test_no_pump_without_a_big_enough_pipe_and_nothing_left_open(monkeypatch):
    refuse_sizes_above(64 * 1024, monkeypatch)
    a, b = socket.socketpair()
    with a, b:
        before = open_fds()
        with pytest.raises(OSError) as caught:
            splice.Pump(None, None, None, a.fileno(), b.fileno())
        assert caught.value.errno == errno.ENOBUFS  # counted and logged as exhaustion by the listener
        assert open_fds() == before
