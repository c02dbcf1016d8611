"""The process log: off the event loop, bounded, rate-limited per kind (control/logs.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from proxy.control import logs


def run_logging(code: str, stderr: int | None = None) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter, after logs.setup("json", "info")."""
    program = "import json, logging\nfrom proxy.control import logs\nlogs.setup('json', 'info')\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", program], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE if stderr is None else stderr, text=True, timeout=60)


def test_a_writer_stuck_on_a_full_pipe_costs_dropped_lines_never_a_wait():
    """stderr is a pipe nobody reads: logging goes on, drops what does not fit, and the process still exits 0."""
    r, w = os.pipe()
    try:
        out = run_logging("""
            for i in range(3 * logs.QUEUE_LINES + 20000):
                logging.getLogger("proxy.server").info("line %d %s", i, "x" * 100)
            print(json.dumps(logs.counters()))
        """, stderr=w)
    finally:
        os.close(w)
        os.close(r)
    assert out.returncode == 0, out.stdout
    counts = json.loads(out.stdout)
    # the pipe took ~64 KiB, the queue QUEUE_LINES: the rest was dropped, none of it waited for
    assert counts[logs.DROPPED_STAT] >= 3 * logs.QUEUE_LINES + 20000 - logs.QUEUE_LINES - 1000
    assert counts[logs.SUPPRESSED_STAT] == 0  # the process's own lines are never rate-limited


def test_lines_are_written_whole_and_a_traceback_stays_in_its_line():
    out = run_logging("""
        log = logging.getLogger("proxy.listener")
        try:
            {}["missing"]
        except KeyError:
            log.exception("conn=%d failed while accepting", 7)
        logging.getLogger("proxy.server").info("bye %s", "now")
    """)
    assert out.returncode == 0
    first, second = (json.loads(line) for line in out.stderr.splitlines())
    assert first["msg"] == "conn=7 failed while accepting" and first["level"] == "error"
    assert "KeyError: 'missing'" in first["exc"]
    assert second["msg"] == "bye now"


def record(name: str, msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)


def test_per_connection_lines_are_rate_limited_per_kind(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    limit = logs.PerKindLimit()
    passed = [limit.filter(record("proxy.listener", "conn=%d refused", i)) for i in range(100)]
    assert passed == [True] * logs.SUPPRESS_BURST + [False] * (100 - logs.SUPPRESS_BURST)
    assert limit.suppressed == 100 - logs.SUPPRESS_BURST
    # another kind, and the process's own lines, have their own allowance
    assert limit.filter(record("proxy.listener", "conn=%d cannot splice", 1))
    assert all(limit.filter(record("proxy.server", "listening on %s", i)) for i in range(100))
    now[0] += logs.SUPPRESS_INTERVAL
    line = record("proxy.listener", "conn=%d refused", 101)
    assert limit.filter(line)
    assert line.getMessage() == f"conn=101 refused ({100 - logs.SUPPRESS_BURST} more like this in the 1s before " \
                                "were not logged)"


def test_asyncio_complaints_are_per_connection_too(monkeypatch):
    monkeypatch.setattr(logs.time, "monotonic", lambda: 5.0)
    limit = logs.PerKindLimit()
    passed = sum(limit.filter(record("asyncio", "socket.send() raised exception.")) for _ in range(50))
    assert passed == logs.SUPPRESS_BURST


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    logs.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_counters_show_what_was_left_out(restore_logging, monkeypatch):
    logs.setup("text", "info")
    monkeypatch.setattr(logs.time, "monotonic", lambda: 5.0)
    for i in range(logs.SUPPRESS_BURST + 3):
        logging.getLogger("proxy.listener").debug("conn=%d below the level", i)  # not even a record
        logging.getLogger("proxy.listener").warning("conn=%d refused", i)
    assert logs.counters() == {logs.DROPPED_STAT: 0, logs.SUPPRESSED_STAT: 3}
