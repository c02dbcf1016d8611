"""The pod's own addresses, which tell inbound from outbound.

A redirected connection whose original destination is one of this network
namespace's addresses was coming *in* to the pod (PREROUTING); any other was
going *out*. Addresses appear after start in real pods (the CNI plugin may
configure the interface after the sidecar starts), so the set is read once at
start and read again whenever the kernel announces an address change.

Both come from rtnetlink with nothing but the standard library: an
RTM_GETADDR dump for the set, and a socket subscribed to the IPv4/IPv6
address groups whose readability means "something changed, dump again".
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct

log = logging.getLogger("proxy.localaddrs")

RTM_NEWADDR, RTM_GETADDR = 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x10, 0x100

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")  # len, type


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse_addr_dump(data: bytes) -> tuple[set[str], bool]:
    """Addresses in a chunk of RTM_NEWADDR messages, as canonical strings (the
    form inet_ntop writes); True once NLMSG_DONE is seen."""
    found: set[str] = set()
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        if kind == NLMSG_DONE:
            return found, True
        if kind == NLMSG_ERROR:
            raise OSError("rtnetlink refused the address dump")
        if kind == RTM_NEWADDR:
            body = offset + _NLMSGHDR.size
            family = _IFADDRMSG.unpack_from(data, body)[0]
            attrs = {}
            pos = body + _IFADDRMSG.size
            while pos + _RTATTR.size <= offset + length:
                alen, atype = _RTATTR.unpack_from(data, pos)
                if alen < _RTATTR.size:
                    break
                attrs[atype] = data[pos + _RTATTR.size: pos + alen]
                pos += _align(alen)
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw is not None and family in (socket.AF_INET, socket.AF_INET6):
                found.add(str(ipaddress.ip_address(raw)))
        offset += _align(length)
    return found, False


def dump_addresses() -> frozenset[str]:
    """Every IPv4 and IPv6 address of this network namespace, loopback included."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        request = _NLMSGHDR.pack(_NLMSGHDR.size + _IFADDRMSG.size, RTM_GETADDR,
                                 NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        nl.sendall(request)
        found: set[str] = set()
        done = False
        while not done:
            chunk, done = parse_addr_dump(nl.recv(65536))
            found |= chunk
    return frozenset(found)


class LocalAddresses:
    """A live set of this namespace's addresses."""

    def __init__(self) -> None:
        self.addresses = dump_addresses()
        self._watch: socket.socket | None = None

    def __contains__(self, addr: str) -> bool:
        return addr in self.addresses

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Re-read the set whenever an address is added or removed."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        sock.setblocking(False)
        self._watch = sock
        loop.add_reader(sock.fileno(), self._changed)

    def _changed(self) -> None:
        assert self._watch is not None
        try:
            while self._watch.recv(65536):
                pass
        except BlockingIOError:
            pass
        except OSError:
            pass  # ENOBUFS: events were lost; the dump below catches up anyway
        before = self.addresses
        self.addresses = dump_addresses()
        if before != self.addresses:
            log.info("local addresses now: %s", ", ".join(sorted(self.addresses)))

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._watch is not None:
            loop.remove_reader(self._watch.fileno())
            self._watch.close()
            self._watch = None
