"""uvloop-floor: the least a relay built on uvloop's transports does per connection.

The bench runs this file as a subject beside the proxy, so that the proxy's cost
per connection can be split into what its own code adds and what the design
costs: an asyncio Protocol per socket on uvloop, SO_ORIGINAL_DST read through
the transport's socket, loop.create_connection to the original destination,
and the bytes handed between the two transports with flow control and
half-close. No config, no chains, no stats, no log, no splice, no limits: a
relay cannot do less and still be one. Where the proxy costs no more than this,
what is left is the event loop's and the kernel's; going below it needs another
design (the README's "Benchmark" section).

    python bench/floor.py PORT      # IPv4, on 0.0.0.0:PORT, until SIGTERM
"""

import asyncio
import signal
import socket
import struct
import sys

import uvloop

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


class Side(asyncio.Protocol):
    """One socket of a relayed connection; `peer` is the other one's Side."""

    def __init__(self, peer: "Side | None" = None) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer.eof:
            self.transport.close()
            self.peer.transport.close()
        else:
            self.peer.transport.write_eof()
        return True  # half-closed: the other direction goes on

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            if exc is None:
                self.peer.transport.close()
            else:
                self.peer.transport.abort()


class Downstream(Side):
    """The accepted socket: what it reads before the upstream is connected waits."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.early: list[bytes] | None = []
        raw = transport.get_extra_info("socket").getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, address = struct.unpack_from("!2xH4s", raw)
        self.peer = Side(self)
        connecting = asyncio.ensure_future(
            asyncio.get_running_loop().create_connection(lambda: self.peer, socket.inet_ntoa(address), port))
        connecting.add_done_callback(self.connected)

    def data_received(self, data: bytes) -> None:
        if self.early is None:
            self.peer.transport.write(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        if self.early is None:
            return super().eof_received()
        self.eof = True
        return True

    def connected(self, attempt: asyncio.Future) -> None:
        if attempt.cancelled() or attempt.exception() is not None:
            self.transport.abort()
            return
        up = self.peer.transport
        if self.transport.is_closing():
            up.close()
            return
        up.writelines(self.early)
        self.early = None
        if self.eof:
            up.write_eof()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    server = await loop.create_server(Downstream, "0.0.0.0", port, backlog=4096, reuse_address=True)
    async with server:
        await stop


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
