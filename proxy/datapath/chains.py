"""Filter-chain selection by original destination, with Envoy's semantics.

Theory of operation
-------------------
A chain is a candidate only if ALL of its criteria hold for the connection.
Among candidates the most specific one wins, deciding criterion by criterion
in this fixed order, exactly as Envoy's FilterChainMatch does (criteria Envoy
has and we never see, server names and ALPN, need a TLS inspector we do not
have):

1. destination port: chains naming the port beat chains with no port list;
2. destination prefix: the longest matching prefix beats shorter ones, and
   any prefix beats a chain with no destination list;
3. transport protocol: a chain naming it ("raw_buffer", the only one without
   a TLS inspector) beats one that does not;
4. direct source prefix: as destination (the same address as the source,
   since we read no PROXY protocol);
5. source type: a chain asking for a local connection (from a loopback
   address, or from the address it was going to) or an external one beats
   "any";
6. source prefix: as destination;
7. source port: a chain naming it beats one without a list;
8. direction (ours, not Envoy's): a chain naming the connection's direction
   (inbound/outbound) beats one that says "any".

The set of chains is pruned step by step and there is no backtracking: if
the chains naming port 80 all fail on their destination prefix, a connection
to port 80 does not fall back to the chains without a port; it matches no
chain, and the listener's default chain applies (Envoy's
FilterChainManagerImpl::findFilterChain does the same, and says so). Since
two chains with overlapping criteria are rejected when the config is loaded
(`config.check_ambiguous`), at most one chain survives all eight steps.

Everything here is pure: addresses are `ipaddress` objects, nothing touches a
socket. `ChainTable` indexes chains by port once so a lookup costs a dict get
and a scan of the few chains that name that port; `ChainTable.lookup` takes
the addresses as the strings the accept path has and remembers its answers
(a sidecar sees few distinct destinations, and parsing two addresses costs
more than the selection itself).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..config import Chain, IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NO_MATCH = -1
LOOKUP_MEMORY = 4096  # remembered lookups; forgotten all at once when full


STEPS = 8


@dataclass(frozen=True, slots=True)
class Connection:
    """What chain selection looks at."""

    dst: IPAddress | None  # None when no chain has a destination prefix (never looked at then)
    dst_port: int
    src: IPAddress | None  # likewise for source and direct source prefixes
    direction: str  # "inbound" or "outbound"
    src_port: int = 0  # 0 when no chain has source ports
    local: bool = False  # from a loopback address, or from the address it was going to


def _prefix_score(networks: Sequence[IPNetwork], addr: IPAddress | None) -> int:
    """Longest matching prefix length; 0-based scores: -1 no match, 0 = no list."""
    if not networks:
        return 0
    assert addr is not None  # Connection leaves out only addresses no chain looks at
    best = NO_MATCH
    for net in networks:
        if net.version == addr.version and addr in net:
            best = max(best, net.prefixlen + 1)
    return best


def _named(value: object, wanted: object, anything: object) -> int:
    """A single-valued criterion: 0 if the chain takes `anything`, 1 if it names the value, else no match."""
    if wanted == anything:
        return 0
    return 1 if wanted == value else NO_MATCH


def specificity(chain: Chain, conn: Connection) -> tuple[int, ...]:
    """How specifically `chain` matches `conn`, one score per criterion in order.

    Each score is NO_MATCH (-1) if the criterion fails, 0 if the chain does not
    constrain it, and higher the more specific the match is.
    """
    m = chain.match
    source_type = m.source_type
    return (
        (1 if conn.dst_port in m.ports else NO_MATCH) if m.ports else 0,
        _prefix_score(m.destinations, conn.dst),
        _named("raw_buffer", m.transport_protocol, ""),
        _prefix_score(m.direct_sources, conn.src),
        _named("local" if conn.local else "external", source_type, "any"),
        _prefix_score(m.sources, conn.src),
        (1 if conn.src_port in m.source_ports else NO_MATCH) if m.source_ports else 0,
        _named(conn.direction, m.direction, "any"),
    )


# What each step compares (for tools that explain a selection: proxy/explain).
STEP_NAMES = ("destination port", "destination prefix", "transport protocol", "direct source prefix",
              "source type", "source prefix", "source port", "direction")


def prune(chains: Iterable[Chain], conn: Connection) -> Iterator[tuple[int, int, list[Chain]]]:
    """Envoy's pruning, one step at a time: (step, best score, the chains that
    keep it). A best score of NO_MATCH ends it: no chain survives that step."""
    candidates = list(chains)
    for step in range(STEPS):
        scored = [(specificity(c, conn)[step], c) for c in candidates]
        best = max((score for score, _ in scored), default=NO_MATCH)
        candidates = [c for score, c in scored if score == best] if best != NO_MATCH else []
        yield step, best, candidates
        if not candidates:
            return


def select(chains: Iterable[Chain], conn: Connection) -> Chain | None:
    """The chain for `conn` by Envoy's pruning, or None if no chain survives."""
    candidates: list[Chain] = []
    for _step, _best, kept in prune(chains, conn):
        candidates = kept
    return candidates[0] if candidates else None


class ChainTable:
    """The chains of one listener, indexed by destination port for fast lookup."""

    def __init__(self, chains: Sequence[Chain]) -> None:
        self.chains = tuple(chains)
        self._by_port: dict[int, tuple[Chain, ...]] = {}
        for chain in self.chains:
            for port in chain.match.ports:
                self._by_port[port] = self._by_port.get(port, ()) + (chain,)
        self._any_port = tuple(c for c in self.chains if not c.match.ports)
        # Selection looks at an address or a port only if some chain has a criterion for it.
        matches = [c.match for c in self.chains]
        by_type = any(m.source_type != "any" for m in matches)
        self._uses_dst = by_type or any(m.destinations for m in matches)
        self._uses_src = by_type or any(m.sources or m.direct_sources for m in matches)
        self._uses_src_port = any(m.source_ports for m in matches)
        self._memory: dict[tuple[str | None, int, str | None, int, str], Chain | None] = {}

    def select(self, conn: Connection) -> Chain | None:
        # Step 1 (port) is the dict lookup; the other steps prune what is left.
        candidates = self._by_port.get(conn.dst_port, self._any_port)
        if not candidates:
            return None
        if len(candidates) == 1:
            chain = candidates[0]
            return chain if NO_MATCH not in specificity(chain, conn) else None
        return select(candidates, conn)

    def lookup(self, dst: str, dst_port: int, src: str, direction: str, src_port: int = 0) -> Chain | None:
        """select() for addresses given as strings; answers are remembered."""
        key = (dst if self._uses_dst else None, dst_port, src if self._uses_src else None,
               src_port if self._uses_src_port else 0, direction)
        try:
            return self._memory[key]
        except KeyError:
            pass
        local = src == dst or src.startswith("127.") or src == "::1"
        chain = self.select(Connection(_ip(key[0]), dst_port, _ip(key[2]), direction, key[3], local))
        if len(self._memory) >= LOOKUP_MEMORY:
            self._memory.clear()
        self._memory[key] = chain
        return chain


def _ip(address: str | None) -> IPAddress | None:
    return None if address is None else ipaddress.ip_address(address)
