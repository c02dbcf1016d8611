"""What the proxy would do with a connection, from its configuration alone.

The same steps as the data path (datapath/listener.py), told instead of
done: the listener, the loop guard's check of the proxy's own port, the
direction, the filter chain with Envoy's precedence step by step (the
selection itself is datapath/chains.py's, not a copy), the cluster, the
endpoint round robin would pick, the mark. Pure: the caller brings the
configuration, the pod's addresses and, if it has them, the counters of a
running proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from ..config import INBOUND_PASSTHROUGH_V4, INBOUND_PASSTHROUGH_V6, ORIGINAL_DST, Chain, Config, Listener, hostport
from ..datapath.chains import NO_MATCH, STEP_NAMES, ChainTable, Connection, prune

PREFIX_STEPS = (1, 3, 5)  # scored by prefix length + 1


@dataclass(frozen=True)
class Step:
    name: str
    best: str  # what the survivors have: "port 80", "/24", "named", "any", "none matches"
    kept: tuple[str, ...]
    out_of: int


@dataclass
class Decision:
    listener: str
    direction: str
    refused: str | None = None  # a reason the proxy refuses the connection before any chain
    chain: str | None = None  # None: no chain (closed: no_filter_chain_match)
    chain_from: str = ""  # "matched", "default", or why there is no answer
    steps: list[Step] = field(default_factory=list)
    action: str | None = None  # original, cluster, reject
    cluster: str | None = None
    weighted: tuple[tuple[str, int], ...] = ()
    upstream: tuple[str, int] | None = None
    endpoint_why: str = ""
    mark: int | None = None
    source_address: str | None = None
    unknown: str | None = None  # what could not be told, and why


def decide(config: Config, dst: str, dport: int, src: str | None, sport: int | None, local: Collection[str],
           connections: Mapping[str, int] | None = None, workers: int = 1) -> Decision:
    """The proxy's decision about a redirected connection to dst:dport from src:sport.

    `local`: the pod's addresses (they make a connection inbound);
    `connections`: per cluster, the connections a running proxy sent there so
    far (round robin's turn), None when explaining from a file."""
    listener = config.redirect
    if listener is None:
        return Decision("-", "-", refused="the configuration has no listener with original_dst: "
                                          "nothing reads redirected connections")
    port = listener.addresses[0].port
    is_local = dst in local or ipaddress.ip_address(dst).is_loopback
    if dport == port and is_local:
        return Decision(listener.name, "-", refused=f"it was going to the proxy's own port {port}: nothing "
                                                    "rewrote it, so there is nothing to forward to (not_redirected)")
    if listener.hand_off:
        listener = _hand_off(config, listener, dst, dport)
    direction = listener.direction
    if direction == "any":
        direction = "inbound" if dst in local else "outbound"
    decision = Decision(listener.name, direction)
    _choose_chain(decision, listener, dst, dport, src, sport)
    if decision.chain is None or decision.unknown:
        return decision
    chain = _chain_named(listener, decision.chain)
    _route(decision, config, chain, dst, dport, connections, workers)
    if decision.action == "original" and direction == "inbound":
        _to_app(decision, config, dst, src)
    return decision


def _to_app(decision: Decision, config: Config, dst: str, src: str | None) -> None:
    """An inbound connection forwarded as it is goes to the app as the data path
    sends it (upstream._to_app): with TPROXY from the client's address and
    with the tproxy mark; with inbound_source 127.0.0.6 from there (::6 for
    IPv6); else from the pod's address, as any passthrough."""
    if config.inbound_mode == "tproxy":
        decision.mark = config.tproxy_mark
        decision.source_address = src  # unknown without --from: the route's source is shown
        decision.endpoint_why += "; from the client's own address (inbound_mode tproxy)"
    elif config.inbound_source != "pod-ip":
        decision.source_address = INBOUND_PASSTHROUGH_V6 if ":" in dst else INBOUND_PASSTHROUGH_V4
        decision.endpoint_why += f"; from {decision.source_address} (inbound_source)"


def _hand_off(config: Config, listener: Listener, dst: str, dport: int) -> Listener:
    """Envoy's use_original_dst: the listener bound to the original destination, if any."""
    wildcard = "::" if ":" in dst else "0.0.0.0"
    for wanted in (dst, wildcard):
        for other in config.listeners:
            if other is not listener and any(a.host == wanted and a.port == dport for a in other.addresses):
                return other
    if ":" not in dst:
        for other in config.listeners:
            if other is not listener and other.v4_on_v6 and any(a.host == "::" and a.port == dport
                                                                for a in other.addresses):
                return other
    return listener


def _choose_chain(decision: Decision, listener: Listener, dst: str, dport: int, src: str | None,
                  sport: int | None) -> None:
    chains = listener.chains
    matches = [c.match for c in chains]
    if src is None and any(m.sources or m.direct_sources or m.source_type != "any" for m in matches):
        decision.unknown = "its chains match on the source address: give --from"
        return
    if sport is None and any(m.source_ports for m in matches):
        decision.unknown = "its chains match on the source port, which the kernel picks at connect time"
        return
    src = src if src is not None else dst
    sport = sport or 0
    chain = ChainTable(chains).lookup(dst, dport, src, decision.direction, sport) if chains else None
    local = src == dst or src.startswith("127.") or src == "::1"  # as ChainTable.lookup tells it
    conn = Connection(ipaddress.ip_address(dst), dport, ipaddress.ip_address(src), decision.direction, sport, local)
    for step, best, kept in prune(chains, conn) if chains else ():
        decision.steps.append(Step(STEP_NAMES[step], _score(step, best, dport), tuple(c.name for c in kept),
                                   len(chains) if step == 0 else len(decision.steps[-1].kept)))
    if chain is not None:
        decision.chain, decision.chain_from = chain.name, "matched"
    elif listener.default_chain is not None:
        decision.chain, decision.chain_from = listener.default_chain.name, "default"
    else:
        decision.chain_from = "no chain matches and the listener has no default chain: closed " \
                              "(no_filter_chain_match)"


def _score(step: int, best: int, dport: int) -> str:
    if best == NO_MATCH:
        return "none matches"
    if best == 0:
        return "any"
    if step == 0:
        return f"port {dport}"
    if step in PREFIX_STEPS:
        return f"/{best - 1}"
    return "named"


def _chain_named(listener: Listener, name: str) -> Chain:
    if listener.default_chain is not None and listener.default_chain.name == name:
        return listener.default_chain
    return next(c for c in listener.chains if c.name == name)


def _route(decision: Decision, config: Config, chain: Chain, dst: str, dport: int,
           connections: Mapping[str, int] | None, workers: int) -> None:
    decision.action = chain.action
    if chain.action == "reject":
        return
    if chain.action == "original":
        decision.cluster, decision.upstream = ORIGINAL_DST, (dst, dport)
        decision.endpoint_why = "the original destination (passthrough)"
        decision.mark = config.mark
        return
    name = chain.cluster
    decision.weighted = tuple((w.name, w.weight) for w in chain.weighted)
    if decision.weighted:
        total = sum(w for _, w in decision.weighted)
        decision.endpoint_why = "one cluster per connection by weight: " + ", ".join(
            f"{n} {100 * w / total:.0f}%" for n, w in decision.weighted)
        name = decision.weighted[0][0]
    assert name is not None
    cluster = config.cluster(name)
    decision.cluster = cluster.name
    decision.mark = cluster.mark if cluster.mark is not None else config.mark
    decision.source_address = cluster.source_address
    if cluster.kind == ORIGINAL_DST:
        decision.upstream = (dst, dport)
        decision.endpoint_why = "the original destination (an original_dst cluster)"
        return
    endpoints = cluster.endpoints
    if not endpoints:
        decision.endpoint_why = "the cluster has no endpoint: the connection is reset"
        return
    if decision.weighted:
        decision.endpoint_why += f"; shown: {cluster.name}"
    if cluster.lb_policy != "round_robin":
        decision.upstream = (endpoints[0].host, endpoints[0].port)
        decision.endpoint_why = (decision.endpoint_why + "; " if decision.weighted else "") + \
            f"{cluster.lb_policy}: any of {', '.join(str(e) for e in endpoints)} (shown: the first)"
        return
    if connections is None:
        turn, why = 0, "round robin, a fresh proxy: the first endpoint"
    elif workers > 1:
        turn, why = 0, f"round robin, but each of the {workers} workers keeps its own turn: the first is shown"
    else:
        turn = connections.get(cluster.name, 0)
        why = f"round robin: {turn} connection(s) went to this cluster before, so endpoint {turn % len(endpoints) + 1}"
    endpoint = endpoints[turn % len(endpoints)]
    decision.upstream = (endpoint.host, endpoint.port)
    decision.endpoint_why = (decision.endpoint_why + "; " if decision.weighted else "") + \
        f"{why} of {len(endpoints)} ({hostport(*decision.upstream)})"
