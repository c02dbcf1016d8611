"""Installed rules as data: `iptables-save` text or `nft -j list ruleset` JSON -> one model.

Both backends become the same few things, so the walker (walk.py) knows one
semantics:

- a `Rule` is its match terms (all must hold), a target, its packet counter
  and its comment;
- a `Table` maps chain names to their rules, and names, per netfilter hook,
  the base chains that see a packet there, in the order they run (iptables:
  the built-in chain of that name; nft: every base chain of that hook and
  type, by priority);
- a `Ruleset` is the tables of one backend, for one address family or (nft's
  `inet`) both.

Only the matches and targets this project's scripts write are understood
(iptables/rules.sh's vocabulary, as iptables-save and nft print it). Any
other becomes a term of kind "unknown" or a target "other": the walker then
says it cannot tell, instead of guessing. Pure: nothing here runs a command.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Targets that end the walk of a hook (a verdict, or a NAT mapping) and those
# that do something and let the packet go on to the next rule.
TERMINAL = ("ACCEPT", "DROP", "REJECT", "REDIRECT", "DNAT", "SNAT", "MASQUERADE", "TPROXY")
CONTINUING = ("CT", "MARK", "CONNMARK", "LOG", "TRACE", "NOTRACK", "COUNTER")


@dataclass(frozen=True)
class Term:
    """One match criterion of a rule.

    kind:  src, dst (value: a network), proto (a name), dport, sport (a set
           of ports), oif, iif (an interface name), uid, gid (a number),
           mark, connmark (value, mask), classid (a number), cgroup_path (a path),
           family (4 or 6: nft's `ip ...` only holds for IPv4), set (value:
           tuple of (network, port) elements, for `ip daddr . tcp dport @S`),
           ctstate (names), unknown (value: the text)
    """

    kind: str
    value: Any
    negated: bool = False
    text: str = ""


@dataclass(frozen=True)
class Rule:
    chain: str
    index: int  # 1-based position in its chain (iptables -L --line-numbers)
    terms: tuple[Term, ...]
    target: str  # RETURN, ACCEPT, DROP, REDIRECT, JUMP, GOTO, CT, TPROXY, ..., or OTHER
    jump: str | None = None  # JUMP/GOTO: the chain
    to_port: int | None = None  # REDIRECT / TPROXY: the port
    packets: int | None = None  # None: the text carried no counter
    comment: str = ""
    text: str = ""  # the rule as the backend prints it

    @property
    def terminal(self) -> bool:
        return self.target in TERMINAL or self.target == "OTHER"


@dataclass
class Table:
    name: str
    family: str  # ipv4, ipv6, inet
    chains: dict[str, list[Rule]] = field(default_factory=dict)
    policies: dict[str, str] = field(default_factory=dict)  # base chain -> ACCEPT / DROP
    hooks: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (kind, hook) -> base chains


@dataclass
class Ruleset:
    backend: str  # "iptables" or "nft-native"
    tables: list[Table] = field(default_factory=list)

    def base_chains(self, kind: str, hook: str, family: int) -> list[tuple[Table, str]]:
        """The chains a packet of `family` enters at `hook` for `kind` (nat,
        mangle, raw, filter), in the order the kernel runs them."""
        name = f"ipv{family}"
        return [(t, c) for t in self.tables if t.family in (name, "inet")
                for c in t.hooks.get((kind, hook), [])]

    def rules(self) -> Iterable[tuple[Table, Rule]]:
        for table in self.tables:
            for rules in table.chains.values():
                for rule in rules:
                    yield table, rule


class RulesError(Exception):
    """Text that is not what the backend prints (one line, naming the line)."""


# ------------------------------------------------------------------ iptables --

BUILTIN_HOOKS = {"PREROUTING": "prerouting", "INPUT": "input", "FORWARD": "forward", "OUTPUT": "output",
                 "POSTROUTING": "postrouting"}


def parse_save(text: str, family: int) -> Ruleset:
    """`iptables-save [-c]` (or `ip6tables-save`) output, or iptables-restore
    input as `redirect.sh --dry-run` prints it (no counters then)."""
    ruleset = Ruleset("iptables")
    table: Table | None = None
    counts: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = Table(line[1:], f"ipv{family}")
            ruleset.tables.append(table)
            counts = {}
            continue
        if table is None:
            raise RulesError(f"line {number}: a rule outside a table: {line[:60]}")
        if line.startswith(":"):
            name, policy = (line[1:].split() + ["-"])[:2]
            table.chains.setdefault(name, [])
            if name in BUILTIN_HOOKS:
                _builtin(table, name, policy)
            continue
        packets = None
        if line.startswith("["):
            counter, _, line = line.partition("] ")
            packets = int(counter[1:].split(":")[0])
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise RulesError(f"line {number}: {exc}: {line[:60]}") from None
        if words[:1] != ["-A"] or len(words) < 2:
            raise RulesError(f"line {number}: not a rule: {line[:60]}")
        chain = words[1]
        if chain in BUILTIN_HOOKS and chain not in table.chains:  # restore input does not declare them
            _builtin(table, chain, "ACCEPT")
        counts[chain] = counts.get(chain, 0) + 1
        rule = _iptables_rule(chain, counts[chain], words[2:], packets, line)
        table.chains.setdefault(chain, []).append(rule)
    for table in ruleset.tables:  # a jump to no chain of the table: a target we do not know
        for rules in table.chains.values():
            rules[:] = [r if r.target != "JUMP" or r.jump in table.chains else replace(r, target="OTHER")
                        for r in rules]
    return ruleset


def _builtin(table: Table, chain: str, policy: str) -> None:
    table.chains.setdefault(chain, [])
    table.policies[chain] = policy
    table.hooks[(table.name, BUILTIN_HOOKS[chain])] = [chain]


def _iptables_rule(chain: str, index: int, words: list[str], packets: int | None, text: str) -> Rule:
    terms: list[Term] = []
    target, jump, to_port, comment = "OTHER", None, None, ""
    negate = after_target = False
    module = ""
    i = 0

    def arg() -> str:
        nonlocal i
        i += 1
        return words[i] if i < len(words) else ""

    while i < len(words):
        word = words[i]
        if word == "!":
            negate = True
            i += 1
            continue
        shown = ("! " if negate else "") + word
        if word in ("-s", "--source", "-d", "--destination"):
            value = arg()
            terms.append(Term("src" if word in ("-s", "--source") else "dst", ipaddress.ip_network(value, strict=False),
                              negate, f"{shown} {value}"))
        elif word in ("-p", "--protocol"):
            value = arg()
            terms.append(Term("proto", value, negate, f"{shown} {value}"))
        elif word in ("-o", "--out-interface", "-i", "--in-interface"):
            value = arg()
            terms.append(Term("oif" if word.startswith(("-o", "--out")) else "iif", value, negate, f"{shown} {value}"))
        elif word == "-m":
            module = arg()  # the match's name: its options follow
        elif word in ("--dport", "--destination-port", "--sport", "--source-port", "--dports", "--sports"):
            value = arg()
            kind = "dport" if "d" in word[2:4] else "sport"
            terms.append(Term(kind, _ports(value), negate, f"{shown} {value}"))
        elif word in ("--uid-owner", "--gid-owner"):
            value = arg()
            terms.append(Term("uid" if word == "--uid-owner" else "gid", int(value), negate, f"{shown} {value}"))
        elif word == "--mark":
            value = arg()
            mark, _, mask = value.partition("/")
            terms.append(Term("connmark" if module == "connmark" else "mark",
                              (int(mark, 0), int(mask, 0) if mask else 0xFFFFFFFF), negate, f"{shown} {value}"))
        elif word == "--cgroup":
            value = arg()
            terms.append(Term("classid", int(value, 0), negate, f"{shown} {value}"))
        elif word == "--path":
            value = arg()
            terms.append(Term("cgroup_path", value, negate, f"{shown} {value}"))
        elif word == "--ctstate":
            value = arg()
            terms.append(Term("ctstate", tuple(value.split(",")), negate, f"{shown} {value}"))
        elif word == "--comment":
            comment = arg()
        elif word in ("-j", "--jump", "-g", "--goto"):
            name = arg()
            after_target = True
            if word in ("-g", "--goto"):
                target, jump = "GOTO", name
            elif name in TERMINAL or name in CONTINUING or name == "RETURN":
                target = name
            else:  # a chain of the table, or a target we do not know (parse_save tells them apart)
                target, jump = "JUMP", name
        elif after_target:  # iptables-save prints the matches first, then -j and the target's options
            if word in ("--to-ports", "--to-port", "--on-port"):
                to_port = int(arg().split("-")[0])
            elif i + 1 < len(words) and not words[i + 1].startswith("-"):
                arg()  # an option we do not need (--zone-orig 1, --to-destination ...)
        else:
            terms.append(Term("unknown", shown, negate, shown))
        negate = False
        i += 1
    return Rule(chain, index, tuple(terms), target, jump, to_port, packets, comment, text)


def _ports(text: str) -> frozenset[int]:
    ports: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition(":")
        ports.update(range(int(low), int(high or low) + 1))
    return frozenset(ports)


# ----------------------------------------------------------------------- nft --

def parse_nft_json(data: Mapping[str, Any]) -> Ruleset:
    """`nft -j list ruleset`: the tables of the families that see IP packets."""
    ruleset = Ruleset("nft-native")
    tables: dict[tuple[str, str], Table] = {}
    sets: dict[tuple[str, str, str], tuple[Any, ...]] = {}
    chains: list[dict[str, Any]] = []
    rules: list[dict[str, Any]] = []
    items = data.get("nftables")
    if not isinstance(items, list):
        raise RulesError("not nft's JSON: no 'nftables' list")
    for item in items:
        if not isinstance(item, dict):
            continue
        if "table" in item and item["table"].get("family") in ("ip", "ip6", "inet"):
            t = item["table"]
            family = {"ip": "ipv4", "ip6": "ipv6", "inet": "inet"}[t["family"]]
            table = Table(t["name"], family)
            tables[(t["family"], t["name"])] = table
            ruleset.tables.append(table)
        elif "set" in item:
            s = item["set"]
            sets[(s["family"], s["table"], s["name"])] = tuple(s.get("elem", ()))
        elif "chain" in item:
            chains.append(item["chain"])
        elif "rule" in item:
            rules.append(item["rule"])
    for c in sorted(chains, key=lambda c: (c.get("prio", 0), c.get("handle", 0))):
        holder = tables.get((c.get("family", ""), c.get("table", "")))
        if holder is None:
            continue
        holder.chains.setdefault(c["name"], [])
        if "hook" in c:
            holder.hooks.setdefault((_kind(c), c["hook"]), []).append(c["name"])
            holder.policies[c["name"]] = c.get("policy", "accept").upper()
    for r in rules:
        holder = tables.get((r.get("family", ""), r.get("table", "")))
        if holder is None:
            continue
        chain = holder.chains.setdefault(r["chain"], [])
        chain.append(_nft_rule(r, len(chain) + 1, lambda name, r=r: sets.get((r["family"], r["table"], name), ())))
    return ruleset


def _kind(chain: Mapping[str, Any]) -> str:
    """The iptables table a base chain stands for: nat by its type, a filter
    chain by its priority (raw -300, mangle -150, filter 0)."""
    if chain.get("type") == "nat":
        return "nat"
    prio = int(chain.get("prio", 0))
    return "raw" if prio <= -200 else "mangle" if prio < 0 else "filter"


NFT_META = {"skuid": "uid", "skgid": "gid", "oifname": "oif", "iifname": "iif", "mark": "mark",
            "cgroup": "classid", "l4proto": "proto"}


def _nft_rule(r: Mapping[str, Any], index: int, set_elements: Any) -> Rule:
    terms: list[Term] = []
    target, jump, to_port, packets = "OTHER", None, None, None
    for expr in r.get("expr", ()):
        (key, body), = expr.items()
        if key == "match":
            terms.extend(_nft_match(body, set_elements))
        elif key == "counter":
            packets = int(body.get("packets", 0)) if isinstance(body, dict) else None
        elif key in ("return", "accept", "drop"):
            if target not in ("TPROXY", "REDIRECT"):  # `tproxy to :5001 accept`: the tproxy decides
                target = key.upper()
        elif key in ("jump", "goto"):
            target, jump = key.upper() if key == "goto" else "JUMP", body["target"]
        elif key == "redirect":
            target, to_port = "REDIRECT", int(body["port"]) if body and "port" in body else None
        elif key == "tproxy":
            target, to_port = "TPROXY", int(body["port"]) if "port" in body else None
        elif key in ("mangle", "log", "notrack"):
            if target == "OTHER":  # it acts; a verdict after it in the same rule decides
                target = "CT" if key == "mangle" and "ct" in body.get("key", {}) else \
                    "MARK" if key == "mangle" else key.upper()
        elif key in ("dnat", "snat", "masquerade", "reject"):
            target = key.upper()
        else:
            terms.append(Term("unknown", key, False, key))
    return Rule(r["chain"], index, tuple(terms), target, jump, to_port, packets, r.get("comment", ""),
                _nft_text(r))


def _nft_match(body: Mapping[str, Any], set_elements: Any) -> list[Term]:
    op, left, right = body.get("op", "=="), body.get("left", {}), body.get("right", "")
    negated = op == "!="
    text = f"{_nft_operand(left)} {'!= ' if negated else ''}{_nft_operand(right)}"
    if op not in ("==", "!=", "in"):
        return [Term("unknown", text, False, text)]
    if "payload" in left:
        proto, fld = left["payload"].get("protocol"), left["payload"].get("field")
        family = {"ip": 4, "ip6": 6}.get(proto)
        terms = [Term("family", family, False, proto)] if family else []
        if fld in ("saddr", "daddr") and family:
            terms.append(Term("src" if fld == "saddr" else "dst", _nft_network(right), negated, text))
        elif fld in ("dport", "sport") and proto in ("tcp", "th"):
            terms.append(Term("proto", "tcp", False, "tcp"))
            terms.append(Term(fld, _nft_ports(right), negated, text))
        else:
            terms.append(Term("unknown", text, False, text))
        return terms
    if "meta" in left:
        kind = NFT_META.get(left["meta"].get("key", ""))
        if kind is None:
            return [Term("unknown", text, False, text)]
        if kind == "mark":
            value: Any = (int(right), 0xFFFFFFFF)
        elif kind in ("uid", "gid", "classid"):
            value = int(right)
        else:
            value = str(right)
        return [Term(kind, value, negated, text)]
    if "ct" in left and left["ct"].get("key") == "mark" and not isinstance(right, dict):
        return [Term("connmark", (int(right), 0xFFFFFFFF), negated, text)]
    if "socket" in left and left["socket"].get("key") == "cgroupv2":
        return [Term("cgroup_path", str(right), negated, text)]
    if "concat" in left and isinstance(right, str) and right.startswith("@"):
        parts = left["concat"]
        protos = [p.get("payload", {}).get("protocol") for p in parts]
        family = {"ip": 4, "ip6": 6}.get(protos[0]) if protos else None
        elements = tuple((_nft_network(e["concat"][0]), int(e["concat"][1])) for e in set_elements(right[1:])
                         if isinstance(e, dict) and "concat" in e)
        return [Term("family", family, False, protos[0] or ""), Term("proto", "tcp", False, "tcp"),
                Term("set", elements, negated, text)]
    return [Term("unknown", text, False, text)]


def _nft_network(value: Any) -> IPNetwork:
    if isinstance(value, dict) and "prefix" in value:
        return ipaddress.ip_network(f"{value['prefix']['addr']}/{value['prefix']['len']}", strict=False)
    return ipaddress.ip_network(str(value), strict=False)


def _nft_ports(value: Any) -> frozenset[int]:
    if isinstance(value, dict) and "set" in value:
        ports: set[int] = set()
        for item in value["set"]:
            if isinstance(item, dict) and "range" in item:
                low, high = item["range"]
                ports.update(range(int(low), int(high) + 1))
            else:
                ports.add(int(item))
        return frozenset(ports)
    if isinstance(value, dict) and "range" in value:
        low, high = value["range"]
        return frozenset(range(int(low), int(high) + 1))
    return frozenset({int(value)})


def _nft_operand(value: Any) -> str:
    if isinstance(value, dict):
        if "payload" in value:
            return f"{value['payload'].get('protocol')} {value['payload'].get('field')}"
        if "meta" in value:
            return f"meta {value['meta'].get('key')}"
        if "prefix" in value:
            return f"{value['prefix']['addr']}/{value['prefix']['len']}"
        if "set" in value:
            return "{ " + ", ".join(_nft_operand(v) for v in value["set"]) + " }"
        if "range" in value:
            return "-".join(str(v) for v in value["range"])
        if "concat" in value:
            return " . ".join(_nft_operand(v) for v in value["concat"])
        if "socket" in value:
            return f"socket {value['socket'].get('key')} level {value['socket'].get('level')}"
    return str(value)


def _nft_text(r: Mapping[str, Any]) -> str:
    """A rule in nft's own words, near enough to recognise it (`nft list` prints it exactly)."""
    out = []
    for expr in r.get("expr", ()):
        (key, body), = expr.items()
        if key == "match":
            op = "" if body.get("op") in ("==", "in") else f"{body.get('op')} "
            out.append(f"{_nft_operand(body.get('left'))} {op}{_nft_operand(body.get('right'))}")
        elif key == "counter":
            continue
        elif key in ("jump", "goto"):
            out.append(f"{key} {body['target']}")
        elif key == "redirect":
            out.append(f"redirect to :{body.get('port')}" if body else "redirect")
        elif key == "mangle":
            out.append(f"{_nft_operand(body.get('key'))} set {body.get('value')}")
        else:
            out.append(key)
    return " ".join(out)
