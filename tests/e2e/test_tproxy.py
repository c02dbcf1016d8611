"""Inbound that keeps the client's address: `--inbound-mode tproxy`, and `inbound_source`.

A remote client (192.0.2.2, 2001:db8:1::2) calls the app in the pod through
the proxy, with the rules of iptables/redirect.sh on every backend:

* TPROXY: the app sees the client's address (the port is the kernel's
  choice, as with Envoy's original_src: see proxy/datapath/upstream.py);
  bytes arrive intact both ways, with a half-close (the app answers after
  the client's EOF) and a reset from the app that reaches the client as a
  reset; the proxy's own connection to the app is not captured again (one
  access-log entry per client connection, no loop-guard refusal, and the
  rule that exempts it counted packets); cleanup.sh leaves the rules, the
  ip rules and the routes exactly as they were (dumps before and after).
* Without CAP_NET_ADMIN, a proxy configured for tproxy exits 1 with one
  line naming the capability.
* REDIRECT with inbound_source 127.0.0.6: the app sees 127.0.0.6 (::6 for
  IPv6), and nothing loops.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import struct
from pathlib import Path

import pytest
from support import ProxyProcess, Server, digest_sink, recv_line

from proxy.demo.netns import PodWorld

pytestmark = pytest.mark.netns

IPTABLES = Path(__file__).resolve().parents[2] / "iptables"
APP_PORT, RESET_PORT = 8080, 8081
SERVICE_PORT, EXCLUDED_PORT = 80, 25  # the remote's services
BULK = 4 << 20
BACKENDS = ("nft", "legacy", "nft-native")


def who_and_digest(conn: socket.socket) -> None:
    """Say who called (address and port), then read to EOF and answer with the count and sha256."""
    host, port = conn.getpeername()[:2]
    conn.sendall(f"{host} {port}\n".encode())
    digest_sink(conn)


def reset_after_line(conn: socket.socket) -> None:
    """Read one line, then close with a RST."""
    recv_line(conn)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def dump(world: PodWorld) -> str:
    """Everything the rule scripts may touch in the pod: rules of every backend, ip rules,
    routes of every table, the addresses on lo."""
    parts = []
    for cmd in (("iptables-nft-save",), ("ip6tables-nft-save",), ("iptables-legacy-save",),
                ("ip6tables-legacy-save",), ("nft", "list", "ruleset"), ("ip", "-4", "rule"), ("ip", "-6", "rule"),
                ("ip", "-4", "route", "show", "table", "all"), ("ip", "-6", "route", "show", "table", "all"),
                ("ip", "addr", "show", "dev", "lo")):
        out = world.pod.exec(*cmd).stdout
        # the save programs' date lines differ from run to run; the kernel adds eth0's
        # link-local address (and its routes) on its own time
        # (the built-in chains' policy counters count too)
        parts.append("\n".join(re.sub(r" \[\d+:\d+\]$", "", line) for line in out.splitlines()
                               if not line.startswith("#") and "fe80::" not in line))
    return "\n".join(parts)


def at(host: str, port: int) -> str:
    """An address as the access log writes it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def script(world: PodWorld, name: str, *args: str) -> str:
    return world.pod.exec("sh", str(IPTABLES / name), *args).stdout


def call(ns, addr: tuple[str, int], payload: bytes) -> tuple[str, int, int, str]:
    """From `ns` (the remote: a client): connect, read who the server saw, send `payload`,
    half-close, read the server's digest. (seen address, seen port, count, sha256)."""
    with ns.connect(addr, timeout=10) as c:
        seen_host, seen_port = recv_line(c).split()
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        count, digest = recv_line(c).split()
        assert c.recv(1) == b"", "the app's end did not close after its answer"
        return seen_host, int(seen_port), int(count), digest


def client_port_and_reset(world: PodWorld, addr: tuple[str, int]) -> type[BaseException] | None:
    """From the remote: a line to the app on RESET_PORT, which resets; what the client saw."""
    with world.remote.connect(addr, timeout=10) as c:
        c.sendall(b"bye\n")
        try:
            c.recv(1)
        except ConnectionResetError as exc:
            return type(exc)
    return None


@pytest.fixture
def app(world):
    servers = [Server(world.remote, (host, port), who_and_digest)
               for host in ("198.51.100.10", "2001:db8:2::10") for port in (SERVICE_PORT, EXCLUDED_PORT)]
    for host in (PodWorld.POD_V4, PodWorld.POD_V6):
        servers.append(Server(world.pod, (host, APP_PORT), who_and_digest))
        servers.append(Server(world.pod, (host, RESET_PORT), reset_after_line))
    yield servers
    for s in servers:
        s.close()


def rule_counter(world: PodWorld, backend: str, comment: str) -> int:
    """Packets counted by the rules with this comment, both families (the backend's own listing)."""
    if backend == "nft-native":
        out = world.pod.exec("nft", "list", "table", "inet", "sidecar_proxy").stdout
        return sum(int(line.split("counter packets ")[1].split()[0]) for line in out.splitlines()
                   if f'"sidecar-proxy: {comment}"' in line)
    total = 0
    for tool in (f"iptables-{backend}-save", f"ip6tables-{backend}-save"):
        for line in world.pod.exec(tool, "-c").stdout.splitlines():
            if f'"sidecar-proxy: {comment}"' in line:
                total += int(line[1:].split(":")[0])
    return total


def with_legacy_tables(world: PodWorld) -> None:
    """The legacy backend's tables, made before the `before` dump: the kernel keeps one
    for the life of the namespace once it is used (iptables/README.md, "Empty tables")."""
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        for table in ("nat", "raw", "mangle"):
            world.pod.exec(tool, "-t", table, "-S")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tproxy_the_app_sees_the_client(world, app, backend):
    with_legacy_tables(world)
    before = dump(world)
    args = ("--inbound-mode", "tproxy", "--backend", backend, "--ipv6", "on",
            "--exclude-outbound-ports", str(EXCLUDED_PORT))
    out = script(world, "redirect.sh", *args)
    assert "installed" in out
    rules = dump(world)
    for family in ("-4", "-6"):
        assert "fwmark 0x539 lookup 133" in world.pod.ip(family, "rule"), rules
        assert "local default dev lo" in world.pod.ip(family, "route", "show", "table", "133"), rules
    check = world.pod.exec("sh", str(IPTABLES / "redirect.sh"), *args, "--check", check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    proxy = ProxyProcess(world.pod, config={"inbound_mode": "tproxy"}, caps=("net_admin",))
    try:
        payload = os.urandom(BULK)
        want = (str(len(payload)), hashlib.sha256(payload).hexdigest())
        made = 0
        for pod, remote in ((PodWorld.POD_V4, PodWorld.REMOTE_V4), (PodWorld.POD_V6, PodWorld.REMOTE_V6)):
            seen_host, _, count, digest = call(world.remote, (pod, APP_PORT), payload)
            made += 1
            assert seen_host == remote, f"the app saw {seen_host}, not the client {remote}"
            assert (str(count), digest) == want, "bytes changed on the way"
            entry = proxy.access(destination=at(pod, APP_PORT))
            assert entry["direction"] == "inbound"
            assert entry["source"].startswith(at(remote, 0)[:-1]), entry
            assert client_port_and_reset(world, (pod, RESET_PORT)) is ConnectionResetError
            made += 1
            assert proxy.access(destination=at(pod, RESET_PORT))["end"] == "upstream_reset"
        # outbound stays REDIRECT, and the replies of the pod's own connections are not TPROXY'd:
        # captured (through the proxy), excluded (direct), and the app calling its own pod IP
        for service, port in ((PodWorld.POD_V4, APP_PORT), ("198.51.100.10", SERVICE_PORT),
                              ("198.51.100.10", EXCLUDED_PORT), ("2001:db8:2::10", SERVICE_PORT)):
            _, _, count, digest = call(world.pod, (service, port), payload)
            assert (str(count), digest) == want, f"bytes changed on the way to {service}:{port}"
            if port != EXCLUDED_PORT:
                made += 1
                proxy.access(destination=at(service, port))
        entries = proxy.access_entries()
        assert len(entries) == made, f"each captured connection once in the access log: {entries}"
        assert not [e for e in proxy.lines if "refused" in e.get("msg", "")], proxy.raw
        # the proxy's connection to the app passed the exemption rule, and was not TPROXY'd again
        assert rule_counter(world, backend, "proxy to the app, tproxy mark 0x539") > 0, dump(world)
    finally:
        proxy.stop()
    script(world, "cleanup.sh", "--backend", backend)
    assert dump(world) == before, "cleanup.sh left something behind"


def test_tproxy_without_cap_net_admin_exits_1_with_one_line(world):
    proxy = ProxyProcess(world.pod, config={"inbound_mode": "tproxy"}, wait=False)
    code = proxy.proc.wait(timeout=30)
    proxy.stop()
    lines = [line for line in proxy.raw if line.strip()]
    assert code == 1, proxy.raw
    assert len(lines) == 1, lines
    assert "CAP_NET_ADMIN" in lines[0] and "IP_TRANSPARENT" in lines[0], lines[0]


@pytest.mark.parametrize("method", ("uid", "explicit"))
def test_inbound_source_127_0_0_6(world, app, method, tmp_path):
    with_legacy_tables(world)
    before = dump(world)
    args = ["--inbound-source", "127.0.0.6", "--ipv6", "on", "--method", method]
    if method == "explicit":
        services = tmp_path / "services"
        services.write_text("198.51.100.10:80\n")
        os.chmod(tmp_path, 0o755)
        args += ["--services", str(services)]
    script(world, "redirect.sh", *args)
    assert "::6/128" in world.pod.ip("-6", "addr", "show", "dev", "lo")
    proxy = ProxyProcess(world.pod, config={"inbound_source": "127.0.0.6"})
    try:
        payload = os.urandom(1 << 20)
        for pod, seen in ((PodWorld.POD_V4, "127.0.0.6"), (PodWorld.POD_V6, "::6")):
            seen_host, _, count, digest = call(world.remote, (pod, APP_PORT), payload)
            assert seen_host == seen
            assert (count, digest) == (len(payload), hashlib.sha256(payload).hexdigest())
        entries = [proxy.access(destination=at(pod, APP_PORT)) for pod in (PodWorld.POD_V4, PodWorld.POD_V6)]
        assert len(proxy.access_entries()) == 2, f"one entry per client connection, no loop: {entries}"
        assert all(e["direction"] == "inbound" for e in entries), entries
    finally:
        proxy.stop()
    script(world, "cleanup.sh")
    assert dump(world) == before, "cleanup.sh left something behind"



def foreign_routing(world: PodWorld, action: str) -> None:
    """`add` or `del` what Istio's init step would put there: our rule and route, and ::6,
    without our marks of ownership."""
    for family in ("-4", "-6"):
        world.pod.ip(family, "rule", action, "fwmark", "0x539", "lookup", "133")
        world.pod.ip(family, "route", action, "local", "default", "dev", "lo", "table", "133")
    world.pod.ip("-6", "addr", action, "::6/128", "dev", "lo")


def test_cleanup_leaves_the_same_routing_someone_else_put_there(world, app):
    """The same fwmark rule and local route, and ::6 on lo, put there before us
    (Istio's init step installs the same): redirect.sh uses them as they are,
    the proxy works through them, and cleanup.sh removes only what carries our
    mark of ownership (route.sh), here nothing, in both modes."""
    foreign_routing(world, "add")
    before = dump(world)
    script(world, "redirect.sh", "--inbound-mode", "tproxy", "--ipv6", "on")
    assert dump(world).count("lookup 133") == before.count("lookup 133"), "a second copy of the rule"
    proxy = ProxyProcess(world.pod, config={"inbound_mode": "tproxy"}, caps=("net_admin",))
    try:
        seen_host, _, count, _ = call(world.remote, (PodWorld.POD_V4, APP_PORT), b"x" * 1000)
        assert (seen_host, count) == (PodWorld.REMOTE_V4, 1000)
    finally:
        proxy.stop()
    dry = script(world, "cleanup.sh", "--dry-run")
    assert "policy routing removal" not in dry and "::6/128" not in dry, dry
    script(world, "cleanup.sh")
    assert dump(world) == before, "cleanup.sh removed routing that was not its own"
    # the 127.0.0.6 mode keeps a ::6 it found too
    script(world, "redirect.sh", "--inbound-source", "127.0.0.6", "--ipv6", "on")
    script(world, "cleanup.sh")
    assert dump(world) == before, "cleanup.sh removed a ::6 it did not add"
    # and what it adds itself, it removes
    foreign_routing(world, "del")
    empty = dump(world)
    script(world, "redirect.sh", "--inbound-mode", "tproxy", "--ipv6", "on")
    assert "proto 83" in world.pod.ip("-4", "rule")
    script(world, "cleanup.sh")
    script(world, "redirect.sh", "--inbound-source", "127.0.0.6", "--ipv6", "on")
    assert "::6/128 scope" in world.pod.ip("-6", "addr", "show", "dev", "lo")
    script(world, "cleanup.sh")
    assert dump(world) == empty, "cleanup.sh left something of its own behind"
