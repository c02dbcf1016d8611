"""The listening sockets: the redirected port on each address, and the plain listeners.

Redirect sockets and plain listeners are kept apart by kind (`Bound.plain`),
never by a name they could share: a plain listener may be called anything,
"0.0.0.0" included, and still never takes the redirected port's traffic.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import NamedTuple

from ..config import Config
from .lifecycle import StartupError

log = logging.getLogger("proxy.server")

BACKLOG = 4096


class Bound(NamedTuple):
    """One listening socket: of the redirected port (plain is None), or of a plain listener."""

    plain: str | None  # the plain listener's name
    sock: socket.socket


def bind(address: str, port: int, dual_stack: bool, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # one of several workers' sockets on this port (supervisor.py)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # "::" alone takes IPv4 clients too (as v4-mapped addresses)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
        return sock
    except OSError:
        sock.close()
        raise


def open_listen_sockets(config: Config, reuse_port: bool = False) -> list[Bound]:
    """Bind the redirected port on every configured address (IPv4 and IPv6),
    and every plain listener; the redirect sockets come first."""
    sockets: list[Bound] = []
    try:
        addresses = config.addresses
        dual = "::" in addresses and "0.0.0.0" not in addresses
        for address in addresses:
            try:
                sockets.append(Bound(None, bind(address, config.port, dual and address == "::", reuse_port)))
            except OSError as exc:
                if address == "::" and addresses == ("::",) and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    log.warning("no IPv6 here (%s); listening on IPv4 only", exc.strerror)
                    sockets.append(Bound(None, bind("0.0.0.0", config.port, False, reuse_port)))
                else:
                    raise StartupError(f"listener: cannot bind {address} port {config.port}: {exc.strerror}") from None
        for plain in config.plain_listeners:
            try:
                sockets.append(Bound(plain.name, bind(plain.address, plain.port, False, reuse_port)))
            except OSError as exc:
                raise StartupError(f"plain listener {plain.name}: cannot bind {plain.address} "
                                   f"port {plain.port}: {exc.strerror}") from None
    except BaseException:
        for bound in sockets:
            bound.sock.close()
        raise
    return sockets
