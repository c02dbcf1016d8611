"""The rule scripts with the real proxy: every bypass method, real traffic.

For each method of iptables/redirect.sh (uid, mark, cgroup with a net_cls
classid, cgroup v2 by path, explicit), each address family and both kinds of
backend (iptables through iptables-restore, chosen by auto; nft-native), one
test builds a pod and a remote namespace, installs the rules with the script
as the init step would, and probes every path a connection can take twice:
first with the proxy stopped (a captured connection is REDIRECTed to a
closed port and refused; one that is not captured still works), then with
the proxy running (a captured connection shows up in the access log exactly
once, an uncaptured one never). Afterwards cleanup.sh leaves no SIDECAR_
rule behind.

The paths (iptables/README.md, "The rules"):

| probe | from -> to | uid, mark, cgroup | explicit |
|---|---|---|---|
| web | app -> remote service, forwarded to its original destination | captured | not listed: direct |
| vip | app -> service address, forwarded to the backend cluster | captured | captured |
| loopback | app -> 127.0.0.1 / ::1 in the pod | direct | direct |
| excluded port / CIDR | app -> --exclude-outbound-ports / --exclude-cidrs | direct | direct (listed: excluded first) |
| inbound | remote -> pod IP, app port | captured, inbound | captured, inbound |
| inbound, excluded port | remote -> pod IP, --exclude-inbound-ports | direct | direct |
| own pod IP | app -> its own pod IP, app port | captured, inbound | direct |
| own pod IP, excluded port | app -> its own pod IP, --exclude-inbound-ports | direct | direct |

The proxy runs as UID 1337 with no capability at all, except CAP_NET_ADMIN
alone for the mark method (read from /proc/PID/status). Two more tests:
the limit of the explicit method (the proxy dialling a listed destination
itself loops; its loop guard refuses that), and `--inbound-ports ""`.

The cgroup methods enter only the pod's network namespace (`nsenter --net`),
for the script and for the proxy: `ip netns exec` would give both a mount
namespace of their own with a fresh /sys, so the net_cls mount the script
makes would vanish with it and the proxy would not see the cgroups.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from support import PROXY_UID, PYTHON, ProxyProcess, Server, digest_sink, identify, recv_line, setpriv_argv

from proxy.demo.netns import PodWorld, run

pytestmark = pytest.mark.netns

IPTABLES = Path(__file__).resolve().parents[2] / "iptables"
# besides what conftest's netns_prerequisites checks
TOOLS = ("sh", "nsenter", "mount", "umount", "ip6tables-save")

MB = 1 << 20
APP_PORT, SSH_PORT, LOCAL_PORT = 8080, 2222, 9090
MARK = "0x539"  # not the default 0x1: the proxy's --mark must match the rules' --mark
CAP_NET_ADMIN = 1 << 12
EXCLUSIONS = ("--exclude-outbound-ports", "25",
              "--exclude-cidrs", "198.51.100.192/26,2001:db8:2::ff00/120",
              "--exclude-inbound-ports", str(SSH_PORT))


@dataclass(frozen=True)
class Family:
    name: str
    pod: str  # the pod IP
    remote: str  # the remote namespace's end of the veth
    loopback: str
    any: str
    web: tuple[str, int]  # a service the proxy forwards to its original destination
    vip: tuple[str, int]  # a service address the proxy forwards to `backend`
    backend: tuple[str, int]
    smtp: tuple[str, int]  # an excluded outbound port
    outside: tuple[str, int]  # inside an excluded CIDR


V4 = Family("ipv4", PodWorld.POD_V4, PodWorld.REMOTE_V4, "127.0.0.1", "0.0.0.0",
            web=("198.51.100.10", 80), vip=("198.51.100.100", 80), backend=("198.51.100.20", 8080),
            smtp=("198.51.100.30", 25), outside=("198.51.100.200", 80))
V6 = Family("ipv6", PodWorld.POD_V6, PodWorld.REMOTE_V6, "::1", "::",
            web=("2001:db8:2::10", 80), vip=("2001:db8:2::100", 80), backend=("2001:db8:2::20", 8080),
            smtp=("2001:db8:2::30", 25), outside=("2001:db8:2::ff10", 80))

# The proxy's configuration in every test: each family's service address goes
# to its backend; everything else to its original destination (passthrough).
CONFIG = {
    "clusters": [
        {"name": "backend-ipv4", "endpoints": ["198.51.100.20:8080"]},
        {"name": "backend-ipv6", "endpoints": ["[2001:db8:2::20]:8080"]},
    ],
    "chains": [
        {"name": "vip-ipv4", "match": {"destinations": ["198.51.100.100/32"], "ports": [80]},
         "cluster": "backend-ipv4"},
        {"name": "vip-ipv6", "match": {"destinations": ["2001:db8:2::100/128"], "ports": [80]},
         "cluster": "backend-ipv6"},
    ],
}

# The explicit method captures only what this lists. The last four lines are
# listed *and* excluded: the exclusions come first, so they stay uncaptured.
SERVICES = """\
# the service addresses; the proxy connects to their endpoints, never to them
198.51.100.100:80
[2001:db8:2::100]:80
# listed, but excluded by --exclude-outbound-ports and --exclude-cidrs
198.51.100.0/24:25
[2001:db8:2::/64]:25
198.51.100.192/26:80
[2001:db8:2::ff00/120]:80
"""


def fmt(host: str, port: int) -> str:
    """An address the way the access log writes it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host(address: str) -> str:
    """The host part of an access-log address (`192.0.2.1:4000`, `[2001:db8::1]:4000`)."""
    return address.rsplit(":", 1)[0].strip("[]")


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 100000}{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def method_prerequisites(netns_prerequisites) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools for the method tests: {', '.join(missing)} (iptables, util-linux)")


# ------------------------------------------------------------------ methods --

@dataclass
class Method:
    """One bypass method: the script's arguments and how the proxy must run."""

    name: str
    args: list[str]
    proxy: dict = field(default_factory=dict)  # ProxyProcess keyword arguments
    nsenter: bool = False  # enter only the network namespace (the cgroup methods)
    cap_eff: int = 0
    cgroup: tuple[str, str] | None = None  # (controllers, path) /proc/PID/cgroup must show
    captures_all: bool = True  # False: only the services file's destinations
    made: Path | None = None  # what redirect.sh creates and cleanup.sh removes
    script_prefix: tuple[str, ...] = ()  # run the scripts under this (a mount namespace of their own)


def native(m: Method) -> Method:
    """The same method with the nft-native backend. nft looks a cgroup v2
    path up below /sys/fs/cgroup, which on a host with the hybrid layout is
    not the cgroup2 file system: the scripts then run in a mount namespace
    of their own where it is (tests/e2e/test_rules_netns.py checks the
    one-line refusal without it)."""
    prefix = cgroup2_layout() if "--cgroup-path" in m.args else ()
    return replace(m, args=[*m.args, "--backend", "nft-native"], script_prefix=prefix)


def cgroup2_layout() -> tuple[str, ...]:
    roots = [mnt for mnt, kind, _ in mounts() if kind == "cgroup2"]
    assert roots, "no cgroup2 file system is mounted"
    if roots[0] == "/sys/fs/cgroup":
        return ()
    setup = f"mount --bind {roots[0]} /sys/fs/cgroup"
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", f'{setup} && exec "$@"', "sh")


def mounts() -> list[tuple[str, str, str]]:
    """(mount point, type, options) of every mount."""
    with open("/proc/self/mounts") as f:
        return [(p[1], p[2], p[3]) for p in (line.split() for line in f)]


def is_net_cls_mount(path: Path) -> bool:
    return any(mnt == str(path) and kind == "cgroup" and "net_cls" in opts.split(",")
               for mnt, kind, opts in mounts())


def rmdir_cgroup(path: Path) -> None:
    """Remove a cgroup directory; its last process may take a moment to leave."""
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
    path.rmdir()


@contextlib.contextmanager
def net_cls_method() -> Iterator[Method]:
    """--method cgroup (net_cls): the script mounts a net_cls hierarchy on
    the parent of a fresh --cgroup-dir and creates the cgroup; the proxy puts
    itself in with --cgroup. The cgroup's name is unique (a host has one
    net_cls hierarchy, however often it is mounted); the test removes the
    cgroup, the mount and the directory whatever happens."""
    if not any(line.split()[:1] == ["net_cls"] for line in Path("/proc/cgroups").read_text().splitlines()):
        pytest.fail("this kernel has no net_cls cgroup controller (CONFIG_CGROUP_NET_CLASSID)")
    top = Path(tempfile.mkdtemp(prefix="scp-mt-cg-"))
    top.chmod(0o755)  # the proxy's UID must reach the cgroup's files
    root = top / "net_cls"
    leaf = unique("scp-mt-")
    directory = root / leaf
    try:
        yield Method("cgroup-net_cls", ["--method", "cgroup", "--cgroup-dir", str(directory)],
                     proxy={"args": ("--cgroup", str(directory)), "enter": "nsenter"}, nsenter=True,
                     cgroup=("net_cls", f"/{leaf}"), made=directory)
    finally:
        if is_net_cls_mount(root):
            try:
                rmdir_cgroup(directory)
            finally:
                run(["umount", str(root)])
        if is_net_cls_mount(root):
            raise AssertionError(f"{root} is still mounted")
        shutil.rmtree(top)


@contextlib.contextmanager
def cgroup2_method() -> Iterator[Method]:
    """--method cgroup --cgroup-path: a fresh cgroup v2 directory. The proxy
    runs in it from its first instruction, as in its container's cgroup: the
    (root) launcher moves itself in, then execs the unprivileged proxy. (The
    proxy cannot move itself from the root cgroup: cgroup v2 wants write
    access to the common ancestor's cgroup.procs too.)"""
    roots = [mnt for mnt, kind, _ in mounts() if kind == "cgroup2"]
    if not roots:
        pytest.fail("no cgroup2 file system is mounted (the --cgroup-path method needs one)")
    name = unique("scp-mt-")
    directory = Path(roots[0]) / name
    directory.mkdir()
    try:
        join = ("sh", "-c", 'echo "$$" > "$0" && exec "$@"', str(directory / "cgroup.procs"))
        yield Method("cgroup-v2", ["--method", "cgroup", "--cgroup-path", f"/{name}"],
                     proxy={"prefix": join, "enter": "nsenter"}, nsenter=True, cgroup=("", f"/{name}"))
    finally:
        rmdir_cgroup(directory)


@contextlib.contextmanager
def method(name: str, tmp_path: Path) -> Iterator[Method]:
    if name == "uid":
        yield Method("uid", ["--method", "uid"])
    elif name == "mark":
        yield Method("mark", ["--method", "mark", "--mark", MARK],
                     proxy={"args": ("--mark", MARK), "caps": ("net_admin",)}, cap_eff=CAP_NET_ADMIN)
    elif name == "cgroup-net_cls":
        with net_cls_method() as m:
            yield m
    elif name == "cgroup-v2":
        with cgroup2_method() as m:
            yield m
    elif name == "explicit":
        services = tmp_path / "services"
        services.write_text(SERVICES)
        yield Method("explicit", ["--method", "explicit", "--services", str(services)], captures_all=False)
    else:
        raise ValueError(name)


def script(world: PodWorld, m: Method, name: str, *args: str) -> str:
    """Run iptables/NAME in the pod namespace, as the init step would; its stdout."""
    cmd = ("sh", str(IPTABLES / name), *args)
    if m.nsenter or m.script_prefix:
        return run([*m.script_prefix, *world.pod.nsenter_argv(*cmd)]).stdout
    return world.pod.exec(*cmd).stdout


def saved_rules(world: PodWorld) -> str:
    """iptables-save of both families, and nft's whole ruleset."""
    return "".join(world.pod.exec(*tool).stdout
                   for tool in (("iptables-save",), ("ip6tables-save",), ("nft", "list", "ruleset")))


def assert_cleaned_up(world: PodWorld, m: Method) -> None:
    script(world, m, "cleanup.sh", *m.args)
    rules = saved_rules(world)
    assert "SIDECAR_" not in rules and "sidecar_proxy" not in rules, f"cleanup.sh left rules behind:\n{rules}"
    assert m.made is None or not m.made.exists(), f"cleanup.sh left {m.made} behind"


# ------------------------------------------------------------------ probes --

def greeting(ns, addr: tuple[str, int]) -> str:
    """Connect, read the server's greeting, check an echo both ways, close."""
    with ns.connect(addr) as c:
        line = recv_line(c).strip()
        c.sendall(b"ping\n")
        assert recv_line(c) == "ping\n", f"no echo from {addr}"
        c.shutdown(socket.SHUT_WR)
        assert c.recv(1) == b""
    return line


def refused(ns, addr: tuple[str, int]) -> bool:
    try:
        ns.connect(addr, timeout=3).close()
    except ConnectionRefusedError:
        return True
    return False


def send_digest(ns, addr: tuple[str, int], total: int) -> None:
    """Send `total` random bytes, half-close; the server must have got exactly them."""
    payload = os.urandom(total)
    with ns.connect(addr) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        assert recv_line(c).split() == [str(total), hashlib.sha256(payload).hexdigest()], "bytes changed"


@contextlib.contextmanager
def servers(world: PodWorld, f: Family) -> Iterator[dict[str, Server]]:
    """The app's servers in the pod and the services in the remote namespace."""
    plan = {
        "app": (world.pod, (f.any, APP_PORT), identify("app")),
        "ssh": (world.pod, (f.any, SSH_PORT), identify("ssh")),  # an excluded inbound port
        "local": (world.pod, (f.loopback, LOCAL_PORT), identify("local")),
        "web": (world.remote, f.web, digest_sink),
        "vip-direct": (world.remote, f.vip, identify("vip-direct")),  # reached only if not captured
        "backend": (world.remote, f.backend, identify("backend")),
        "smtp": (world.remote, f.smtp, identify("smtp")),
        "outside": (world.remote, f.outside, identify("outside")),
    }
    started: dict[str, Server] = {}
    try:
        for name, (ns, addr, handler) in plan.items():
            started[name] = Server(ns, addr, handler)
        yield started
    finally:
        for srv in started.values():
            srv.close()


def probe_without_proxy(world: PodWorld, f: Family, m: Method) -> None:
    """The proxy is not running: what is captured goes to a closed port."""
    w = world
    assert refused(w.pod, f.web) == m.captures_all, "app -> web"
    assert refused(w.pod, f.vip), "app -> service address: not captured"
    assert refused(w.remote, (f.pod, APP_PORT)), "remote -> pod: inbound not captured"
    assert refused(w.pod, (f.pod, APP_PORT)) == m.captures_all, "app -> own pod IP"
    probe_direct_paths(w, f)


def probe_direct_paths(world: PodWorld, f: Family) -> None:
    """What is never captured reaches its server directly, proxy or not."""
    w = world
    assert greeting(w.pod, (f.loopback, LOCAL_PORT)) == f"local {f.loopback}"
    assert greeting(w.pod, f.smtp) == f"smtp {f.pod}"  # --exclude-outbound-ports
    assert greeting(w.pod, f.outside) == f"outside {f.pod}"  # --exclude-cidrs
    # --exclude-inbound-ports: the app sees the remote itself, not the proxy
    assert greeting(w.remote, (f.pod, SSH_PORT)) == f"ssh {f.remote}"
    assert greeting(w.pod, (f.pod, SSH_PORT)) == f"ssh {f.pod}"


# ------------------------------------------------------------------- tests --

METHODS = ["uid", "mark", "cgroup-net_cls", "cgroup-v2", "explicit"]
BACKENDS = ["iptables", "nft-native"]


@pytest.mark.parametrize("f", [V4, V6], ids=lambda f: f.name)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method_name", METHODS)
def test_method_with_the_real_proxy(method_prerequisites, world, tmp_path, method_name, backend, f):
    w = world
    with method(method_name, tmp_path) as m, servers(w, f) as srv:
        if backend == "nft-native":
            m = native(m)
        out = script(w, m, "redirect.sh", *m.args, *EXCLUSIONS)
        assert f"installed: method {m.args[1]}, IPv4 and IPv6" in out
        assert ("backend nft-native" in out) == (backend == "nft-native"), out
        if m.name == "mark":
            mark = f"meta mark 0x{int(MARK, 16):08x} " if backend == "nft-native" else f"-m mark --mark {MARK} "
            assert mark in saved_rules(w), "the rules bypass the proxy's mark"

        probe_without_proxy(w, f, m)
        for s in srv.values():
            s.accepted.clear()

        proxy = ProxyProcess(w.pod, config=CONFIG, **m.proxy)
        try:
            # the proxy: UID 1337, the capabilities its method needs and no more
            assert proxy.status_field("Uid").split()[:2] == [str(PROXY_UID)] * 2
            assert int(proxy.status_field("CapEff"), 16) == m.cap_eff
            if m.cgroup is not None:
                with open(f"/proc/{proxy.pid}/cgroup") as cg:
                    lines = cg.read().splitlines()
                assert any(line.split(":", 2)[1:] == list(m.cgroup) for line in lines), \
                    f"the proxy is not in the cgroup {m.cgroup}: {lines}"

            probe_direct_paths(w, f)  # first: none of them may leave an access entry

            expected = []  # (direction, destination, upstream) of every captured app connection
            # outbound to the original destination: the loop-prone case
            send_digest(w.pod, f.web, MB)
            assert [peer[0] for peer in srv["web"].accepted] == [f.pod], "the web server saw the pod IP once"
            if m.captures_all:
                expected.append(("outbound", fmt(*f.web), fmt(*f.web)))
            # outbound to a service address, to the backend cluster
            assert greeting(w.pod, f.vip) == f"backend {f.pod}"
            assert not srv["vip-direct"].accepted
            expected.append(("outbound", fmt(*f.vip), fmt(*f.backend)))
            # inbound: the app sees the proxy's connection from the pod IP
            assert greeting(w.remote, (f.pod, APP_PORT)) == f"app {f.pod}"
            expected.append(("inbound", fmt(f.pod, APP_PORT), fmt(f.pod, APP_PORT)))
            # the app calling its own pod IP (iptables/README.md, "Loopback and the pod's own IP")
            assert greeting(w.pod, (f.pod, APP_PORT)) == f"app {f.pod}"
            if m.captures_all:
                expected.append(("inbound", fmt(f.pod, APP_PORT), fmt(f.pod, APP_PORT)))

            for direction, destination, _ in expected:
                proxy.access(direction=direction, destination=destination)
            time.sleep(0.3)  # anything else (a loop, a stray capture) would show by now
            entries = proxy.access_entries()
            got = sorted((e["direction"], e["destination"], e["upstream"]) for e in entries)
            assert got == sorted(expected), "exactly one access entry per captured app connection"
            assert all(e["end"] == "done" for e in entries), entries
            assert not any(e["end"] == "loop_guard" for e in entries)
            if m.captures_all:
                web = proxy.access(destination=fmt(*f.web))
                assert web["chain"] == "passthrough" and web["bytes_up"] == MB
                assert host(web["source"]) == f.pod
            vip = proxy.access(destination=fmt(*f.vip))
            assert vip["chain"] == f"vip-{f.name}" and host(vip["source"]) == f.pod
            inbound = [e for e in entries if e["direction"] == "inbound"]
            assert sorted(host(e["source"]) for e in inbound) == \
                sorted([f.remote] + ([f.pod] if m.captures_all else []))
        finally:
            proxy.stop()
        assert_cleaned_up(w, m)


@pytest.mark.parametrize("f", [V4, V6], ids=lambda f: f.name)
def test_explicit_method_loops_when_the_proxy_dials_a_listed_destination(
        method_prerequisites, world, tmp_path, f):
    """The explicit method has no bypass rule: nothing tells the proxy's own
    connections apart. List a destination that the proxy then forwards to as
    it is (the original destination): the proxy's upstream connection is
    captured again and comes back to the proxy itself. Its loop guard
    recognises its own source address and refuses it; the app's connection
    is reset; nothing reaches the server; the proxy lives on. (Hence the
    README's rule for this method: list service addresses, let the proxy
    connect to their endpoints; `sidecar-proxy services` skips chains whose
    action is "original".)"""
    w = world
    services = tmp_path / "services"
    services.write_text(f"{fmt(*f.web)}\n")
    m = Method("explicit", ["--method", "explicit", "--services", str(services)], captures_all=False)
    script(w, m, "redirect.sh", *m.args)
    srv = Server(w.remote, f.web, identify("web"))
    proxy = ProxyProcess(w.pod)
    try:
        with w.pod.connect(f.web) as c, pytest.raises(ConnectionResetError):
            c.sendall(b"hello\n")
            c.recv(10)
        refused_entry = proxy.access(end="loop_guard")
        assert refused_entry["destination"] == fmt(*f.web) and refused_entry["chain"] == "-"
        assert host(refused_entry["source"]) == f.pod  # the proxy's own upstream socket
        outer = proxy.access(end="upstream_reset")
        assert outer["destination"] == fmt(*f.web) and outer["chain"] == "passthrough"
        time.sleep(0.3)
        assert len(proxy.access_entries()) == 2, "the loop chained further"
        assert not srv.accepted
        assert proxy.alive()
    finally:
        proxy.stop()
        srv.close()
    assert_cleaned_up(w, m)


@pytest.mark.parametrize("f", [V4, V6], ids=lambda f: f.name)
def test_no_inbound_capture_leaves_the_own_pod_ip_alone(method_prerequisites, world, tmp_path, f):
    """iptables/README.md: with --inbound-ports "" neither inbound connections
    nor the app calling its own pod IP are captured; outbound still is."""
    w = world
    m = Method("uid", ["--method", "uid", "--inbound-ports", ""])
    script(w, m, "redirect.sh", *m.args)
    with servers(w, f):
        assert refused(w.pod, f.web), "outbound is still captured"
        assert greeting(w.remote, (f.pod, APP_PORT)) == f"app {f.remote}"
        assert greeting(w.pod, (f.pod, APP_PORT)) == f"app {f.pod}"
        proxy = ProxyProcess(w.pod)
        try:
            assert greeting(w.remote, (f.pod, APP_PORT)) == f"app {f.remote}"
            assert greeting(w.pod, (f.pod, APP_PORT)) == f"app {f.pod}"
            send_digest(w.pod, f.web, 1000)
            assert proxy.access(destination=fmt(*f.web))["direction"] == "outbound"
            time.sleep(0.3)
            assert len(proxy.access_entries()) == 1
        finally:
            proxy.stop()
    assert_cleaned_up(w, m)


LINK_LOCAL_PORT = 8443
POD_LINK_LOCAL, REMOTE_LINK_LOCAL = "fe80::1:1", "fe80::1:2"


@pytest.mark.parametrize("backend", BACKENDS)
def test_link_local_destinations_are_not_captured(method_prerequisites, world, backend):
    """Outbound TCP to fe80::/10 goes out directly (issue 12). Captured, it
    would reach the proxy with an original destination that has lost its
    interface (SO_ORIGINAL_DST carries no scope id for it), which the proxy
    cannot dial: the app's connection failed or hung. Here the app reaches
    the remote's link-local address on its interface, sees its own
    link-local source there, and the proxy never hears of it."""
    w = world
    w.pod.ip("-6", "addr", "add", f"{POD_LINK_LOCAL}/64", "dev", "eth0", "nodad")
    w.remote.ip("-6", "addr", "add", f"{REMOTE_LINK_LOCAL}/64", "dev", "eth0", "nodad")
    m = Method("uid", ["--method", "uid"])
    if backend == "nft-native":
        m = native(m)
    script(w, m, "redirect.sh", *m.args)
    srv = Server(w.remote, ("::", LINK_LOCAL_PORT), identify("link-local"))
    proxy = ProxyProcess(w.pod)
    try:
        with w.pod.entered():
            eth0 = socket.if_nametoindex("eth0")
        # a global address on the same port is captured (the proxy is in the path)
        assert greeting(w.pod, (V6.remote, LINK_LOCAL_PORT)) == f"link-local {V6.pod}"
        proxy.access(destination=fmt(V6.remote, LINK_LOCAL_PORT))
        line = greeting(w.pod, (REMOTE_LINK_LOCAL, LINK_LOCAL_PORT, 0, eth0))
        assert line.split("%")[0] == f"link-local {POD_LINK_LOCAL}", line
        time.sleep(0.3)
        assert len(proxy.access_entries()) == 1, "the link-local connection went through the proxy"
    finally:
        proxy.stop()
        srv.close()
    assert_cleaned_up(w, m)


# A destination that never answers: the remote drops what is sent to it.
BLACKHOLE = {"ipv4": ("198.51.100.77", 80), "ipv6": ("2001:db8:2::77", 80)}
REUSED_PORT = 40123
GIVE_UP = """
import socket, sys, time
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.setblocking(False)
s.connect_ex((sys.argv[3], int(sys.argv[4])))
time.sleep(1.5)  # one SYN retransmitted, no answer: give up, as the proxy's connect timeout does
s.close()
"""


def syn_sent_entries(world: PodWorld, port: int) -> list[str]:
    """The pod's conntrack entries in SYN_SENT from `port`."""
    text = world.pod.exec("cat", "/proc/net/nf_conntrack").stdout
    return [line for line in text.splitlines() if "SYN_SENT" in line and f"sport={port} " in line]


@pytest.mark.parametrize("f", [V4, V6], ids=lambda f: f.name)
@pytest.mark.parametrize("backend", ["nft", "legacy", "nft-native"])
def test_an_app_connection_reusing_the_ports_of_a_failed_proxy_connection_is_captured(
        method_prerequisites, world, backend, f):
    """Issue 12: after the proxy gives up on a black-holed destination, its
    conntrack entry stays in SYN_SENT for two minutes. An app connection that
    gets the same source port to the same destination used to match that
    entry (a retransmission, to conntrack), skip the nat table and escape
    capture: it hung. The proxy's own connections now have a conntrack zone
    of their own (original direction), so the app's SYN makes its own entry
    and is redirected."""
    w = world
    m = Method("uid", ["--method", "uid", "--backend", backend])
    script(w, m, "redirect.sh", *m.args)
    tool = "iptables" if f is V4 else "ip6tables"
    blackhole = BLACKHOLE[f.name]
    w.remote.exec(tool, "-A", "INPUT", "-d", blackhole[0], "-j", "DROP")
    proxy_port = w.pod.listen((f.any, 5001))  # stands in for the proxy: who arrives here was captured
    proxy_port.settimeout(5)
    try:
        # the proxy (its UID) tries the black hole from REUSED_PORT and gives up
        run([*w.pod.argv(*setpriv_argv()), PYTHON, "-c", GIVE_UP, f.pod, str(REUSED_PORT), *map(str, blackhole)])
        stale = syn_sent_entries(w, REUSED_PORT)
        assert len(stale) == 1 and "zone-orig=1" in stale[0], stale
        # the app, from the same port to the same destination
        with w.pod.socket(socket.AF_INET if f is V4 else socket.AF_INET6) as app:
            app.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            app.bind((f.pod, REUSED_PORT))
            app.settimeout(5)
            app.connect(blackhole)  # a TimeoutError here: it escaped to the black hole
            accepted, peer = proxy_port.accept()
            accepted.close()
        assert (peer[0], peer[1]) == (f.pod, REUSED_PORT)
    finally:
        proxy_port.close()
    assert_cleaned_up(w, m)


@pytest.mark.parametrize("f", [V4, V6], ids=lambda f: f.name)
@pytest.mark.parametrize("others", ["iptables-nft", "iptables-legacy"])
def test_nft_native_comes_before_other_peoples_nat_rules(method_prerequisites, world, tmp_path, others, f):
    """Somebody else's nat rules, installed first with iptables (a
    Docker-style DNAT in nat OUTPUT): for the service address and for the
    excluded SMTP port, both to the `outside` server. Of the nat chains on a
    hook the first that maps a connection wins, and ours run ten before the
    iptables nat table (-110): the app's connection to the service address
    is captured (the proxy sees its original destination and sends it to the
    backend cluster), while the SMTP connection, which our rules return,
    still gets the other DNAT."""
    w = world
    tool = f"{'iptables' if f is V4 else 'ip6tables'}-{others.split('-')[1]}"
    outside = f"[{f.outside[0]}]:{f.outside[1]}" if f is V6 else f"{f.outside[0]}:{f.outside[1]}"
    for dest in (f.vip, f.smtp):
        w.pod.exec(tool, "-w", "-t", "nat", "-A", "OUTPUT", "-d", dest[0], "-p", "tcp", "--dport", str(dest[1]),
                   "-j", "DNAT", "--to-destination", outside)
    m = native(Method("uid", ["--method", "uid"]))
    with servers(w, f):
        script(w, m, "redirect.sh", *m.args, "--exclude-outbound-ports", "25")
        proxy = ProxyProcess(w.pod, config=CONFIG)
        try:
            assert greeting(w.pod, f.vip) == f"backend {f.pod}", "captured first, by our nat chain"
            assert proxy.access(destination=fmt(*f.vip))["chain"] == f"vip-{f.name}"
            assert greeting(w.pod, f.smtp) == f"outside {f.pod}", "not ours: their DNAT still applies"
            time.sleep(0.3)
            assert len(proxy.access_entries()) == 1
        finally:
            proxy.stop()
    assert_cleaned_up(w, m)
    assert "DNAT" in w.pod.exec(f"{tool}-save").stdout, "their rules stay"
