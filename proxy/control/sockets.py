"""The listening sockets: every address of every listener that binds.

Each socket is tagged with the index of its listener in the configuration
(`Bound.listener`), never with a name or an address that two listeners
could share.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import NamedTuple

from ..config import Config, Endpoint
from ..datapath.sockopts import arm_reset, set_transparent
from .lifecycle import StartupError

log = logging.getLogger("proxy.server")

BACKLOG = 4096


class Bound(NamedTuple):
    """One listening socket, and which listener of the configuration it is for."""

    listener: int  # its index in Config.listeners
    sock: socket.socket


def bind(address: str, port: int, dual_stack: bool, reuse_port: bool = False,
         relayed: bool = False, transparent: bool = False) -> socket.socket:
    """A listening socket. `relayed`: its connections are relayed (datapath/relay.py):
    they are accepted with SO_LINGER 0 already set, which accept() copies from
    the listening socket, so that a process that dies resets them, and it
    costs no call per connection. (Not for the admin API: its answers end
    with a FIN.) `transparent`: IP_TRANSPARENT, to take TPROXY'd connections
    (inbound_mode: tproxy)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if relayed:
            arm_reset(sock)
        if transparent:
            set_transparent(sock, family == socket.AF_INET6)
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


def open_listen_sockets(config: Config) -> list[Bound]:
    """Bind every address of every listener that binds, in the configuration's order.

    Every socket takes SO_REUSEPORT, as Envoy's listeners do: the workers
    (supervisor.py) each bind the same addresses, and one listener's
    addresses may overlap another's (`::` and `::1` on one port). Call
    `check_ports_free` first: SO_REUSEPORT would let the proxy share a port
    with another process of its UID without a word.
    """
    def open_one(host: str, port: int, dual_stack: bool, transparent: bool) -> socket.socket:
        return bind(host, port, dual_stack, True, relayed=True, transparent=transparent)
    return _each_address(config, open_one, warn=True)


def check_ports_free(config: Config) -> None:
    """StartupError unless every address the listeners bind is free: each is
    bound alone, without SO_REUSEPORT, and closed again."""
    for bound in _each_address(config, _probe, warn=False):
        bound.sock.close()


def _probe(host: str, port: int, dual_stack: bool, _transparent: bool) -> socket.socket:
    sock = bind(host, port, dual_stack)  # whether the port is free needs no IP_TRANSPARENT
    sock.close()  # before the next address: our own addresses may overlap
    return sock


def _each_address(config: Config, open_one: Callable[[str, int, bool, bool], socket.socket],
                  warn: bool) -> list[Bound]:
    """`open_one(host, port, dual_stack, transparent)` for every address; transparent: a
    redirected listener with inbound_mode tproxy."""
    sockets: list[Bound] = []
    try:
        for index, listener in enumerate(config.listeners):
            if not listener.bind:
                continue
            transparent = listener.original_dst and config.inbound_mode == "tproxy"
            for address in listener.addresses:
                try:
                    sock = open_one(address.host, address.port, listener.v4_on_v6 and address.host == "::", transparent)
                except OSError as exc:
                    if not _ipv6_missing(listener.addresses, exc):
                        raise StartupError(f"listener {listener.name}: cannot bind {address}: {exc.strerror}") from None
                    if warn:
                        log.warning("no IPv6 here (%s); listener %s listens on IPv4 only", exc.strerror, listener.name)
                    sock = open_one("0.0.0.0", address.port, False, transparent)
                sockets.append(Bound(index, sock))
    except BaseException:
        for bound in sockets:
            bound.sock.close()
        raise
    return sockets


def _ipv6_missing(addresses: tuple[Endpoint, ...], exc: OSError) -> bool:
    """A listener on "::" alone, in a kernel without IPv6: it takes IPv4 instead."""
    return (len(addresses) == 1 and addresses[0].host == "::"
            and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL))
