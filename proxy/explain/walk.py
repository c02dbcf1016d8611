"""A connection's first packet through the rules, as netfilter walks it.

Theory of operation
-------------------
Only a connection's first packet walks the nat table (conntrack remembers
the result for the rest), so one walk per hook answers "is this connection
captured?":

- outbound (a socket of the pod): the OUTPUT hook; inbound (a packet
  arriving at the pod): PREROUTING. At each, mangle runs before nat (a
  TPROXY in mangle, Istio's TPROXY inbound mode, takes a connection before
  nat sees it). A hook may have several base chains (nft: every base chain
  of that hook, its kind told by type and priority; iptables: the built-in
  chain); they run in order, and the first that maps the connection (a
  REDIRECT, a TPROXY, a DNAT) or drops it ends the walk.
- In a chain, rules are tried top to bottom. A rule matches when all its
  terms hold. A matching rule's target decides: a jump enters another
  chain and comes back after it (or at its RETURN); a goto enters without
  coming back; RETURN leaves the chain; ACCEPT ends this base chain; the end
  of a base chain is its policy. Targets that only act (CT, MARK, LOG) let
  the packet go on.
- Each term is judged against what is known about the packet. A term on
  something this walk does not know (the source address of an inbound
  packet without --from, a match it cannot read) stops the walk with
  "cannot tell", naming the rule: a guess would be worse than no answer.

`Walk.hits` lists every rule that matched, in order, with its counter and
comment; `Walk.verdict` is where the walk ended. `HOOKS` says which tables
a direction walks; targets that only act (MARK, CONNMARK, CT) are hits that
let the packet go on (a mark they set is not carried to later rules: none
of our scripts' rules reads it in the same hook).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace

from .rules import Rule, Ruleset, Table, Term

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_DEPTH = 64  # jumps deep; more is a loop in the rules (the kernel refuses them anyway)

# (table kind, hook) walked for each direction, in the kernel's order: mangle
# before nat, so that a TPROXY in mangle PREROUTING (Istio's TPROXY inbound
# mode) takes the connection before nat would see it.
HOOKS = {"outbound": (("mangle", "output"), ("nat", "output")),
         "inbound": (("mangle", "prerouting"), ("nat", "prerouting"))}


@dataclass(frozen=True)
class Packet:
    """The first packet of a connection, as far as the rules look at it.

    None means "not known": a term about it cannot be judged."""

    family: int
    dst: IPAddress
    dport: int
    src: IPAddress | None = None
    sport: int | None = None
    uid: int | None = None  # the socket's owner (outbound only: a forwarded packet has none)
    gid: int | None = None
    mark: int = 0
    classid: int = 0  # net_cls classid of the socket's cgroup (0: none)
    cgroup_path: str | None = None  # cgroup v2 path of the socket, "/..." relative to the root
    oif: str | None = None
    iif: str | None = None


@dataclass(frozen=True)
class Hit:
    table: str
    rule: Rule


@dataclass(frozen=True)
class Verdict:
    """Where the walk ended.

    kind: redirect (to `port`), tproxy (to `port`), accept (nothing mapped
          it: the connection goes on as it is), drop, other (a target of
          someone else's, `rule` names it), unknown (`reason` says why)
    """

    kind: str
    port: int | None = None
    rule: Rule | None = None
    reason: str = ""

    @property
    def captured(self) -> bool:
        return self.kind in ("redirect", "tproxy")


@dataclass
class Walk:
    hits: list[Hit] = field(default_factory=list)
    verdict: Verdict = field(default_factory=lambda: Verdict("accept"))


class _Unknown(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def walk(ruleset: Ruleset, packet: Packet, direction: str) -> Walk:
    """The path of `packet` through `ruleset` for an outbound or inbound connection."""
    result = Walk()
    for kind, hook in HOOKS[direction]:
        for table, base in ruleset.base_chains(kind, hook, packet.family):
            try:
                verdict = _chain(table, base, packet, result, 0)
            except _Unknown as exc:
                result.verdict = Verdict("unknown", reason=exc.reason)
                return result
            if verdict is None:  # the end of a base chain: its policy
                policy = table.policies.get(base, "ACCEPT")
                verdict = Verdict("drop" if policy == "DROP" else "accept")
            if verdict.kind != "accept":  # accept ends only this base chain
                result.verdict = verdict
                return result
    result.verdict = Verdict("accept")
    return result


def _chain(table: Table, name: str, packet: Packet, result: Walk, depth: int) -> Verdict | None:
    """Walk one chain; None when it ran to its end (or RETURNed) without a verdict."""
    if depth > MAX_DEPTH:
        raise _Unknown(f"chain {name}: jumps nest deeper than {MAX_DEPTH}")
    for rule in table.chains.get(name, []):
        if not matches(rule, packet):
            continue
        result.hits.append(Hit(table.name, rule))
        target = rule.target
        if target == "RETURN":
            return None
        if target in ("JUMP", "GOTO"):
            assert rule.jump is not None
            verdict = _chain(table, rule.jump, packet, result, depth + 1)
            if verdict is not None or target == "GOTO":  # a goto does not come back here
                return verdict
            continue
        if target == "ACCEPT":
            return Verdict("accept", rule=rule)
        if target in ("DROP", "REJECT"):
            return Verdict("drop", rule=rule)
        if target in ("REDIRECT", "TPROXY"):
            return Verdict(target.lower(), port=rule.to_port if rule.to_port is not None else packet.dport, rule=rule)
        if rule.terminal:
            return Verdict("other", rule=rule)
        # CT, LOG, ...: it acts, the packet goes on
    return None


def matches(rule: Rule, packet: Packet) -> bool:
    """Do all of the rule's terms hold? Raises _Unknown if one cannot be judged."""
    return all(_holds(term, rule, packet) for term in rule.terms)


def _holds(term: Term, rule: Rule, packet: Packet) -> bool:
    return _judge(term, rule, packet) != term.negated


def _judge(term: Term, rule: Rule, packet: Packet) -> bool:
    kind, value = term.kind, term.value
    if kind == "family":
        return value is None or value == packet.family
    if kind == "proto":
        return str(value) in ("tcp", "6", "all")
    if kind in ("src", "dst"):
        address = packet.src if kind == "src" else packet.dst
        if address is None:
            raise _Unknown(_needs(rule, term, "the source address (--from)"))
        return address.version == value.version and address in value
    if kind in ("dport", "sport"):
        port = packet.dport if kind == "dport" else packet.sport
        if port is None:
            raise _Unknown(_needs(rule, term, "the source port"))
        return port in value
    if kind in ("oif", "iif"):
        name = packet.oif if kind == "oif" else packet.iif
        if name is None:
            raise _Unknown(_needs(rule, term, "the interface"))
        return _iface(str(value), name)
    if kind in ("uid", "gid"):
        owner = packet.uid if kind == "uid" else packet.gid
        if owner is None:
            return False  # no socket owner (a forwarded packet): the owner match fails, negated or not
        return bool(owner == value)
    if kind == "mark":
        mark, mask = value
        return bool(packet.mark & mask == mark)
    if kind == "connmark":
        mark, mask = value
        return bool(0 & mask == mark)  # a connection's first packet: conntrack has set no mark yet
    if kind == "classid":
        return bool(packet.classid == value)
    if kind == "cgroup_path":
        if packet.cgroup_path is None:
            raise _Unknown(_needs(rule, term, "the socket's cgroup v2 path (--cgroup)"))
        return _below(packet.cgroup_path, str(value))
    if kind == "set":
        return packet.dst is not None and any(
            packet.dst.version == net.version and packet.dst in net and packet.dport == port for net, port in value)
    if kind == "ctstate":
        return "NEW" in value  # the first packet of a connection
    raise _Unknown(f"{_where(rule)} matches on {term.text!r}, which explain does not understand")


def _iface(pattern: str, name: str) -> bool:
    """iptables' -o/-i and nft's oifname: a trailing + (iptables) or * (nft) is a prefix."""
    if pattern.endswith(("+", "*")):
        return name.startswith(pattern[:-1])
    return pattern == name


def _below(path: str, ancestor: str) -> bool:
    """-m cgroup --path P: the socket's cgroup is P or below it."""
    path, ancestor = "/" + path.strip("/"), "/" + ancestor.strip("/")
    return ancestor == "/" or path == ancestor or path.startswith(ancestor + "/")


def _needs(rule: Rule, term: Term, what: str) -> str:
    return f"{_where(rule)} matches on {term.text!r}: cannot tell without {what}"


def _where(rule: Rule) -> str:
    return f"rule {rule.index} of {rule.chain}" + (f' ("{rule.comment}")' if rule.comment else "")


def as_proxy(packet: Packet, uid: int | None, gid: int | None, mark: int, classid: int,
             cgroup_path: str | None) -> Packet:
    """The same packet sent by the proxy's own socket."""
    return replace(packet, uid=uid, gid=gid, mark=mark, classid=classid, cgroup_path=cgroup_path)
