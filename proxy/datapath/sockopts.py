"""Socket options the proxy lives by: SO_ORIGINAL_DST, SO_MARK and IP_TRANSPARENT.

When iptables REDIRECTs a connection, the kernel rewrites its destination to
the proxy's port; conntrack remembers the original one, and the accepted
socket hands it back through getsockopt:

* IPv4: level SOL_IP, SO_ORIGINAL_DST (80) -> struct sockaddr_in;
* IPv6: level SOL_IPV6, IP6T_SO_ORIGINAL_DST (also 80) -> struct sockaddr_in6.

The dual-stack trap: an IPv4 client accepted on an IPv6 (`::`) socket shows
up with v4-mapped addresses (`::ffff:192.0.2.1`). Its conntrack entry is an
IPv4 one, so the IPv4 call is the right one even though the socket is AF_INET6.

A socket that was not redirected (a client that dialled the proxy's port
directly) has either no conntrack entry (ENOENT), which comes back as `None`,
or an original destination equal to the proxy's own address, which the
caller's loop guard recognises. "Not redirected" is a value the caller
decides about, not a crash.

With TPROXY (inbound_mode: tproxy) nothing is rewritten: the connection is
delivered, as it was addressed, to a listener with IP_TRANSPARENT, so its
local address (getsockname) *is* the original destination (`tproxied_dst`).
The connection to the app then comes from the client's address, which is
not ours: that bind needs IP_TRANSPARENT on the upstream socket too. Both
need CAP_NET_ADMIN.

The accept path avoids `ipaddress` objects: addresses travel as the strings
inet_ntop writes (canonical, compressed), which compare equal whenever the
addresses do.
"""

from __future__ import annotations

import _socket
import errno
import socket
import struct
from typing import Protocol

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
SO_MARK = getattr(socket, "SO_MARK", 36)
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)  # linux/in.h
IPV6_TRANSPARENT = 75  # linux/in6.h


class SocketLike(Protocol):
    """A socket, or the stand-in an event loop's transport hands out for one."""

    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...

    def setsockopt(self, level: int, option: int, value: int | bytes, /) -> None: ...

    def fileno(self) -> int: ...


class BorrowedSocket(_socket.socket):
    """A socket object for a descriptor the event loop owns: its options can be
    read and set through it, and it never closes the descriptor (dropped, it
    only lets go of the number; `detach()` once the loop has closed it).

    Why: uvloop's stand-in for a transport's socket makes a socket object for
    every getsockopt or setsockopt and drops it, and making one checks the
    descriptor with a getsockname(): a system call and an object per call. One
    of these per accepted connection, made once, serves them all."""

    __slots__ = ()

    def __del__(self) -> None:
        """Not the socket's own finalizer, which would close the descriptor."""


def borrow(stand_in: SocketLike) -> BorrowedSocket:
    """The descriptor behind `stand_in` (what a transport's get_extra_info("socket")
    returns) as a BorrowedSocket. Its family is read from the descriptor; type and
    protocol are given, which saves two getsockopt calls."""
    return BorrowedSocket(-1, socket.SOCK_STREAM, socket.IPPROTO_TCP, stand_in.fileno())


_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, addr
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s4x")  # family, port, flowinfo, addr, scope id (read apart)
# sin6_scope_id is in host byte order, unlike the port: its own struct, after the address
_SCOPE_ID = struct.Struct("=I")
_SCOPE_ID_OFFSET = 24


def unmapped(host: str) -> str:
    """A peer or local address string with the v4-mapped prefix removed
    ('::ffff:192.0.2.1' -> '192.0.2.1'); cheap enough for every accept."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    """Decode a struct sockaddr_in or sockaddr_in6 into (address, port).

    A non-zero IPv6 scope id stays with the address, the way getaddrinfo and
    connect() read it back ("fe80::1%2"): a link-local address without its
    interface is a different address, or none. (The kernel fills it in for
    SO_ORIGINAL_DST only when the accepted socket is bound to an interface,
    which is why the rules leave link-local destinations alone.)
    """
    if len(raw) >= _SOCKADDR_IN6.size:
        port, packed = _SOCKADDR_IN6.unpack_from(raw)
        host = socket.inet_ntop(socket.AF_INET6, packed)
        (scope,) = _SCOPE_ID.unpack_from(raw, _SCOPE_ID_OFFSET)
        return (f"{host}%{scope}" if scope else host), port
    port, packed = _SOCKADDR_IN.unpack_from(raw)
    return socket.inet_ntop(socket.AF_INET, packed), port


def original_dst(sock: SocketLike, ipv4: bool) -> tuple[str, int] | None:
    """Where the client was really going, or None if conntrack has no entry.

    `sock` is anything with getsockopt (a socket, or the socket-like object an
    asyncio or uvloop transport hands out). `ipv4` says which call to make:
    true for an AF_INET socket *and* for an IPv4 client on an AF_INET6 socket
    (its peer address is v4-mapped), false for a real IPv6 client.
    """
    try:
        if ipv4:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
        else:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOPROTOOPT):
            return None  # no conntrack entry: a direct connection
        raise
    return parse_sockaddr(raw)


def tproxied_dst(sockname: tuple[str, int], listener_port: int) -> tuple[str, int] | None:
    """The original destination of a TPROXY'd connection: its local address, when that
    is not the listener's own port (a REDIRECTed connection is rewritten to the
    listener's port, and the rules never TPROXY a connection made to that port
    itself); None for a connection that was not TPROXY'd."""
    host, port = sockname[0], sockname[1]
    if port == listener_port:
        return None
    return unmapped(host), port


def set_transparent(sock: SocketLike, ipv6: bool) -> None:
    """IP_TRANSPARENT (and IPV6_TRANSPARENT on an IPv6 socket): the socket may accept
    connections addressed elsewhere (TPROXY) and bind to an address that is not
    this host's (the client's). Needs CAP_NET_ADMIN: PermissionError without."""
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    if ipv6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)


def can_transparent() -> str | None:
    """None if this process may set IP_TRANSPARENT, else the reason it may not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            set_transparent(probe, ipv6=False)
        except PermissionError as exc:
            return f"setsockopt(IP_TRANSPARENT): {exc.strerror}"
    return None


def set_mark(sock: SocketLike, mark: int) -> None:
    """Tag the socket's packets with `mark` (needs CAP_NET_ADMIN)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


def can_mark(mark: int) -> str | None:
    """None if this process may set SO_MARK, else the reason it may not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            set_mark(probe, mark)
        except PermissionError as exc:
            return f"setsockopt(SO_MARK): {exc.strerror}"
    return None


_LINGER_ABORT = struct.pack("ii", 1, 0)
_LINGER_DEFAULT = struct.pack("ii", 0, 0)


def arm_reset(sock: SocketLike) -> None:
    """Make the next close() send a RST instead of a FIN (SO_LINGER, 0 s).

    Also what the relay sets on both sockets while a connection relays: if
    the process dies, the kernel's close of its sockets resets them, and the
    peers do not take a cut stream for a complete one."""
    # try/except, not contextlib.suppress: three calls less, and this runs for every connection
    try:  # noqa: SIM105
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:  # already closed: nothing left to reset
        pass


def disarm_reset(sock: SocketLike) -> None:
    """A close() sends a FIN again, after what is still buffered (SO_LINGER off)."""
    try:  # noqa: SIM105 (as above)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_DEFAULT)
    except OSError:
        pass
