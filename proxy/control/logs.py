"""The process's logs: written off the event loop, bounded, in two formats.

Theory of operation
-------------------
Every line goes to stderr, one line per record, as text or JSON. Writing is
never done on the event loop: a full pipe nobody reads, or a slow terminal,
would otherwise stop every relay and the admin API with it (a peer that
dials the redirected port directly makes one warning per dial). So:

    logger.warning(...)           on the event loop: a dict lookup, a
      -> PerKindLimit             format of the message and one put_nowait
      -> BoundedQueueHandler      into a queue of QUEUE_LINES records
      ~> QueueListener thread     formats the line and os.write()s it
      -> _FdWriter                to a duplicate of the stderr descriptor

* **Bounded**: when the queue is full (the writer is stuck on a pipe nobody
  reads), a record is dropped and counted (`server.log_lines_dropped`).
* **Rate-limited per kind**: the loggers that log per connection (the data
  path's, and asyncio's own per-transport complaints) may each write
  SUPPRESS_BURST lines of one kind (one message template) per
  SUPPRESS_INTERVAL seconds; the rest are counted
  (`server.log_lines_suppressed`) and the next line of that kind says how
  many were left out. Lines about the process itself are never limited.
* **Never through sys.stderr**: the writer uses os.write on its own
  descriptor. A thread stuck in sys.stderr.write holds that stream's lock,
  and the interpreter aborts at exit when it cannot take it ("could not
  acquire lock ... at interpreter shutdown"); os.write holds no lock.
* **Whole lines**: one write per line; a pipe keeps a write of up to
  PIPE_BUF bytes whole, so workers sharing the supervisor's stderr never cut
  each other's lines.

`close()` (also run at exit) gives the writer a moment to write what is
queued, then leaves it: a process whose stderr is stuck still exits.

A worker of a multi-process proxy (supervisor.py) tags its lines with its
index. Levels use Envoy's names on the admin API (`/logging?level=debug`);
`apply_levels` is what that endpoint, and a worker told about it by its
supervisor, does.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import os
import queue
import select
import sys
import time
from collections.abc import Sequence

from .envoylog import SpdlogFormatter

# Envoy's log level names -> Python's (`off` is above every level we log at)
LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL, "off": logging.CRITICAL + 10}

QUEUE_LINES = 4096  # records waiting for the writer; more are dropped and counted
SUPPRESS_INTERVAL = 1.0  # seconds
SUPPRESS_BURST = 5  # lines of one kind per interval from a per-connection logger
# Loggers that write per connection: the data path's, and asyncio's complaints
# about single transports ("socket.send() raised exception.", ...).
PER_CONNECTION_LOGGERS = ("proxy.listener", "asyncio")
CLOSE_WAIT = 2.0  # seconds close() waits for the writer to write what is queued

DROPPED_STAT = "server.log_lines_dropped"
SUPPRESSED_STAT = "server.log_lines_suppressed"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a traceback, if any, stays inside its line."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        if self.worker is not None:
            entry["worker"] = self.worker
        exc = record.exc_text or (self.formatException(record.exc_info) if record.exc_info else None)
        if exc:
            entry["exc"] = exc
        return json.dumps(entry, separators=(",", ":"))


class _Window:
    __slots__ = ("start", "lines", "left_out")

    def __init__(self, start: float) -> None:
        self.start, self.lines, self.left_out = start, 1, 0


class PerKindLimit(logging.Filter):
    """At most SUPPRESS_BURST lines of one kind (logger and message template)
    per SUPPRESS_INTERVAL from the per-connection loggers; the rest counted."""

    def __init__(self) -> None:
        super().__init__()
        self.suppressed = 0  # in all
        self._windows: dict[tuple[str, str], _Window] = {}  # by kind

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(PER_CONNECTION_LOGGERS):
            return True
        now = time.monotonic()
        kind = (record.name, record.msg if isinstance(record.msg, str) else type(record.msg).__name__)
        window = self._windows.get(kind)
        if window is not None and now - window.start < SUPPRESS_INTERVAL:
            if window.lines < SUPPRESS_BURST:
                window.lines += 1
                return True
            window.left_out += 1
            self.suppressed += 1
            return False
        if len(self._windows) > 1000:  # kinds are message templates, a few dozen: never let them pile up
            self._windows.clear()
        self._windows[kind] = _Window(now)
        if window is not None and window.left_out:
            record.msg = (f"{record.getMessage()} ({window.left_out} more like this in the "
                          f"{now - window.start:.0f}s before were not logged)")
            record.args = None
        return True


class BoundedQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread; never waits: a full queue drops the record."""

    def __init__(self, limit: PerKindLimit) -> None:
        super().__init__(queue.Queue(QUEUE_LINES))
        self.dropped = 0
        self.limit = limit
        self.addFilter(limit)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """The message made here (its arguments may change once we return);
        a traceback as text, so the writer's formatter can place it."""
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _FdWriter:
    """The writer thread's end (QueueListener calls `handle`): one os.write per line."""

    level = logging.NOTSET

    def __init__(self, fd: int, formatter: logging.Formatter) -> None:
        self.fd, self.formatter = fd, formatter

    def handle(self, record: logging.LogRecord) -> None:
        try:
            line = self.formatter.format(record)
        except Exception as exc:  # a record that cannot be formatted must not stop the writer
            line = f"log: cannot format a record of {record.name}: {exc!r}"
        write_all(self.fd, (line + "\n").encode("utf-8", "backslashreplace"))


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`, waiting as long as it takes (in a thread,
    never on the event loop); a reader that went away loses the rest."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:  # someone made the descriptor non-blocking
            poll = select.poll()  # (select() cannot take a descriptor above 1023)
            poll.register(fd, select.POLLOUT)
            poll.poll()
        except InterruptedError:
            continue
        except OSError:  # EPIPE, EBADF, ...: nobody reads any more
            return


class WriterThread(logging.handlers.QueueListener):
    """The standard library's writer thread, with a stop that cannot hang."""

    def stop_within(self, timeout: float) -> bool:
        """QueueListener.stop(), bounded: False if the writer is stuck (it is then left running)."""
        try:
            self.queue.put(self._sentinel, timeout=timeout)  # type: ignore[attr-defined]
        except queue.Full:
            return False
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
        self._thread = None
        return True


class _Installed:
    """What setup() put in place, to be undone by close()."""

    def __init__(self, handler: BoundedQueueHandler, writer: WriterThread, fd: int) -> None:
        self.handler, self.writer, self.fd = handler, writer, fd


_installed: list[_Installed] = []  # the one in force (logging's own handlers are process-wide too)


def setup(fmt: str, level: str, worker: int | None = None, pattern: str | None = None,
          levels: Sequence[tuple[str, str]] = ()) -> None:
    """Log to stderr in `fmt` (text or json) from `level` up; `worker`: a worker's index;
    `pattern`: an spdlog pattern instead (Envoy's --log-format, envoylog.py);
    `levels`: (logger, level) for single loggers."""
    close()
    formatter: logging.Formatter
    if pattern is not None:
        formatter = SpdlogFormatter(pattern)
    elif fmt == "json":
        formatter = JsonFormatter(worker)
    else:
        tag = "" if worker is None else f" worker={worker}"
        formatter = logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")
        logging.Formatter.converter = time.gmtime
    fd = os.dup(sys.stderr.fileno())
    os.set_inheritable(fd, False)
    handler = BoundedQueueHandler(PerKindLimit())
    writer = WriterThread(handler.queue, _FdWriter(fd, formatter))  # type: ignore[arg-type]
    writer.start()
    _installed.append(_Installed(handler, writer, fd))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    apply_levels([(name, LEVELS[value]) for name, value in levels])


def close(timeout: float = CLOSE_WAIT) -> None:
    """Let the writer write what is queued for up to `timeout` seconds, then stop
    it; a writer stuck on a full pipe is left behind (a daemon thread)."""
    while _installed:
        installed = _installed.pop()
        root = logging.getLogger()
        if installed.handler in root.handlers:
            root.removeHandler(installed.handler)
        if installed.writer.stop_within(timeout):
            os.close(installed.fd)  # else it is stuck writing: leave it, and its descriptor, to the exit


atexit.register(close)


def counters() -> dict[str, int]:
    """Lines this process did not log: dropped (the writer was stuck), suppressed (rate limit)."""
    if not _installed:
        return {DROPPED_STAT: 0, SUPPRESSED_STAT: 0}
    handler = _installed[-1].handler
    return {DROPPED_STAT: handler.dropped, SUPPRESSED_STAT: handler.limit.suppressed}


def our_loggers() -> dict[str, logging.Logger]:
    found = {name: logger for name, logger in logging.root.manager.loggerDict.items()
             if isinstance(logger, logging.Logger) and name.split(".")[0] == "proxy"}
    return {"proxy": logging.getLogger("proxy"), **found}


def apply_levels(changes: list[tuple[str, int]]) -> None:
    """("level", n) sets every logger, as Envoy's ?level= does; (name, n) one of ours."""
    loggers = our_loggers()
    for name, level in changes:
        if name == "level":
            logging.getLogger().setLevel(level)
            for logger in loggers.values():
                logger.setLevel(logging.NOTSET)
        else:
            logging.getLogger(name).setLevel(level)


def level_name(level: int) -> str:
    return next((name for name, value in LEVELS.items() if value == level and name != "trace"), "off")
