"""An explanation as text for people, or as JSON for tools (`--json`)."""

from __future__ import annotations

from typing import Any

from ..config import hostport
from .decision import Decision
from .report import Explanation
from .rules import Rule
from .walk import Verdict, Walk


def summary(e: Explanation) -> dict[str, Any]:
    """The verdict in a few fields: what the tests compare with real traffic."""
    d = e.decision
    if e.captured is None:
        outcome = "unknown"
    elif not e.captured:
        outcome = {"drop": "dropped", "other": "taken by another rule"}.get(
            e.walk.verdict.kind if e.walk else "", "not captured")
    elif d is not None and d.refused:
        outcome = "refused"
    else:
        outcome = "captured"
    return {
        "outcome": outcome,
        "captured": e.captured,
        "direction": d.direction if d is not None and not d.refused else None,
        "chain": d.chain if d is not None else None,
        "action": d.action if d is not None else None,
        "cluster": d.cluster if d is not None else None,
        "upstream": hostport(*d.upstream) if d is not None and d.upstream else None,
        "loop": e.loop.verdict if e.loop is not None else None,
    }


def to_json(e: Explanation) -> dict[str, Any]:
    p = e.packet
    return {
        "connection": {
            "direction": e.direction, "family": f"ipv{p.family}", "to": hostport(str(p.dst), p.dport),
            "from": str(p.src) if p.src is not None else None, "uid": p.uid, "mark": p.mark,
            "classid": p.classid, "cgroup_path": p.cgroup_path, "out": p.oif, "in": p.iif,
        },
        "rules": None if e.walk is None else {
            "backend": e.backend,
            "hits": [_hit_json(h.table, h.rule) for h in e.walk.hits],
            "verdict": _verdict_json(e.walk.verdict),
        },
        "proxy": None if e.decision is None else {
            "config": e.config_source, **_decision_json(e.decision),
            "loop_guard": None if e.loop is None else {
                "verdict": e.loop.verdict, "text": e.loop.text,
                "hits": [_hit_json(h.table, h.rule) for h in e.loop.walk.hits] if e.loop.walk else []},
        },
        "proxy_process": {"port": e.proxy.port, "uid": e.proxy.uid, "pid": e.proxy.pid,
                          "classid": e.proxy.classid, "cgroup_path": e.proxy.cgroup_path, "found": e.proxy.found},
        "verdict": summary(e),
        "warnings": e.warnings,
        "unreadable": e.unreadable,
    }


def _hit_json(table: str, rule: Rule) -> dict[str, Any]:
    return {"table": table, "chain": rule.chain, "index": rule.index, "packets": rule.packets,
            "comment": rule.comment, "target": _target(rule), "rule": rule.text}


def _verdict_json(v: Verdict) -> dict[str, Any]:
    return {"kind": v.kind, "port": v.port, "reason": v.reason or None}


def _decision_json(d: Decision) -> dict[str, Any]:
    return {
        "listener": d.listener, "direction": d.direction, "refused": d.refused, "chain": d.chain,
        "chain_from": d.chain_from, "unknown": d.unknown,
        "steps": [{"step": s.name, "best": s.best, "kept": list(s.kept), "out_of": s.out_of} for s in d.steps],
        "action": d.action, "cluster": d.cluster, "weighted": [list(w) for w in d.weighted],
        "upstream": hostport(*d.upstream) if d.upstream else None, "endpoint": d.endpoint_why,
        "mark": d.mark, "source_address": d.source_address,
    }


def _target(rule: Rule) -> str:
    if rule.target in ("JUMP", "GOTO"):
        return str(rule.jump)
    if rule.target in ("REDIRECT", "TPROXY") and rule.to_port is not None:
        return f"{rule.target} {rule.to_port}"
    return rule.target


# ---------------------------------------------------------------------- text --

def to_text(e: Explanation) -> str:
    p = e.packet
    who = [f"uid {p.uid}" if p.uid is not None else ""]
    if p.mark:
        who.append(f"mark {p.mark:#x}")
    if p.classid:
        who.append(f"classid {p.classid:#x}")
    if p.cgroup_path and p.cgroup_path != "/":
        who.append(f"cgroup {p.cgroup_path}")
    via = (f"in on {p.iif}" if p.iif else "") if e.direction == "inbound" else f"out {p.oif or '?'}"
    src = str(p.src) if p.src is not None else "?"
    about = ", ".join(w for w in [*who, via] if w)
    lines = [f"{e.direction} {src} -> {hostport(str(p.dst), p.dport)}" + (f" ({about})" if about else "")]
    lines.append("")
    hook = "OUTPUT" if e.direction == "outbound" else "PREROUTING"
    if e.walk is None:
        lines.append(f"rules ({hook}): not read")
    else:
        lines.append(f"rules ({hook}: mangle, nat; {e.backend}, IPv{p.family}), each rule hit with its packet counter:")
        lines += _hits(e.walk)
        lines.append(f"  => {_verdict_text(e.walk.verdict, e.proxy.port)}")
    if e.decision is not None:
        lines.append("")
        lines.append(f"proxy ({e.config_source}):")
        lines += [f"  {line}" for line in _decision_text(e.decision)]
        if e.loop is not None:
            lines.append(f"  loop guard: {e.loop.text}")
    elif e.captured is False:
        lines.append("")
        lines.append("proxy: never sees this connection")
    s = summary(e)
    lines.append("")
    parts = [s["outcome"]] + [f"{k} {s[k]}" for k in ("direction", "chain", "cluster", "upstream") if s[k]]
    lines.append("verdict: " + ", ".join(parts))
    lines += [f"warning: {w}" for w in e.warnings]
    lines += [f"could not read: {u}" for u in e.unreadable]
    return "\n".join(lines) + "\n"


def _hits(w: Walk) -> list[str]:
    if not w.hits:
        return ["  (no rule matched)"]
    width = max(len(h.rule.chain) for h in w.hits)
    out = []
    for h in w.hits:
        count = "-" if h.rule.packets is None else str(h.rule.packets)
        what = f'"{h.rule.comment}"' if h.rule.comment else h.rule.text
        out.append(f"  {h.rule.chain:<{width}} #{h.rule.index:<2} [{count:>6} pkts] {what} -> {_target(h.rule)}")
    return out


def _verdict_text(v: Verdict, proxy_port: int) -> str:
    if v.kind == "redirect":
        return f"REDIRECT to port {v.port}" + (": captured, to the proxy" if v.port == proxy_port else
                                               f": not the proxy's port ({proxy_port})")
    if v.kind == "tproxy":
        return f"TPROXY to port {v.port}: captured, to the proxy"
    if v.kind == "accept":
        return "no rule maps it: not captured, it goes out (or in) as it is"
    if v.kind == "drop":
        return "dropped"
    if v.kind == "other":
        assert v.rule is not None
        return f"taken by a rule that is not ours ({v.rule.text})"
    return f"cannot tell: {v.reason}"


def _decision_text(d: Decision) -> list[str]:
    if d.refused:
        return [f"refused: {d.refused}"]
    lines = [f"listener {d.listener}, direction {d.direction}"]
    if d.unknown:
        return [*lines, f"chain: cannot tell: {d.unknown}"]
    shown = [s for s in d.steps if s.best not in ("any",) or len(s.kept) < s.out_of]
    if d.chain_from == "matched":
        lines.append(f"chain {d.chain}, by Envoy's precedence:")
    elif d.chain_from == "default":
        lines.append(f"chain {d.chain} (the listener's default: no configured chain matches)")
    else:
        lines.append(f"no chain: {d.chain_from}")
    for n, s in enumerate(shown, 1):
        kept = ", ".join(s.kept) if s.kept else "none"
        lines.append(f"  {n}. {s.name}: {s.best} -> {kept} ({len(s.kept)} of {s.out_of})")
    if d.action == "reject":
        lines.append("action reject: closed at once with a reset")
    elif d.action is not None:
        lines.append(f"cluster {d.cluster}: {d.endpoint_why}")
        if d.upstream:
            lines.append(f"upstream {hostport(*d.upstream)}" +
                         (f", from {d.source_address}" if d.source_address else ""))
        lines.append(f"mark {d.mark:#x}" if d.mark else "mark none")
    return lines
