"""`sidecar-proxy demo`: watch sidecar interception happen, on real rules.

The demo builds a throwaway pod: a pod network namespace and a remote one
joined by a veth pair (documentation addresses only, linked to nothing
else). It installs the redirect rules with the project's own init step
(`iptables/redirect.sh`), starts the proxy in the pod as UID 1337 without
privilege, plays the app and the remote services itself, and for every
connection prints the path it took:

    app -> what `sidecar-proxy explain` says will happen (asked first)
        -> the rules it hit (with their packet counters: iptables', or
           nft's with --backend nft-native)
        -> the proxy's chain -> the upstream -> what the server saw

Everything is removed afterwards, also on Ctrl-C or when a part fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from ..config import DEFAULT_ADMIN_PORT, DEFAULT_MARK, hostport
from ..config.methods import METHODS
from ..exitcodes import EXIT_OK, EXIT_USAGE
from ..kube.scripts import ScriptsMissing, scripts_dir
from .netns import PodWorld, ThreadedServer, run
from .sandbox import ProxyProcess

CONFIG = {
    "clusters": [{"name": "reviews", "endpoints": ["198.51.100.21:8080", "198.51.100.22:8080"]}],
    "chains": [
        {"name": "reviews", "match": {"ports": [80], "destinations": ["198.51.100.20/32"]}, "cluster": "reviews"},
        {"name": "no-smtp", "match": {"ports": [25]}, "action": "reject"},
    ],
}

# (what, where the app connects, who connects: "app" in the pod or "remote")
SCENARIOS = [
    ("outbound, no chain matches: passthrough to the original destination", ("198.51.100.10", 80), "app"),
    ("outbound to a service address: the chain sends it to a cluster", ("198.51.100.20", 80), "app"),
    ("the same again: round robin picks the other endpoint", ("198.51.100.20", 80), "app"),
    ("outbound to port 25: the reject chain", ("198.51.100.25", 25), "app"),
    ("outbound over IPv6", ("2001:db8:2::10", 80), "app"),
    ("inbound: a remote client calls the app on the pod IP", ("192.0.2.1", 8080), "remote"),
    ("loopback: the app calls a local service on 127.0.0.1", ("127.0.0.1", 9000), "app"),
]

_COUNTED = re.compile(r'^\[(\d+):\d+\] -A (\S+) (.*?)'
                      r'(?:-m comment --comment "?sidecar-proxy: ([^"]*)"?)? -j (\S+)(.*)$')


# a rule of our nft table: ... counter packets N bytes M VERDICT comment "sidecar-proxy: WHAT"
_NFT_COUNTED = re.compile(r'counter packets (\d+) bytes \d+ (?:jump |goto )?(\S+).*? comment "sidecar-proxy: ([^"]*)"')


def rule_counters(world: PodWorld, backend: str) -> dict[tuple, int]:
    """Packet counters of every nat rule in the pod, both families (with
    nft-native: of every rule of our table, where one rule may serve both)."""
    if backend == "nft-native":
        return nft_counters(world)
    counts = {}
    for family, tool in (("v4", "iptables-save"), ("v6", "ip6tables-save")):
        # mangle holds the rules of --inbound-mode tproxy (they count packets, not connections)
        out = "\n".join(world.pod.exec(tool, "-c", "-t", table, check=False).stdout for table in ("nat", "mangle"))
        for line in out.splitlines():
            m = _COUNTED.match(line)
            if m:
                pkts, chain, _match, comment, target, _rest = m.groups()
                counts[(family, chain, comment or target, target)] = int(pkts)
    return counts


# the table's chains outside nat: they see every packet, not a connection's first
_NFT_NOT_NAT = ("raw_output", "SIDECAR_PROXY_ZONE", "mangle_prerouting", "SIDECAR_DROP_INVALID")


def nft_counters(world: PodWorld) -> dict[tuple, int]:
    """The same from `nft list table inet sidecar_proxy`: per nat chain, per rule."""
    counts: dict[tuple, int] = {}
    chain = ""
    out = world.pod.exec("nft", "list", "table", "inet", "sidecar_proxy", check=False).stdout
    for line in out.splitlines():
        words = line.split()
        if words[:1] == ["chain"]:
            chain = words[1]
        m = _NFT_COUNTED.search(line)
        if m and chain and chain not in _NFT_NOT_NAT:
            pkts, verdict, comment = m.groups()
            target = verdict.upper() if verdict in ("return", "redirect", "drop") else verdict
            counts[("inet", chain, comment, target)] = int(pkts)
    return counts


BYPASS_HINT = ("own traffic", "proxy's mark", "proxy cgroup", "cgroup")


def hits(before: dict, after: dict) -> list[str]:
    """The rules whose packet counters moved, as '+N CHAIN "what" -> TARGET'.

    Only a connection's first packet walks the nat table, so +1 is one
    connection; the proxy's own upstream connection adds its own walk
    (through the bypass rule), which is why some hooks show +2.
    """
    out = []
    for key, value in after.items():
        delta = value - before.get(key, 0)
        if delta > 0:
            _family, chain, what, target = key
            whose = "   <- the proxy's own upstream connection" if target == "RETURN" and any(
                h in what for h in BYPASS_HINT) else ""
            if "SIDECAR_TPROXY" in chain + target:  # mangle: every packet of the connection walks it
                whose = f"   ({delta} packets)"
                delta = 1
            out.append(f'+{delta} {chain:<19} "{what}" -> {target}{whose}')
    return out


def identify(name: str):
    def handler(conn: socket.socket) -> None:
        conn.sendall(f"hello from {name}; I see you as {conn.getpeername()[0]}\n".encode())
    return handler


def talk(world: PodWorld, who: str, addr: tuple) -> str:
    ns = world.pod if who == "app" else world.remote
    try:
        with ns.connect(addr, timeout=3) as sock:
            return sock.recv(200).decode().strip() or "(closed without a word)"
    except ConnectionResetError:
        return "(connection reset: refused by the proxy)"
    except OSError as exc:
        return f"({exc.strerror or exc})"


def step(n: int, text: str) -> None:
    print(f"\n[{n}] {text}")


# the remote's servers: (name, address)
REMOTE_SERVERS = (("web", ("198.51.100.10", 80)), ("reviews-1", ("198.51.100.21", 8080)),
                  ("reviews-2", ("198.51.100.22", 8080)), ("mail", ("198.51.100.25", 25)),
                  ("web-v6", ("2001:db8:2::10", 80)))


def run_demo(method: str, backend: str = "auto", inbound_mode: str = "redirect") -> int:
    try:
        scripts = scripts_dir()
    except ScriptsMissing as exc:
        print(f"sidecar-proxy demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    world = proxy = None
    servers: list[ThreadedServer] = []
    workdir = tempfile.mkdtemp(prefix="scp-demo-")
    os.chmod(workdir, 0o755)
    script_args: list[str] = []
    try:
        world = PodWorld()
        step(1, f"a throwaway pod: namespace {world.pod.name} (pod IP {world.POD_V4}, {world.POD_V6}),\n"
                f"    remote namespace {world.remote.name} (services in 198.51.100.0/24 and 2001:db8:2::/64)")
        servers = start_servers(world)
        script_args, proxy_args = method_args(method, Path(workdir))
        if backend != "auto":
            script_args += ["--backend", backend]
        config, caps = CONFIG, [c.lower() for c in METHODS[method].proxy_capabilities]
        if inbound_mode == "tproxy":  # the app sees the remote client's address (IP_TRANSPARENT: CAP_NET_ADMIN)
            script_args += ["--inbound-mode", "tproxy"]
            config = {**CONFIG, "inbound_mode": "tproxy"}
            caps = sorted({*caps, "net_admin"})
        step(2, f"the init step, as root in the pod: sh iptables/redirect.sh {' '.join(script_args)}")
        out = run(world.pod.nsenter_argv("sh", str(scripts / "redirect.sh"), *script_args))
        print("    " + (out.stdout + out.stderr).strip().replace("\n", "\n    "))
        if backend == "nft-native":
            rules = world.pod.exec("nft", "list", "chain", "inet", "sidecar_proxy", "SIDECAR_OUTPUT").stdout
            print("    outbound chain (IPv4 and IPv6, one nft table):\n      " +
                  rules.strip().replace("\n", "\n      "))
        else:
            rules = world.pod.exec("iptables", "-t", "nat", "-S", "SIDECAR_OUTPUT").stdout
            print("    outbound chain (IPv4):\n      " + rules.strip().replace("\n", "\n      "))

        step(3, "the proxy: sidecar-proxy run, as UID 1337" +
             (f" with {', '.join('CAP_' + c.upper() for c in caps)} alone" if caps else ", no capabilities") +
             (", inbound_mode: tproxy" if inbound_mode == "tproxy" else ""))
        proxy = ProxyProcess(world.pod, config=config, args=tuple(proxy_args), caps=tuple(caps),
                             enter="nsenter" if method == "cgroup" else "ip-netns")
        print(f"    pid {proxy.pid}, uid {proxy.status_field('Uid').split()[0]}, "
              f"effective capabilities {proxy.status_field('CapEff')}")

        step(4, "traffic: each connection, what explain said first, the rules it hit, and what the proxy did")
        explained = Path(workdir) / "proxy.json"  # the proxy's config for explain, its --mark included
        explained.write_text(json.dumps({**config, "mark": DEFAULT_MARK} if method == "mark" else config))
        for what, addr, who in SCENARIOS:
            show_connection(world, proxy, what, addr, who, backend, explained)
        print("\n  The proxy's own upstream connections hit the bypass rule (see the counters above),"
              "\n  so they left the pod instead of looping back into the proxy.")
        step(5, "cleaning up: proxy stopped, sh iptables/cleanup.sh, namespaces removed")
        return EXIT_OK
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        if proxy is not None:
            proxy.stop(verbose=False)
        for server in servers:
            server.close()
        if world is not None:
            run(world.pod.nsenter_argv("sh", str(scripts / "cleanup.sh"), *script_args[2:]), check=False)
            world.close()
        if os.path.ismount(os.path.join(workdir, "net_cls")):
            run(["umount", os.path.join(workdir, "net_cls")], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def start_servers(world: PodWorld) -> list[ThreadedServer]:
    """The remote's services, the app in the pod, and a local service on loopback."""
    servers = [ThreadedServer(world.remote, addr, identify(name)) for name, addr in REMOTE_SERVERS]
    servers.append(ThreadedServer(world.pod, ("0.0.0.0", 8080), identify("the app")))
    servers.append(ThreadedServer(world.pod, ("127.0.0.1", 9000), identify("a local sidecar-aware service")))
    return servers


def method_args(method: str, workdir: Path) -> tuple[list[str], list[str]]:
    """redirect.sh's arguments and the proxy's for `method`. The net_cls hierarchy
    is mounted under our own work directory, so the demo leaves no mount behind."""
    script_args, proxy_args = ["--method", method], []
    if method == "mark":
        proxy_args = ["--mark", f"{DEFAULT_MARK:#x}"]
    elif method == "cgroup":
        cgroup_dir = str(workdir / "net_cls" / "sidecar-proxy")
        script_args += ["--cgroup-dir", cgroup_dir]
        proxy_args = ["--cgroup", cgroup_dir]
    elif method == "explicit":
        services = workdir / "services"
        services.write_text("# the service addresses the app calls\n198.51.100.20:80\n198.51.100.25:25\n")
        script_args += ["--services", str(services)]
    return script_args, proxy_args


def explain(world: PodWorld, who: str, addr: tuple[str, int], config: Path) -> dict:
    """`sidecar-proxy explain --json` in the pod, asked before the connection is made:
    the rules as installed, the proxy's config file, its counters from its admin API."""
    args = ["--to", hostport(*addr), "--config", str(config), "--admin", f"127.0.0.1:{DEFAULT_ADMIN_PORT}",
            "--json"]
    if who == "remote":
        args += ["--inbound", "--from", PodWorld.REMOTE_V6 if ":" in addr[0] else PodWorld.REMOTE_V4]
    out = run(world.pod.nsenter_argv(sys.executable, "-m", "proxy", "explain", *args), check=False)
    try:
        return json.loads(out.stdout)["verdict"]
    except (ValueError, KeyError):
        return {"outcome": f"(explain failed: {(out.stderr or out.stdout).strip()[:200]})"}


def told(verdict: dict) -> str:
    """explain's verdict in the words of the proxy line below it."""
    if verdict["outcome"] != "captured":
        return verdict["outcome"]
    return f"captured: {verdict['direction']}, chain {verdict['chain']}, upstream {verdict['upstream'] or '-'}"


def show_connection(world: PodWorld, proxy: ProxyProcess, what: str, addr: tuple[str, int], who: str,
                    backend: str, config: Path) -> None:
    """Ask explain; make the connection; print the rules it hit, what the proxy did, and the reply."""
    foretold = explain(world, who, addr, config)
    seen = len(proxy.access_entries())
    before = rule_counters(world, backend)
    reply = talk(world, who, addr)
    after = rule_counters(world, backend)
    entry = proxy.wait_new_access(seen, timeout=1.0)
    print(f"\n  * {what}\n    {'app in the pod' if who == 'app' else 'client in the remote'} -> {hostport(*addr)}")
    print(f"      explain {told(foretold)}")
    for line in hits(before, after) or ["(no sidecar-proxy rule: not intercepted)"]:
        print(f"      rule   {line}")
    if entry is None:
        print("      proxy  (never saw it)")
    else:
        print(f"      proxy  conn {entry['id']}: {entry['direction']}, chain {entry['chain']}, "
              f"upstream {entry['upstream'] or '-'}, ended: {entry['end']}")
    print(f"      reply  {reply}")


def cmd_demo(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("sidecar-proxy demo: needs root (it creates network namespaces and iptables rules)", file=sys.stderr)
        return EXIT_USAGE
    needs = ("ip", "setpriv", "nsenter") + (("nft",) if args.backend == "nft-native" else ("iptables", "ip6tables"))
    missing = [t for t in needs if shutil.which(t) is None]
    if missing:
        print(f"sidecar-proxy demo: missing tools: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    # SIGTERM and SIGHUP clean up like Ctrl-C does; SIGINT too when it was
    # started with SIGINT ignored (a background job of a script), where
    # Python would not have made Ctrl-C a KeyboardInterrupt
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    print(f"sidecar-proxy demo: method {args.method}, backend {args.backend}, inbound {args.inbound_mode}")
    return run_demo(args.method, args.backend, args.inbound_mode)


def add_parser(sub) -> None:
    parser = sub.add_parser("demo", help="watch interception in a throwaway pod (root)")
    parser.add_argument("--method", choices=METHODS, default="uid",
                        help="how the proxy's own traffic escapes the redirect (default uid)")
    parser.add_argument("--backend", choices=("auto", "nft", "legacy", "nft-native"), default="auto",
                        help="the rules' backend (redirect.sh --backend): iptables-nft, iptables-legacy, or one "
                             "nftables table (its counters are then nft's); default auto")
    parser.add_argument("--inbound-mode", choices=("redirect", "tproxy"), default="redirect",
                        help="inbound by REDIRECT (the app sees the pod's address) or TPROXY (the app sees the "
                             "client's; the proxy gets CAP_NET_ADMIN); default redirect")
    parser.set_defaults(func=cmd_demo)
