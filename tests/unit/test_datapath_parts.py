"""The data path's smaller parts on real sockets: socket options, the pod's own
addresses, endpoint order and the loop guard's registry, the idle sweep."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import textwrap

import pytest

from proxy.config import Cluster, Endpoint
from proxy.datapath import sockopts
from proxy.datapath.balance import RoundRobin
from proxy.datapath.localaddrs import NLMSG_DONE, RTM_NEWADDR, dump_addresses, parse_addr_dump
from proxy.datapath.relay import close_idle, idle_sweep_interval
from proxy.datapath.upstream import LoopSocket, OwnSockets, open_socket

# --- sockopts --------------------------------------------------------------------------


def test_sockaddr_in_and_in6_are_decoded():
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 80) + socket.inet_pton(socket.AF_INET, "198.51.100.7") + bytes(8)
    assert sockopts.parse_sockaddr(v4) == ("198.51.100.7", 80)
    v6 = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 443) + bytes(4)
          + socket.inet_pton(socket.AF_INET6, "2001:db8::7") + bytes(4))
    assert sockopts.parse_sockaddr(v6) == ("2001:db8::7", 443)


def test_a_link_local_original_destination_keeps_its_scope_id():
    """sin6_scope_id (host byte order) stays with the address, as connect() takes it."""
    scoped = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 8080) + bytes(4)
              + socket.inet_pton(socket.AF_INET6, "fe80::1") + struct.pack("=I", 3))
    assert sockopts.parse_sockaddr(scoped) == ("fe80::1%3", 8080)
    host, port = sockopts.parse_sockaddr(scoped)
    assert socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_STREAM)[0][4][3] == 3


def test_a_connection_nobody_redirected_has_no_original_destination():
    """No conntrack entry (ENOENT) is an answer, None, not an error."""
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()):
        dialled = server.getsockname()
        accepted, _ = server.accept()
        with accepted:
            got = sockopts.original_dst(accepted, ipv4=True)
    # without a NAT rule the kernel either has no entry or reports the address as dialled
    assert got is None or got == dialled


@pytest.mark.parametrize("host, want", [("::ffff:192.0.2.1", "192.0.2.1"), ("192.0.2.1", "192.0.2.1"),
                                        ("2001:db8::1", "2001:db8::1"), ("::ffff:c000:201", "::ffff:c000:201")])
def test_v4_mapped_addresses_are_unwrapped(host, want):
    assert sockopts.unmapped(host) == want


def test_arm_reset_makes_close_send_a_reset():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        sockopts.arm_reset(accepted)
        accepted.close()
        client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            client.recv(10)
        client.close()
    sockopts.arm_reset(accepted)  # already closed: nothing to do, no error


# --- localaddrs ------------------------------------------------------------------------


def test_the_namespace_addresses_include_loopback():
    found = dump_addresses()
    assert "127.0.0.1" in found
    assert all(a == a.strip() and "/" not in a for a in found)


def _newaddr(family: int, raw: bytes) -> bytes:
    attr = struct.pack("=HH", 4 + len(raw), 2) + raw  # IFA_LOCAL
    body = struct.pack("=BBBBI", family, 24, 0, 0, 1) + attr
    return struct.pack("=IHHII", 16 + len(body), RTM_NEWADDR, 0, 1, 0) + body


def test_an_address_dump_is_parsed_message_by_message():
    chunk = (_newaddr(socket.AF_INET, socket.inet_pton(socket.AF_INET, "192.0.2.1"))
             + _newaddr(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "2001:db8::1")))
    assert parse_addr_dump(chunk) == ({"192.0.2.1", "2001:db8::1"}, False)
    done = struct.pack("=IHHII", 16, NLMSG_DONE, 0, 1, 0)
    assert parse_addr_dump(done) == (set(), True)


# --- upstream: endpoint order, the loop guard's registry --------------------------------


def test_round_robin_starts_one_further_each_time():
    eps = tuple(Endpoint("198.51.100.1", p) for p in (1, 2, 3))
    rr = RoundRobin(Cluster("c", eps))
    orders = [[e.port for e in rr.order()] for _ in range(4)]
    assert orders == [[1, 2, 3], [2, 3, 1], [3, 1, 2], [1, 2, 3]]


def test_an_upstream_socket_is_registered_before_its_handshake():
    own = OwnSockets()
    with socket.create_server(("127.0.0.1", 0)) as server:
        endpoint = Endpoint(*server.getsockname())
        sock, key = open_socket(endpoint, None, own)
        try:
            assert key in own  # known to the loop guard at once
            host, port = sock.getsockname()[:2]
            assert key == (host, port, endpoint.host, endpoint.port)
            assert own.discard(key)
            assert key not in own
            assert not own.discard(key)  # twice is fine, and says it was gone
        finally:
            sock.close()


def test_an_upstream_socket_is_what_the_event_loop_expects_for_less():
    """Family and type read as plain numbers equal to the enum members; setblocking(False)
    keeps it non-blocking (without the ioctl); blocking again is the standard socket's."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock, _ = open_socket(Endpoint(*server.getsockname()[:2]), None, OwnSockets())
        with sock:
            assert isinstance(sock, LoopSocket)
            assert sock.family == socket.AF_INET and type(sock.family) is int
            assert sock.type == socket.SOCK_STREAM and type(sock.type) is int
            sock.setblocking(False)
            assert sock.gettimeout() == 0.0 and not sock.getblocking()
            sock.setblocking(True)
            assert sock.getblocking()
    with LoopSocket(socket.AF_INET6, socket.SOCK_STREAM) as blocking:  # made blocking: the call is made
        blocking.setblocking(False)
        assert not blocking.getblocking()


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_both_event_loops_take_an_upstream_socket(loop_name):
    """create_connection(sock=LoopSocket) connects and relays on either loop."""
    import asyncio

    import uvloop

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        got = loop.create_future()

        class Echo(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):
                self.transport.write(data)

        class Client(asyncio.Protocol):
            def data_received(self, data):
                got.done() or got.set_result(data)

        server = await loop.create_server(Echo, "127.0.0.1", 0)
        sock, _ = open_socket(Endpoint("127.0.0.1", server.sockets[0].getsockname()[1]), None, OwnSockets())
        transport, _ = await loop.create_connection(Client, sock=sock)
        transport.write(b"ping")
        try:
            return await asyncio.wait_for(got, 5)
        finally:
            transport.close()
            server.close()

    runner = uvloop.run if loop_name == "uvloop" else asyncio.run
    assert runner(main()) == b"ping"


def test_what_fails_at_once_is_an_oserror_and_leaks_nothing():
    """Out of descriptors: socket() itself fails; nothing is registered, nothing left open."""
    code = textwrap.dedent("""
        import errno, os, resource
        from proxy.config import Endpoint
        from proxy.datapath.upstream import OwnSockets, open_socket
        own = OwnSockets()
        before = sorted(os.listdir("/proc/self/fd"))  # one of them is the listing's own, closed again
        limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (int(before[-1]), limits[1]))  # no descriptor is free
        try:
            open_socket(Endpoint("127.0.0.1", 9), None, own)
        except OSError as exc:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            print(errno.errorcode[exc.errno], len(own._keys), sorted(os.listdir("/proc/self/fd")) == before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["EMFILE", "0", "True"], out.stderr


# --- the idle sweep ------------------------------------------------------------------------


class Quiet:
    """What close_idle reads and writes of a relay (its counters and close)."""

    def __init__(self) -> None:
        self.bytes_from_downstream = self.bytes_from_upstream = 0
        self.bytes_seen, self.last_active, self.end = 0, 0.0, None
        self.idle_timeout = 10
        self.closes: list[tuple[str, bool]] = []

    def close(self, reason: str, *, reset: bool = False) -> None:
        self.closes.append((reason, reset))
        self.end = reason


def test_idle_connections_close_gracefully_then_reset_if_stuck():
    busy, quiet = Quiet(), Quiet()
    assert close_idle([busy, quiet], now=5) == 0
    busy.bytes_from_upstream = 100  # moved since the last sweep: its clock restarts
    assert close_idle([busy, quiet], now=11) == 1
    assert quiet.closes == [("idle_timeout", False)] and busy.closes == []
    busy.bytes_from_downstream = 5
    assert close_idle([busy, quiet], now=21) == 1  # still there a timeout later: stuck
    assert quiet.closes[-1] == ("idle_timeout", True)
    assert busy.closes == []


@pytest.mark.parametrize("timeout, interval", [(0.4, 0.05), (8, 1.0), (3600, 1.0)])
def test_the_sweep_runs_every_eighth_of_the_timeout_and_at_least_once_a_second(timeout, interval):
    assert idle_sweep_interval(timeout) == interval
