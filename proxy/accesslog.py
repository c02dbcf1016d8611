"""The access log: one line per finished connection, written off the event loop.

The data path only puts a small dict on a queue (a C-level append); a daemon
thread formats the line and writes it, so a slow terminal or a full pipe on
stderr can never stall the relay.

Text form (one line, fields in a fixed order):

    2026-11-25T18:40:01.123Z conn=7 outbound 192.0.2.1:40122 -> 198.51.100.10:80
      chain=web upstream=198.51.100.10:80 up=1048576B down=512B 12.3ms done
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from typing import TextIO

_STOP = object()


def format_text(entry: dict) -> str:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(entry["start"]))
    ms = int(entry["start"] * 1000) % 1000
    return (
        f"{ts}.{ms:03d}Z conn={entry['id']} {entry['direction']} {entry['source']} -> {entry['destination']}"
        f" chain={entry['chain']} upstream={entry['upstream'] or '-'}"
        f" up={entry['bytes_up']}B down={entry['bytes_down']}B {entry['duration_ms']:.1f}ms {entry['end']}"
    )


def format_json(entry: dict) -> str:
    return json.dumps({"type": "access", **entry}, separators=(",", ":"))


class AccessLog:
    """Writes access-log entries to a stream from a background thread."""

    def __init__(self, target: str, fmt: str) -> None:
        self.enabled = target != "off"
        self._format = format_json if fmt == "json" else format_text
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
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
            self._stream = open(target, "a", encoding="utf-8", buffering=1)
            self._owns_stream = True
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def write(self, entry: dict) -> None:
        if self.enabled:
            self._queue.put(entry)

    def _run(self) -> None:
        assert self._stream is not None
        while True:
            entry = self._queue.get()
            if entry is _STOP:
                break
            lines = [self._format(entry)]
            try:  # write what has piled up in one go
                while len(lines) < 512:
                    more = self._queue.get_nowait()
                    if more is _STOP:
                        self._emit(lines)
                        return
                    lines.append(self._format(more))
            except queue.Empty:
                pass
            self._emit(lines)

    def _emit(self, lines: list[str]) -> None:
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # the log's reader went away; the proxy keeps relaying

    def close(self) -> None:
        """Write everything queued so far, then stop the writer."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=5)
            self._thread = None
        if self._owns_stream and self._stream is not None:
            self._stream.close()
