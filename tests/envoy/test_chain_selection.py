"""Filter-chain selection, side by side with real Envoy on the same connections.

Generated listeners of a dozen filter chains (destination port, destination
prefixes, transport protocol, direct source, source type, source prefixes,
source ports) get the same few hundred connections, each from a chosen
source address and port to a chosen destination, through the project's own
redirect rules, first to real Envoy 1.40 and then to sidecar-envoy on each
event loop, all three on the same bootstrap file with the same command line,
each as UID 1337 in a fresh pod. Each chain writes the connections it took
to an access log with Envoy's %FILTER_CHAIN_NAME%; the logs must name the
same chain for every connection. The generator is seeded, so a difference is
reproducible; the seed and the chains are in the failure message.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from envoyproc import LOOPS, SUBJECTS, subject, tcp_proxy, validate, write_bootstrap

from proxy import config as cfg
from proxy.demo.netns import PodWorld, ThreadedServer

pytestmark = pytest.mark.netns

REDIRECT = Path(__file__).resolve().parents[2] / "iptables" / "redirect.sh"
PORT = 15001  # the listener both proxies take the redirected connections on
SINK = ("198.51.100.250", 7)  # every chain's upstream: a server in the remote that closes when the client does
# A connection is named in the logs by the bytes it sent (case i sends i + 1), not by its
# source port: a case that reuses a fixed source port (41000, 41001) with another destination
# would meet the first one's conntrack entry after the REDIRECT (both answer from the proxy's
# address), so netfilter gives it another source port at random, which may be the port of a
# later case. (The source-port criterion meets the port it was given on its first use only.)
LOG_FORMAT = "%BYTES_RECEIVED% %DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %FILTER_CHAIN_NAME%\n"

SOURCES = ["192.0.2.1", "192.0.2.10", "192.0.2.11", "192.0.2.129", "2001:db8:1::1", "2001:db8:1::10",
           "2001:db8:1::8000"]
DESTINATIONS = ["198.51.100.10", "198.51.100.70", "198.51.100.130", "203.0.113.9", "2001:db8:2::10",
                "2001:db8:2::8000", "192.0.2.1"]  # the last: the pod's own address, a local connection from it
PORTS = [80, 443, 8080, 9000]
SOURCE_PORTS = [41000, 41001]
ANY_PORT_FROM = 20000  # the source ports of the cases that take any: 20000, 20001, ... one each
# No 0.0.0.0/0 or ::/0: Envoy files a chain without destination prefixes under the same
# prefix, and which of two such chains it then takes varies from one Envoy process to the
# next (its hash maps are seeded per process); README, "Differences from Envoy".
DST_PREFIXES = ["198.51.100.0/24", "198.51.100.0/26", "198.51.100.64/26", "198.51.100.128/25", "198.51.100.0/23",
                "2001:db8:2::/64", "2001:db8:2::/112", "192.0.2.1/32", "203.0.113.0/24"]
SRC_PREFIXES = ["192.0.2.0/24", "192.0.2.0/28", "192.0.2.128/25", "2001:db8:1::/64", "2001:db8:1::/112"]
CHAINS = 12
POD = "192.0.2.1"  # a connection from it to it is a local one (source_type SAME_IP_OR_LOOPBACK)


@dataclass(frozen=True)
class Mix:
    """How chains are drawn: how often a chain takes each criterion, in Envoy's order of
    precedence (destination port, destination prefix, transport protocol, direct source,
    source type, source prefix, source port), and which source types it may name."""

    weights: tuple[int, ...]
    source_types: tuple[str, ...]


# every step; and the late steps alone, where chains that agree on all that comes before
# meet (a chain naming raw_buffer or EXTERNAL would take nearly every connection there)
EVERY_STEP = Mix((6, 6, 1, 1, 2, 3, 2), ("SAME_IP_OR_LOOPBACK", "EXTERNAL"))
LATE_STEPS = Mix((0, 0, 0, 2, 2, 3, 3), ("SAME_IP_OR_LOOPBACK",))
CASES = 320


@dataclass(frozen=True)
class Case:
    src: str
    sport: int  # 0: any
    dst: str
    dport: int


def generate_chains(rng: random.Random, mix: Mix = EVERY_STEP) -> list[dict]:
    """CHAINS filter_chain_match dicts that no two can match the same connection (Envoy refuses those)."""
    while True:
        chains = [_chain_match(rng, mix) for _ in range(CHAINS)]
        model = tuple(cfg.Chain(f"c{i}", _as_match(m), action="cluster", cluster="sink")
                      for i, m in enumerate(chains))
        try:
            cfg.check_ambiguous(model)
        except cfg.ConfigError:
            continue
        return chains


def _chain_match(rng: random.Random, mix: Mix) -> dict:
    """One to three criteria, so that the connections below can meet them."""
    criteria = {
        "destination_port": lambda: rng.choice(PORTS),
        "prefix_ranges": lambda: [_cidr(p) for p in rng.sample(DST_PREFIXES, rng.choice([1, 1, 2]))],
        "transport_protocol": lambda: "raw_buffer",
        "direct_source_prefix_ranges": lambda: [_cidr(rng.choice(SRC_PREFIXES))],
        "source_type": lambda: rng.choice(mix.source_types),
        "source_prefix_ranges": lambda: [_cidr(rng.choice(SRC_PREFIXES))],
        "source_ports": lambda: [rng.choice(SOURCE_PORTS)],
    }
    chosen: set[str] = set()
    while len(chosen) < rng.choice([1, 2, 2, 3]):
        chosen.add(rng.choices(list(criteria), mix.weights)[0])
    return {key: criteria[key]() for key in criteria if key in chosen}


def _cidr(prefix: str) -> dict:
    net = ipaddress.ip_network(prefix)
    return {"address_prefix": str(net.network_address), "prefix_len": net.prefixlen}


def _nets(ranges: list[dict]) -> tuple[cfg.IPNetwork, ...]:
    return tuple(ipaddress.ip_network(f"{r['address_prefix']}/{r['prefix_len']}") for r in ranges)


def _as_match(m: dict) -> cfg.Match:
    source_type = {"SAME_IP_OR_LOOPBACK": "local", "EXTERNAL": "external"}.get(m.get("source_type", ""), "any")
    return cfg.Match(ports=(m["destination_port"],) if "destination_port" in m else (),
                     destinations=_nets(m.get("prefix_ranges", [])), sources=_nets(m.get("source_prefix_ranges", [])),
                     source_ports=tuple(m.get("source_ports", [])),
                     direct_sources=_nets(m.get("direct_source_prefix_ranges", [])), source_type=source_type,
                     transport_protocol=m.get("transport_protocol", ""))


def generate_cases(rng: random.Random, chains: list[dict]) -> list[Case]:
    """Half of the connections aimed at a chain's criteria (so they reach many chains
    and the places where chains compete), half anywhere."""
    cases, taken = [], set()
    while len(cases) < CASES:
        aim = rng.choice(chains) if rng.random() < 0.5 else {}
        src = _within(rng, aim.get("source_prefix_ranges") or aim.get("direct_source_prefix_ranges"), SOURCES)
        dst = _within(rng, aim.get("prefix_ranges"), [d for d in DESTINATIONS if (":" in d) == (":" in src)])
        if aim.get("source_type") == "SAME_IP_OR_LOOPBACK":
            src = dst = POD
        if (":" in dst) != (":" in src) or (dst == POD and src != POD):
            continue  # one family; a local connection to the pod's own address comes from that address
        sport = aim["source_ports"][0] if "source_ports" in aim else (
            rng.choice(SOURCE_PORTS) if rng.random() < 0.2 else 0)
        case = Case(src, sport, dst, aim.get("destination_port") or rng.choice(PORTS))
        if sport and (src, sport, dst, case.dport) in taken:
            continue  # the same four-tuple twice would meet its own TIME_WAIT
        taken.add((src, sport, dst, case.dport))
        cases.append(case)
    return cases


def _within(rng: random.Random, ranges: list[dict] | None, pool: list[str]) -> str:
    """An address of `pool` inside one of `ranges` if there is one, else any of the pool."""
    if ranges:
        inside = [a for a in pool if any(ipaddress.ip_address(a) in n for n in _nets(ranges))]
        if inside:
            return rng.choice(inside)
    return rng.choice(pool)


def envoy_bootstrap(chains: list[dict], log_path: str) -> dict:
    def tcp(name: str) -> list[dict]:
        return tcp_proxy(name, "sink", log_path, LOG_FORMAT)
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}},
        "static_resources": {
            "listeners": [{
                "name": "virtual",
                "address": {"socket_address": {"address": "::", "port_value": PORT, "ipv4_compat": True}},
                "listener_filters": [{"name": "envoy.filters.listener.original_dst", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}],
                "filter_chains": [{"name": f"c{i}", "filter_chain_match": m, "filters": tcp(f"c{i}")}
                                  for i, m in enumerate(chains)],
                "default_filter_chain": {"name": "default", "filters": tcp("default")},
            }],
            "clusters": [{"name": "sink", "type": "STATIC", "connect_timeout": "2s", "load_assignment": {
                "cluster_name": "sink", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": SINK[0], "port_value": SINK[1]}}}}]}]}}],
        },
    }


def drain(conn: socket.socket) -> None:
    while conn.recv(65536):
        pass


def run_cases(world: PodWorld, cases: list[Case]) -> None:
    """Make every connection: case i sends i + 1 bytes (they name it in the logs)."""
    for i, case in enumerate(cases):
        sock = world.pod.socket(socket.AF_INET6 if ":" in case.dst else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a fixed port still in TIME_WAIT
            sock.settimeout(5)
            # "any port" is a port of its own, the same in every run: a kernel's ephemeral
            # port differs from run to run, and could be 41000 or 41001
            sock.bind((case.src, case.sport or ANY_PORT_FROM + i))
            sock.connect((case.dst, case.dport))
        except OSError as exc:
            sock.close()
            raise AssertionError(f"{case}: {exc}") from None
        with sock:
            sock.sendall(b"x" * (i + 1))
            sock.shutdown(socket.SHUT_WR)
            drain(sock)


def chains_taken(log_path: str, expected: int, timeout: float = 20.0) -> dict[int, str]:
    """case number -> chain name, from the access log of one run."""
    deadline = time.monotonic() + timeout
    while True:
        # whole lines only: a line being written may be read half-way (its chain name cut short)
        text = Path(log_path).read_text() if Path(log_path).exists() else ""
        lines = text[:text.rfind("\n") + 1].splitlines()
        if len(lines) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    taken: dict[int, str] = {}
    for line in lines:
        sent, _, _, chain = line.split()
        key = int(sent) - 1
        taken[key] = f"(two log lines: {taken[key]}, then {line!r})" if key in taken else chain
    return taken


def a_world() -> PodWorld:
    world = PodWorld()
    try:
        for address in SOURCES:
            if address not in (world.POD_V4, world.POD_V6):
                world.pod.ip(*(("-6",) if ":" in address else ()), "addr", "add",
                             f"{address}/{64 if ':' in address else 24}", "dev", "eth0",
                             *(("nodad",) if ":" in address else ()))
        world.pod.exec("sh", str(REDIRECT), "--method", "uid", "--proxy-port", str(PORT))
    except BaseException:
        world.close()
        raise
    return world


def side(kind: str, bootstrap_path: str, log_path: str, cases: list[Case]) -> list[str]:
    """Every case's chain, in order, as one subject (real Envoy, or sidecar-envoy on a loop) chose it."""
    Path(log_path).unlink(missing_ok=True)
    world = a_world()
    server = ThreadedServer(world.remote, SINK, drain)
    try:
        runner = subject(kind, world.pod, bootstrap_path)
        try:
            run_cases(world, cases)
            taken = chains_taken(log_path, len(cases))
        finally:
            runner.stop()
        return [taken.get(i, "(no log line)") for i in range(len(cases))]
    finally:
        server.close()
        world.close()


# Seeds 37 and 124 of LATE_STEPS were picked because there, each late step decides some
# connection: the direct source before the source type, the source type before the source
# prefix, the source prefix before the source port (a proxy that swapped any two of them
# would take another chain for at least 3 of the connections).
@pytest.mark.parametrize("seed, mix, reach", [(1, EVERY_STEP, 6), (2, EVERY_STEP, 6), (3, EVERY_STEP, 6),
                                              (37, LATE_STEPS, 4), (124, LATE_STEPS, 4)])
def test_the_proxy_picks_the_chain_envoy_picks(seed, mix, reach, netns_prerequisites):
    rng = random.Random(seed)
    chains = generate_chains(rng, mix)
    cases = generate_cases(rng, chains)
    directory = tempfile.mkdtemp(prefix="scp-chains-")  # pytest's own are private to root
    try:
        os.chmod(directory, 0o777)  # the access log is written as UID 1337
        log_path = os.path.join(directory, "chains.log")
        bootstrap = write_bootstrap(directory, envoy_bootstrap(chains, log_path))
        verdict = validate(bootstrap)
        assert verdict.returncode == 0, f"Envoy refuses chains we accept (seed {seed}): {verdict.stderr[-800:]}"
        taken = {kind: side(kind, bootstrap, log_path, cases) for kind in SUBJECTS}
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    envoy = taken["envoy"]
    assert "(no log line)" not in envoy, "Envoy logged every connection"
    chains_text = "\n".join(f"  c{i}: {m}" for i, m in enumerate(chains))
    for loop in LOOPS:
        differ = [(case, e, o) for case, e, o in zip(cases, envoy, taken[loop], strict=True) if e != o]
        described = "\n".join(f"  {c}: envoy {e}, sidecar-envoy {o}" for c, e, o in differ[:20])
        assert not differ, (f"seed {seed}, {loop}: {len(differ)} of {len(cases)} connections took another chain\n"
                            f"{described}\nchains:\n{chains_text}")
    reached = set(envoy)
    assert len(reached) >= reach, f"the cases reach only {sorted(reached)}"  # a test of many chains
