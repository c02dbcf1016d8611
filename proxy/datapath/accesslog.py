"""The access log: one line per finished connection, written off the event loop.

The data path formats the line (an f-string: every field is a number, an
address, a config name or a fixed word, so nothing needs escaping) and
appends it to a list; the lines that finish within 20 ms go to a daemon
thread as one batch (one queue put, one thread wake-up, instead of one per
connection), and the thread writes them, so a slow terminal or a full pipe
on stderr can never stall the relay. (Formatting in the thread measured
slower: json.dumps costs three times the f-string, and the thread then
fights the event loop for the interpreter lock.)

Text form (one line, fields in a fixed order):

    2026-11-25T18:40:01.123Z conn=7 outbound 192.0.2.1:40122 -> 198.51.100.10:80
      chain=web upstream=198.51.100.10:80 up=1048576B down=512B 12.3ms done
"""

from __future__ import annotations

import asyncio
import os
import queue
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO, cast

_STOP = object()
Entry = dict[str, Any]  # one finished connection (relay.Relay.describe, plus its counters and end)
BATCH_DELAY = 0.02  # seconds an entry may wait to share its thread wake-up


def format_text(entry: Entry) -> str:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(entry["start"]))
    ms = int(entry["start"] * 1000) % 1000
    return (
        f"{ts}.{ms:03d}Z conn={entry['id']} {entry['direction']} {entry['source']} -> {entry['destination']}"
        f" chain={entry['chain']} upstream={entry['upstream'] or '-'}"
        f" up={entry['bytes_up']}B down={entry['bytes_down']}B {entry['duration_ms']:.1f}ms {entry['end']}"
    )


def format_json(entry: Entry) -> str:
    """The entry as one JSON object (what json.dumps would write, faster)."""
    return (f'{{"type":"access","id":{entry["id"]},"start":{entry["start"]!r},"listener":"{entry["listener"]}",'
            f'"source":"{entry["source"]}","destination":"{entry["destination"]}",'
            f'"direction":"{entry["direction"]}","chain":"{entry["chain"]}","cluster":{_json_str(entry["cluster"])},'
            f'"upstream":{_json_str(entry["upstream"])},"bytes_up":{entry["bytes_up"]},'
            f'"bytes_down":{entry["bytes_down"]},"end":"{entry["end"]}","duration_ms":{entry["duration_ms"]!r}}}')


def _json_str(value: str | None) -> str:
    return "null" if value is None else f'"{value}"'


def _chunks(lines: list[str], size: int) -> list[str]:
    """The lines joined into writes of at most `size` bytes that end in a newline.

    Workers of one proxy (control/supervisor.py) share its stderr: a pipe keeps a write
    of up to PIPE_BUF bytes whole, so no line is ever cut by another
    worker's. (A longer line, which our fields never make, goes alone.)
    """
    chunks: list[str] = []
    current: list[str] = []
    length = 0
    for line in lines:
        n = len(line.encode()) + 1
        if current and length + n > size:
            chunks.append("".join(current))
            current, length = [], 0
        current.append(line + "\n")
        length += n
    if current:
        chunks.append("".join(current))
    return chunks


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o640)


class AccessLog:
    """Writes access-log entries to a stream from a background thread."""

    def __init__(self, target: str, fmt: str | Callable[[Entry], str]) -> None:
        """`fmt`: text or json (ours), or a function of an entry (an Envoy format: config.logformat)."""
        self.enabled = target != "off"
        self._format = fmt if callable(fmt) else format_json if fmt == "json" else format_text
        self._queue: queue.SimpleQueue[list[str] | object] = queue.SimpleQueue()  # batches of lines, or _STOP
        self._pending: list[str] = []  # lines formatted, not yet handed to the thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: TextIO | None = None
        self._owns_stream = False
        self._thread: threading.Thread | None = None
        if not self.enabled:
            return
        if target == "stderr":
            self._stream = sys.stderr
        elif target == "stdout":
            self._stream = sys.stdout
        else:
            # 0640: it holds every source and destination address (an existing file keeps its mode)
            self._stream = open(target, "a", encoding="utf-8", buffering=1,  # noqa: SIM115 (closed in close())
                                opener=_private)
            self._owns_stream = True
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def write(self, entry: Entry) -> None:
        """Format and queue one entry (called on the event loop's thread)."""
        if not self.enabled:
            return
        self._pending.append(self._format_safely(entry))
        if len(self._pending) == 1:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_later(BATCH_DELAY, self._flush)

    def _flush(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            self._queue.put(batch)

    def _run(self) -> None:
        stream = self._stream
        assert stream is not None  # the thread runs only for a log that is on
        while (batch := self._queue.get()) is not _STOP:
            self._emit(stream, cast(list[str], batch))

    def _format_safely(self, entry: Entry) -> str:
        try:
            return self._format(entry)
        except Exception as exc:  # a bad entry must not silence the log for good
            return f"access-log: cannot format entry {entry.get('id', '?')}: {exc!r}"

    @staticmethod
    def _emit(stream: TextIO, lines: list[str]) -> None:
        try:
            for chunk in _chunks(lines, select.PIPE_BUF):
                stream.write(chunk)
                stream.flush()
        except (OSError, ValueError):
            pass  # the log's reader went away; the proxy keeps relaying

    def close(self) -> None:
        """Write everything queued so far, then stop the writer."""
        if self._thread is not None:
            self._flush()
            self._queue.put(_STOP)
            self._thread.join(timeout=5)
            self._thread = None
        if self._owns_stream and self._stream is not None:
            self._stream.close()
