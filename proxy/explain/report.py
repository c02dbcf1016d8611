"""One explanation: the rules' walk, the proxy's decision, the loop check, warnings.

Pure: what the machine told (the rules, the routes, the proxy's identity
and configuration) comes in as `Facts`, gathered by gather.py; what could
not be read is in `Facts.unreadable`, one line each, and the explanation
goes as far as the rest allows.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..config import PROXY_UID, Config, hostport
from .decision import Decision, decide
from .rules import Rule, Ruleset
from .walk import IPAddress, Packet, Walk, as_proxy, walk

# the route the kernel would take to an address: (source address, output interface)
Route = Callable[[IPAddress], tuple[IPAddress | None, str | None]]


@dataclass(frozen=True)
class Request:
    """What to explain (the command line)."""

    dst: IPAddress
    dport: int
    src: IPAddress | None = None
    sport: int | None = None
    inbound: bool = False
    uid: int | None = None
    gid: int | None = None
    mark: int = 0
    classid: int = 0
    cgroup_path: str | None = None
    iif: str | None = None  # inbound: the interface it arrives on


@dataclass(frozen=True)
class ProxyIdentity:
    """Who the proxy's sockets belong to, as far as could be found out."""

    port: int
    uid: int | None = None  # the owner of the socket listening on the proxy port
    pid: int | None = None
    classid: int = 0
    cgroup_path: str | None = None
    found: str = ""  # how it was found, or why not


@dataclass
class Facts:
    ruleset: Ruleset | None
    config: Config | None
    config_source: str  # "file F", "admin URL", "built-in defaults"
    local: frozenset[str]
    route: Route
    proxy: ProxyIdentity
    connections: Mapping[str, int] | None = None
    workers: int = 1
    unreadable: list[str] = field(default_factory=list)


@dataclass
class Loop:
    verdict: str  # "none", "loop", "unknown"
    text: str
    walk: Walk | None = None


@dataclass
class Explanation:
    request: Request
    packet: Packet
    direction: str
    backend: str | None
    walk: Walk | None
    captured: bool | None  # None: the rules could not be read or judged
    decision: Decision | None
    loop: Loop | None
    warnings: list[str]
    unreadable: list[str]
    config_source: str
    proxy: ProxyIdentity


def explain(request: Request, facts: Facts) -> Explanation:
    direction = "inbound" if request.inbound else "outbound"
    packet = _packet(request, facts.route)
    walked = walk(facts.ruleset, packet, direction) if facts.ruleset is not None else None
    captured = None
    if walked is not None and walked.verdict.kind != "unknown":
        captured = walked.verdict.captured and walked.verdict.port == facts.proxy.port
    decision = loop = None
    if facts.config is not None and captured is not False:
        decision = decide(facts.config, str(packet.dst), packet.dport,
                          str(packet.src) if packet.src is not None else None, packet.sport,
                          facts.local | {str(packet.dst)} if request.inbound else facts.local,
                          facts.connections, facts.workers)
        loop = _loop(decision, facts)
    warnings = _warnings(facts)
    return Explanation(request, packet, direction, facts.ruleset.backend if facts.ruleset else None, walked,
                       captured, decision, loop, warnings, facts.unreadable, facts.config_source, facts.proxy)


def _packet(request: Request, route: Route) -> Packet:
    family = request.dst.version
    src, oif, iif = request.src, None, request.iif
    if not request.inbound:
        routed_src, oif = route(request.dst)
        src = src or routed_src
    elif iif is None and src is not None:
        iif = route(src)[1]  # it arrives where the route back to the client leaves
    return Packet(family, request.dst, request.dport, src, request.sport,
                  uid=None if request.inbound else request.uid, gid=None if request.inbound else request.gid,
                  mark=request.mark, classid=0 if request.inbound else request.classid,
                  cgroup_path=None if request.inbound else request.cgroup_path,
                  oif=oif, iif=iif)


def proxy_packet(facts: Facts, host: str, port: int, mark: int | None, source: str | None) -> Packet:
    """The first packet of the proxy's own upstream connection to host:port."""
    dst = ipaddress.ip_address(host)
    routed_src, oif = facts.route(dst)
    src = ipaddress.ip_address(source) if source else routed_src
    proxy = facts.proxy
    uid = proxy.uid if proxy.uid is not None else PROXY_UID
    base = Packet(dst.version, dst, port, src, None, oif=oif)
    return as_proxy(base, uid, None, mark or 0, proxy.classid, proxy.cgroup_path)


def _loop(decision: Decision, facts: Facts) -> Loop:
    """The loop guard's view: does the proxy's upstream connection come back to it?"""
    if decision.refused:
        return Loop("loop", f"refused by the loop guard: {decision.refused}")
    if decision.unknown:
        return Loop("unknown", "cannot tell without the chain")
    if decision.upstream is None:
        return Loop("none", "no upstream connection: nothing can loop")
    if facts.ruleset is None:
        return Loop("unknown", "the rules could not be read: cannot tell whether the upstream connection "
                               "would be captured again")
    host, port = decision.upstream
    own = proxy_packet(facts, host, port, decision.mark, decision.source_address)
    walked = walk(facts.ruleset, own, "outbound")
    who = _who(facts.proxy, decision.mark)
    if walked.verdict.kind == "unknown":
        return Loop("unknown", f"cannot tell: {walked.verdict.reason}", walked)
    if walked.verdict.captured and walked.verdict.port == facts.proxy.port:
        return Loop("loop", f"LOOP: the proxy's own connection to {hostport(host, port)} ({who}) is captured "
                            "again; the loop guard recognises its own socket and refuses it (loop_guard), and "
                            "the app's connection is reset", walked)
    last = walked.hits[-1].rule if walked.hits else None
    how = f' by rule "{last.comment or last.text}"' if last is not None else ""
    return Loop("none", f"no loop: the proxy's connection to {hostport(host, port)} ({who}) goes out{how}", walked)


def _who(proxy: ProxyIdentity, mark: int | None) -> str:
    parts = [f"uid {proxy.uid}" if proxy.uid is not None else f"uid {PROXY_UID}, assumed: {proxy.found}"]
    if mark:
        parts.append(f"mark {mark:#x}")
    if proxy.classid:
        parts.append(f"classid {proxy.classid:#x}")
    if proxy.cgroup_path and proxy.cgroup_path != "/":
        parts.append(f"cgroup {proxy.cgroup_path}")
    return ", ".join(parts)


# ------------------------------------------------------------------ warnings --

def _warnings(facts: Facts) -> list[str]:
    if facts.ruleset is None:
        return []
    if not any(name.startswith("SIDECAR_") for t in facts.ruleset.tables for name in t.chains):
        return ["no sidecar-proxy rules here: is this the pod's network namespace? (redirect.sh installs them)"]
    return [*_uid_bypass_mismatch(facts), *_listed_passthrough(facts)]


def _bypass_rules(ruleset: Ruleset) -> list[Rule]:
    """RETURN rules on the proxy's identity (owner, mark, cgroup) in the nat chains."""
    kinds = ("uid", "gid", "mark", "classid", "cgroup_path")
    return [r for t, r in ruleset.rules() if t.name in ("nat", "sidecar_proxy") and r.target == "RETURN"
            and any(term.kind in kinds and not term.negated for term in r.terms)]


def _uid_bypass_mismatch(facts: Facts) -> list[str]:
    """A bypass by UID while the proxy's socket belongs to another UID."""
    bypass = _bypass_rules(facts.ruleset) if facts.ruleset else []
    uid_rules = [r for r in bypass if any(t.kind == "uid" for t in r.terms)]
    if not uid_rules or len(uid_rules) != len(bypass) or facts.proxy.uid is None:
        return []
    uids = sorted({t.value for r in uid_rules for t in r.terms if t.kind == "uid"})
    if facts.proxy.uid in uids:
        return []
    return [f"loop: the rules let UID {', '.join(map(str, uids))} out (rule {uid_rules[0].index} of "
            f"{uid_rules[0].chain}), but the proxy on port {facts.proxy.port} runs as UID {facts.proxy.uid}: "
            "its upstream connections are captured again (run it as that UID, or redirect.sh --proxy-uid "
            f"{facts.proxy.uid})"]


def _listed_passthrough(facts: Facts) -> list[str]:
    """The explicit method's trap: a listed destination the proxy forwards to as it is."""
    if facts.config is None or facts.ruleset is None:
        return []
    out = []
    for host, port, rule in _listed_destinations(facts.ruleset):
        src, _ = facts.route(ipaddress.ip_address(host))  # the app's connection, as the kernel would send it
        decision = decide(facts.config, host, port, str(src) if src else None, None, facts.local)
        if decision.unknown or decision.upstream != (host, port):
            continue
        own = walk(facts.ruleset, proxy_packet(facts, host, port, decision.mark, decision.source_address),
                   "outbound")
        if own.verdict.captured and own.verdict.port == facts.proxy.port:
            out.append(f"loop: {hostport(host, port)} is captured (rule {rule.index} of {rule.chain}: "
                       f'"{rule.comment}") and the proxy forwards it to that same address (chain '
                       f"{decision.chain}), which the rules capture again; list the service address and "
                       "give its chain a cluster of endpoints")
    return out


def _listed_destinations(ruleset: Ruleset) -> list[tuple[str, int, Rule]]:
    """Single addresses with one port that a nat rule captures (the explicit method's services)."""
    found = []
    for table, rule in ruleset.rules():
        if table.name not in ("nat", "sidecar_proxy") or rule.target != "JUMP":
            continue
        terms = {t.kind: t for t in rule.terms if not t.negated}
        if "set" in terms:
            found += [(str(net.network_address), port, rule) for net, port in terms["set"].value
                      if net.num_addresses == 1]
        elif "dst" in terms and "dport" in terms and terms["dst"].value.num_addresses == 1 \
                and len(terms["dport"].value) == 1:
            found.append((str(terms["dst"].value.network_address), next(iter(terms["dport"].value)), rule))
    return found
