"""The control channel between a supervisor and one worker: JSON lines on a socketpair.

Both ends speak it through `Channel`. A line is one JSON object, of one of
three kinds:

    {"op": "drain"}                        a command; no answer
    {"op": "snapshot", "id": 7, ...}       a request; answered by {"id": 7, "result": ...}
    {"event": "ready"}                     news from the worker

The supervisor sends `start` first, before the worker's event loop runs (the
worker reads it with `read_first`), then `snapshot`, `drain` (with
`inbound_only` and `graceful`), `stop` (/quitquitquit), `terminate` (SIGTERM)
and `log`; the worker says `ready` once its listeners serve.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
from collections.abc import Callable
from typing import Any, cast

log = logging.getLogger("proxy.workers")

LINE_LIMIT = 1 << 30  # a snapshot with many live connections is a long line


class ChannelClosed(Exception):
    """The other end is gone."""


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def read_first(sock: socket.socket) -> tuple[dict, bytes]:
    """The first message, and whatever came after it (a blocking read, before any loop runs)."""
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ValueError("the control channel closed before the start message")
        data += chunk
        if len(data) > LINE_LIMIT:
            raise ValueError(f"a control message longer than {LINE_LIMIT} bytes")
    line, _, rest = data.partition(b"\n")
    return json.loads(line), rest


class Channel(asyncio.Protocol):
    """One end of a control channel."""

    def __init__(self, on_message: Callable[[dict], None], on_closed: Callable[[], None],
                 pending: bytes = b"") -> None:
        """`on_message(message)` gets every command, request and event; answers to our own
        requests go to `request`'s caller instead. `on_closed()` runs once, when the other
        end is gone. `pending`: bytes already read (after `read_first`'s message)."""
        self.on_message, self.on_closed = on_message, on_closed
        self.buffer = pending
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._waiting: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()

    # talking ----------------------------------------------------------------------------
    def send(self, message: dict) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode(message))

    async def request(self, op: str, timeout: float, **args: Any) -> Any:  # noqa: ASYNC109 (a deadline per request)
        """Send a request and wait up to `timeout` seconds for its result."""
        if self.closed.done():
            raise ChannelClosed("the other end is gone")
        request_id = next(self._ids)
        future = self._waiting[request_id] = asyncio.get_running_loop().create_future()
        self.send({"op": op, "id": request_id, **args})
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(request_id, None)

    def answer(self, request: dict, result: Any) -> None:
        self.send({"id": request["id"], "result": result})

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one, without the base class
        self.data_received(b"")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            while b"\n" in self.buffer:
                line, _, self.buffer = self.buffer.partition(b"\n")
                self._dispatch(json.loads(line))
            if len(self.buffer) > LINE_LIMIT:
                raise ValueError(f"a line longer than {LINE_LIMIT} bytes")
        except ValueError as exc:  # not a channel of ours: it ends here
            log.error("control channel: %s", exc)
            self.buffer = b""
            if self.transport is not None:
                self.transport.close()

    def _dispatch(self, message: dict) -> None:
        if "result" in message and "op" not in message:
            future = self._waiting.get(message.get("id"))  # type: ignore[arg-type]
            if future is not None and not future.done():
                future.set_result(message["result"])
        else:
            self.on_message(message)

    def eof_received(self) -> bool:
        return False  # the other end is gone: close ours too

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ChannelClosed("the other end is gone"))
        if not self.closed.done():
            self.closed.set_result(None)
            self.on_closed()
