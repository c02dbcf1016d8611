"""Relaying one direction of a bulk transfer in the kernel, with splice(2).

Theory of operation
-------------------
A copying relay moves every byte twice through user space (read into a
buffer, write out of it). splice(2) moves it socket -> pipe -> socket
instead, as page references: the proxy's CPU per gigabyte halves and
throughput rises (bench/ has the figures). It costs four descriptors per
direction (a pipe, and a duplicate of each socket), so it is used only
where it pays: the relay starts every connection copying, through the event
loop's transports, and hands a direction to a Pump when one read brings
SPLICE_AFTER bytes or more (a client or server that sends faster than the
proxy reads, which short exchanges never do). HAProxy's `splice-auto`
decides the same way.

The hand-over keeps the byte order: the source transport stops reading,
the destination transport's buffer is left to drain (the relay waits for
it), and only then does the pump start reading the source socket, so every
byte the transport read is written before any byte the pump moves.

The pump works on duplicates of the two sockets (the loop will not watch a
descriptor a transport owns) and closes them before the transports close,
or a RST meant for a peer would wait for the last descriptor. Backpressure
is the pipe: when the destination cannot take more, the pump stops reading
the source until it can, so at most PIPE_SIZE bytes of the direction are in
flight in the kernel and none in the proxy. End of stream is a FIN on the
destination once the pipe is empty, reported to the relay like a
transport's EOF; an error on either socket resets the connection.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # relay.py imports this module
    from .relay import Relay, Side

# One read this big says the sender is ahead of us: the direction goes to a pump.
SPLICE_AFTER = 64 * 1024
# The pipe between the sockets: the most an unprivileged process may ask for
# by default (/proc/sys/fs/pipe-max-size); larger pipes mean fewer calls per byte.
PIPE_SIZE = 1 << 20
# Below this a pump moves less per call than copying does (the loop reads
# 256 KiB at a time), so the direction keeps copying. A UID whose pipes hold
# more than fs.pipe-user-pages-soft (64 MiB by default) gets only small ones.
MIN_PIPE_SIZE = 256 << 10
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _grow(pipe_w: int) -> int:
    """Make the pipe PIPE_SIZE, or at least MIN_PIPE_SIZE; its size. ENOBUFS if neither."""
    for size in (PIPE_SIZE, MIN_PIPE_SIZE):
        try:
            return fcntl.fcntl(pipe_w, _F_SETPIPE_SZ, size)
        except OSError:
            continue
    raise OSError(errno.ENOBUFS, "no pipe of at least 256 KiB for this UID (fs.pipe-user-pages-soft used up)")


class Pump:
    """One direction, source socket -> pipe -> destination socket."""

    __slots__ = ("loop", "relay", "side", "src", "dst", "pipe_r", "pipe_w", "capacity", "in_pipe", "reading",
                 "writing", "src_eof")

    def __init__(self, loop: asyncio.AbstractEventLoop, relay: Relay, side: Side, src_fd: int, dst_fd: int) -> None:
        """`side`: the relay's Side whose socket is the source. Raises OSError
        (EMFILE, ...) if the descriptors cannot be had; nothing is left open then."""
        self.loop, self.relay, self.side = loop, relay, side
        fds: list[int] = []
        try:
            fds += os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.capacity = _grow(fds[1])
            fds.append(fcntl.fcntl(src_fd, fcntl.F_DUPFD_CLOEXEC, 0))
            fds.append(fcntl.fcntl(dst_fd, fcntl.F_DUPFD_CLOEXEC, 0))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        self.pipe_r, self.pipe_w, self.src, self.dst = fds
        self.in_pipe = 0  # bytes read from the source, not yet written to the destination
        self.reading = self.writing = False
        self.src_eof = False  # the source's FIN came (the relay hears of it once the pipe is empty)

    def start(self) -> None:
        self._read_again()

    # the event loop's callbacks -------------------------------------------------------
    def _readable(self) -> None:
        try:
            n = os.splice(self.src, self.pipe_w, self.capacity - self.in_pipe, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self.relay.pump_failed(self.side, exc)
            return
        if n == 0:  # FIN from the source
            self.src_eof = True
            self._stop_reading()
            if not self.in_pipe:
                self.relay.pump_eof(self)
            return
        self.side.received += n
        self.in_pipe += n
        self._flush()

    def _writable(self) -> None:
        self._flush()

    # moving bytes on ------------------------------------------------------------------
    def _flush(self) -> None:
        while self.in_pipe:
            try:
                n = os.splice(self.pipe_r, self.dst, self.in_pipe, flags=_FLAGS)
            except BlockingIOError:  # the destination is full: wait for room, read no more
                self._stop_reading()
                if not self.writing:
                    self.writing = True
                    self.loop.add_writer(self.dst, self._writable)
                return
            except OSError as exc:
                self.relay.pump_failed(self.side.peer, exc)
                return
            self.in_pipe -= n
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst)
        if self.src_eof:  # the source ended while the pipe still held bytes
            self.relay.pump_eof(self)
        elif not self.reading:
            self._read_again()

    def _read_again(self) -> None:
        self.reading = True
        self.loop.add_reader(self.src, self._readable)

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.src)

    def close(self) -> None:
        """Stop and let go of every descriptor (before the transports close)."""
        self._stop_reading()
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst)
        for fd in (self.src, self.dst, self.pipe_r, self.pipe_w):
            os.close(fd)
