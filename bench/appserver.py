"""The app server of the benchmark: one uvloop process in the remote namespace.

Standalone on purpose (stdlib and uvloop only, run by path): it must start
fast and must never be the bottleneck, which the `direct` subject checks.
It listens on 0.0.0.0 (the remote namespace owns all of 198.51.100.0/24
through a local route, so every service address of the pod world reaches it)
on one port per behaviour:

    SINK   9001  read and discard; each time another ACK_UNIT (4 MiB) has
                 come, answer the count so far (8 bytes, big-endian); close
                 on EOF. Acknowledging in-band, not after a half-close, lets
                 relays that do not forward a half-close (pproxy) be measured.
    SOURCE 9002  read an 8-byte duration in ms, send zeros for that long,
                 then half-close; close on the client's EOF
    ECHO   9003  echo every byte; close on EOF

It prints "ready" on stdout once every port listens, and exits on SIGTERM
or SIGINT.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import socket
import struct
import sys
import time

SINK, SOURCE, ECHO = 9001, 9002, 9003
CHUNK = bytes(256 * 1024)
ACK_UNIT = 4 << 20
_U64 = struct.Struct("!Q")


class Sink(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.count = 0

    def data_received(self, data: bytes) -> None:
        before = self.count // ACK_UNIT
        self.count += len(data)
        if self.count // ACK_UNIT != before:
            self.transport.write(_U64.pack(self.count - self.count % ACK_UNIT))

    def eof_received(self) -> bool:
        self.transport.close()
        return False


class Source(asyncio.Protocol):
    """Streams zeros with backpressure until its deadline, then half-closes."""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.request = b""
        self.deadline = None
        self.paused = False
        self.loop = asyncio.get_running_loop()
        transport.set_write_buffer_limits(high=1 << 20)

    def data_received(self, data: bytes) -> None:
        if self.deadline is not None:
            return
        self.request += data
        if len(self.request) >= 8:
            ms = _U64.unpack_from(self.request)[0]
            self.deadline = time.monotonic() + ms / 1000
            self._pump()

    def _pump(self) -> None:
        transport = self.transport
        while not self.paused and not transport.is_closing():
            if time.monotonic() >= self.deadline:
                transport.write_eof()
                return
            transport.write(CHUNK)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        # not from inside the loop's write callback: schedule the next burst
        self.loop.call_soon(self._pump)

    def eof_received(self) -> bool:
        self.transport.close()
        return False


class Echo(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.transport.close()
        return False


def listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def main() -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    servers = [await loop.create_server(proto, sock=listen(port), backlog=4096)
               for proto, port in ((Sink, SINK), (Source, SOURCE), (Echo, ECHO))]
    print("ready", flush=True)
    await stop
    for server in servers:
        server.close()


if __name__ == "__main__":
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # root may not raise the hard limit
    import uvloop
    uvloop.run(main())
    sys.exit(0)
