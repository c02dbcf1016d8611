"""Accepting connections and deciding where each one goes.

The data path, in the order it runs for every accepted connection:

    accept                      (the event loop; Relay.downstream is the protocol)
    -> original destination     (sockopts.original_dst)
    -> loop guard               (our own listener, or one of our own upstream sockets?)
    -> direction                (original destination is a pod address: inbound)
    -> chain selection          (chains.ChainTable.lookup, Envoy's precedence)
    -> upstream connect         (Listener._attempt: endpoint order, upstream.open_socket
                                 with the mark; the relay confirms it or fails it)
    -> relay                    (relay.Relay: bytes both ways until both sides end;
                                 splice.Pump for bulk directions)

A plain listener (loopback, for proxy-aware apps) skips the first four steps:
it has no original destination and always goes to its one cluster.

Every per-connection failure is contained here: it ends that connection,
is logged once with the connection id, counted, and written to the access
log. Nothing a client does reaches the accept loop.

Stat names are made here and only here (Envoy's where the meaning is the same):

    listener.<address>.downstream_cx_{total,active,destroy,rx_bytes_total,tx_bytes_total}
    listener.<address>.{loop_guard_refused,resource_exhaustion}      (ours)
    splice.{pumps_total,pumps_active,unavailable}                     (ours)
    cluster.<name>.upstream_cx_{total,active,destroy,connect_fail,connect_timeout,
                                rx_bytes_total,tx_bytes_total}
    chain.<name>.{cx_total,rejected}, direction.<inbound|outbound>.cx_total   (ours)

<address> is Envoy's form of the listener's first address, `[__]_5001` for
[::]:5001, `0.0.0.0_5001`, `127.0.0.1_15080`; `original_dst` is the cluster
of connections forwarded to their original destination.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from sys import intern

from . import upstream
from .accesslog import AccessLog
from .chains import ChainTable
from ..config import Chain, Config, Endpoint, PlainListener
from .localaddrs import LocalAddresses
from .relay import Relay, Upstream, hostport
from .sockopts import original_dst, unmapped
from .stats import Names, Stats, stat_address

log = logging.getLogger("proxy.listener")

# The chain a connection gets when no configured chain matches it. Istio calls
# the same thing PassthroughCluster; Envoy, the default filter chain.
PASSTHROUGH = Chain(name="passthrough", action="original")
BLACKHOLE = Chain(name="blackhole", action="reject")
# The cluster of connections that go to their original destination (Envoy's
# ORIGINAL_DST cluster type; Istio's PassthroughCluster).
ORIGINAL_DST = "original_dst"

LISTENER_STATS = ("downstream_cx_total", "downstream_cx_active", "downstream_cx_destroy",
                  "downstream_cx_rx_bytes_total", "downstream_cx_tx_bytes_total", "resource_exhaustion")
REDIRECT_STATS = (*LISTENER_STATS, "loop_guard_refused")
SPLICE_STATS = ("pumps_total", "pumps_active", "unavailable")
CLUSTER_STATS = ("upstream_cx_total", "upstream_cx_active", "upstream_cx_destroy", "upstream_cx_connect_fail",
                 "upstream_cx_connect_timeout", "upstream_cx_rx_bytes_total", "upstream_cx_tx_bytes_total")

LOOP_HINT = ("the proxy's own upstream connection was redirected back to it: "
             "the rules do not exempt the proxy (check that it runs as the UID, "
             "mark or cgroup the redirect rules bypass)")


@dataclass(frozen=True, slots=True)
class Route:
    """How one cluster's upstream connections are made."""

    names: Names  # its stats: "cluster.<name>.upstream_cx_total", ...
    timeout: float  # per attempt
    mark: int | None


@dataclass
class Shared:
    """State every listener of one proxy process shares."""

    config: Config
    stats: Stats
    access_log: AccessLog
    local: LocalAddresses
    own: upstream.OwnSockets = field(default_factory=upstream.OwnSockets)
    live: dict[int, Relay] = field(default_factory=dict)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    balancers: dict[str, upstream.RoundRobin] = field(default_factory=dict)
    exhaustion_logged: float = float("-inf")
    listener_stats: dict[str, Names] = field(default_factory=dict)  # listener name -> its stats

    def __post_init__(self) -> None:
        config = self.config
        self.balancers = {c.name: upstream.RoundRobin(c) for c in config.clusters}
        # how each cluster's attempts are made: its stats, connect timeout, mark
        self.routes = {c.name: Route(Names(f"cluster.{c.name}.", CLUSTER_STATS), c.connect_timeout,
                                     c.mark if c.mark is not None else config.mark) for c in config.clusters}
        self.routes[ORIGINAL_DST] = Route(Names(f"cluster.{ORIGINAL_DST}.", CLUSTER_STATS),
                                          config.connect_timeout, config.mark)
        self.table = ChainTable(self.config.chains)
        self.default_chain = PASSTHROUGH if self.config.default_action == "original" else BLACKHOLE
        self.chain_stats = {c.name: Names(f"chain.{c.name}.", ("cx_total", "rejected") if c.action == "reject"
                                          else ("cx_total",)) for c in (*config.chains, self.default_chain)}
        self.direction_stats = {d: f"direction.{d}.cx_total" for d in ("inbound", "outbound")}
        self.splice_stats = Names("splice.", SPLICE_STATS)
        self._declare_stats()

    def _declare_stats(self) -> None:
        """Every configured cluster, chain and direction is listed in /stats from the start."""
        stats, config = self.stats, self.config
        for route in self.routes.values():
            stats.declare(*route.names.all)
        for cluster in config.clusters:
            for endpoint in cluster.endpoints:
                stats.host(cluster.name, endpoint)
        for names in self.chain_stats.values():
            stats.declare(*names.all)
        stats.declare(*self.direction_stats.values())
        if config.splice == "auto":
            stats.declare(*self.splice_stats.all)

    def note_exhaustion(self, names: Names, message: str) -> None:
        """Out of descriptors or memory: count every time, log once a second."""
        self.stats.inc(names.resource_exhaustion)
        now = time.monotonic()
        if now - self.exhaustion_logged >= 1.0:
            self.exhaustion_logged = now
            log.warning("%s", message)

    def live_counts(self) -> Counter[str]:
        """Bytes of the connections still open, under the names `ended` will add them to.

        Called by the admin API when it renders, never on the data path.
        """
        counts: Counter[str] = Counter()
        for relay in self.live.values():
            up, down = relay.bytes_from_downstream, relay.bytes_from_upstream
            names = self.listener_stats.get(relay.listener)
            if names is not None:
                counts[names.downstream_cx_rx_bytes_total] += up
                counts[names.downstream_cx_tx_bytes_total] += down
            cluster = relay.upstream_stat
            if cluster is not None:
                counts[cluster.upstream_cx_tx_bytes_total] += up
                counts[cluster.upstream_cx_rx_bytes_total] += down
        return counts


class Listener:
    """One logical listener: the redirected port, or a plain listener."""

    def __init__(self, shared: Shared, loop: asyncio.AbstractEventLoop, plain: PlainListener | None = None,
                 address: tuple[str, int] | None = None):
        """`address`: the first address it listens on, which names its stats (as in Envoy)."""
        self.shared = shared
        self.loop = loop
        self.plain = plain
        self.name = plain.name if plain else "redirect"
        self.splice = shared.config.splice == "auto"  # relay.Relay asks, per bulk direction
        self.port = plain.port if plain else shared.config.port
        if address is None:
            address = (plain.address, plain.port) if plain else (shared.config.addresses[0], self.port)
        self.names = Names(f"listener.{stat_address(*address)}.", LISTENER_STATS if plain else REDIRECT_STATS)
        shared.listener_stats[self.name] = self.names
        shared.stats.declare(*self.names.all)

    def protocol(self):
        """Protocol factory for loop.create_server: one Relay per connection."""
        return Relay(next(self.shared.ids), self).downstream

    # accept -> decision ---------------------------------------------------------
    def accepted(self, relay: Relay) -> None:
        """Decide about one accepted connection; nothing in here reaches the loop."""
        shared, stats = self.shared, self.shared.stats
        shared.live[relay.id] = relay
        stats.inc(self.names.downstream_cx_total)
        stats.inc(self.names.downstream_cx_active)
        relay.listener = self.name
        try:
            self._decide(relay)
        except Exception:  # a bug: this connection ends, the proxy goes on
            log.exception("conn=%d failed while accepting", relay.id)
            relay.close("error", reset=True)

    def _decide(self, relay: Relay) -> None:
        shared, stats = self.shared, self.shared.stats
        transport = relay.downstream.transport
        peer = transport.get_extra_info("peername")
        if peer is None:  # reset before we could even ask who it was
            relay.close("downstream_reset", reset=True)
            return
        # interned: a pod sees the same few addresses over and over, and an
        # idle connection should not keep its own copy of each
        src, src_port = intern(unmapped(peer[0])), peer[1]
        relay.source = (src, src_port)
        if self.plain is not None:
            relay.direction, relay.chain = "outbound", f"plain:{self.name}"
            cluster = shared.config.cluster(self.plain.cluster).name
            self._forward(relay, cluster, shared.balancers[cluster].order())
            return
        try:  # an IPv4 client, also one on a dual-stack socket, needs the IPv4 call
            orig = original_dst(transport.get_extra_info("socket"), ipv4=":" not in src)
        except OSError as exc:
            self._refuse(relay, "error", f"cannot read the original destination: {exc}")
            return
        if orig is None:  # no conntrack entry at all
            self._refuse_direct(relay)
            return
        dst, dst_port = orig
        relay.destination = orig = Endpoint(intern(dst), dst_port)
        if (src, src_port, dst, dst_port) in shared.own:  # one of our own upstream sockets
            stats.inc(self.names.loop_guard_refused)
            self._refuse(relay, "loop_guard", LOOP_HINT)
            return
        if dst_port == self.port and (dst in shared.local or _is_loopback(dst)):
            # conntrack saw it, but nothing rewrote it: it came to our own port
            stats.inc(self.names.loop_guard_refused)
            self._refuse_direct(relay)
            return
        direction = "inbound" if dst in shared.local else "outbound"
        relay.direction = direction
        stats.inc(shared.direction_stats[direction])
        chain = shared.table.lookup(dst, dst_port, src, direction) or shared.default_chain
        relay.chain = chain.name
        names = shared.chain_stats[chain.name]
        stats.inc(names.cx_total)
        if chain.action == "reject":
            stats.inc(names.rejected)
            relay.close("rejected", reset=True)
        elif chain.action == "cluster":
            self._forward(relay, chain.cluster, shared.balancers[chain.cluster].order())
        else:
            self._forward(relay, ORIGINAL_DST, [orig])

    def _refuse(self, relay: Relay, reason: str, why: str) -> None:
        log.warning("conn=%d %s -> %s refused (%s): %s", relay.id, hostport(relay.source),
                    hostport(relay.destination), reason, why)
        relay.close(reason, reset=True)

    def _refuse_direct(self, relay: Relay) -> None:
        self._refuse(relay, "not_redirected",
                     f"{hostport(relay.source)} dialled the redirected port directly; nothing to forward to")

    # upstream -------------------------------------------------------------------------
    def _forward(self, relay: Relay, cluster_name: str, endpoints: list[Endpoint]) -> None:
        """Connect upstream: the endpoints in this order, each tried once."""
        relay.cluster, relay.remaining = cluster_name, endpoints
        self._attempt(relay)

    def _attempt(self, relay: Relay) -> None:
        """Start connecting to the next endpoint; give up when none is left."""
        shared, stats = self.shared, self.shared.stats
        route = shared.routes[relay.cluster]
        remaining = relay.remaining
        while remaining:
            endpoint = remaining.pop(0)
            stats.inc(route.names.upstream_cx_total)  # each attempt counts, as in Envoy
            try:
                sock, key = upstream.open_socket(endpoint, route.mark, shared.own)
            except upstream.MarkDenied as exc:  # the privilege went away after start-up?
                log.error("conn=%d privilege: %s", relay.id, exc)
                relay.close("error", reset=True)
                return
            except OSError as exc:
                self._count_failure(relay.cluster, endpoint, timed_out=False)
                if exc.errno in upstream.EXHAUSTION:  # no other endpoint will fare better
                    shared.note_exhaustion(self.names, f"out of resources ({errno.errorcode[exc.errno]} "
                                           f"opening a socket to {endpoint}): refusing connections until some close")
                    relay.close("connect_failed", reset=True)
                    return
                if not remaining:
                    self._gave_up(relay, endpoint, exc.strerror, timed_out=False)
                continue
            up = Upstream(relay, endpoint, key, sock)
            relay.attach(up, keep=bool(remaining), timeout=route.timeout)
            upstream.start(self.loop.create_connection(lambda: up, sock=sock),
                           partial(self._start_failed, relay, up))
            return

    def _start_failed(self, relay: Relay, up: Upstream, exc: BaseException) -> None:
        """The loop would not take the socket (its transport never comes)."""
        log.info("conn=%d upstream socket failed: %r", relay.id, exc)
        up.lost = True
        if up is relay.upstream and relay.end is None:
            relay.failed(up, timed_out=False, reason=repr(exc))
        else:
            self.shared.own.discard(up.key)
            relay.side_lost(up, None)

    def connected(self, relay: Relay, up: Upstream) -> None:
        """The relay confirmed its upstream: count it as an open connection."""
        stats = self.shared.stats
        names = self.shared.routes[relay.cluster].names
        stats.inc(names.upstream_cx_active)
        host = stats.host(relay.cluster, up.endpoint)
        host["cx_total"] += 1
        host["cx_active"] += 1
        host["rq_total"] += 1  # Envoy's TCP pool counts each connection as a request too
        host["rq_active"] += 1
        relay.upstream_stat = names

    def connect_failed(self, relay: Relay, up: Upstream, timed_out: bool, reason: str) -> None:
        """One attempt failed: the next endpoint, or the end of the connection."""
        self.shared.own.discard(up.key)
        self._count_failure(relay.cluster, up.endpoint, timed_out)
        if relay.remaining:
            self._attempt(relay)
        else:
            self._gave_up(relay, up.endpoint, reason, timed_out)

    def _gave_up(self, relay: Relay, endpoint: Endpoint, reason: str, timed_out: bool) -> None:
        """No endpoint is left: the client gets a RST (the end reason is the last attempt's)."""
        log.info("conn=%d upstream connect failed: %s: %s", relay.id, endpoint, reason)
        relay.close("connect_timeout" if timed_out else "connect_failed", reset=True)

    def _count_failure(self, cluster_name: str, endpoint: Endpoint, timed_out: bool) -> None:
        """As in Envoy: a failed attempt is an upstream_cx_connect_fail, and one
        that timed out an upstream_cx_connect_timeout too."""
        stats, names = self.shared.stats, self.shared.routes[cluster_name].names
        stats.inc(names.upstream_cx_connect_fail)
        if timed_out:
            stats.inc(names.upstream_cx_connect_timeout)
        # Original destinations are not remembered when they fail (there is
        # no bound on how many a client can try); the cluster's stats count them.
        if cluster_name != ORIGINAL_DST:
            host = stats.host(cluster_name, endpoint)
            host["cx_total"] += 1
            host["cx_connect_fail"] += 1

    # bulk ---------------------------------------------------------------------------
    def pumped(self, relay: Relay, change: int) -> None:
        """A splice pump started (+1) or stopped (-1) for one direction of `relay`."""
        names, stats = self.shared.splice_stats, self.shared.stats
        if change > 0:
            stats.inc(names.pumps_total)
        stats.inc(names.pumps_active, change)

    def pump_unavailable(self, relay: Relay, exc: OSError) -> None:
        self.shared.stats.inc(self.shared.splice_stats.unavailable)
        if exc.errno in upstream.EXHAUSTION:
            self.shared.note_exhaustion(self.names, f"out of resources ({errno.errorcode[exc.errno]} "
                                        "making a splice pump): bulk transfers are copied until some close")
        else:
            log.warning("conn=%d cannot splice (%s): copying instead", relay.id, exc)

    # end ------------------------------------------------------------------------------
    def ended(self, relay: Relay) -> None:
        shared, stats = self.shared, self.shared.stats
        shared.live.pop(relay.id, None)
        if relay.upstream is not None:
            shared.own.discard(relay.upstream.key)
        names = self.names
        stats.dec(names.downstream_cx_active)
        stats.inc(names.downstream_cx_destroy)
        up, down = relay.bytes_from_downstream, relay.bytes_from_upstream
        stats.inc(names.downstream_cx_rx_bytes_total, up)
        stats.inc(names.downstream_cx_tx_bytes_total, down)
        if relay.upstream_stat is not None:
            cluster, relay.upstream_stat = relay.upstream_stat, None
            stats.dec(cluster.upstream_cx_active)
            stats.inc(cluster.upstream_cx_destroy)
            stats.inc(cluster.upstream_cx_tx_bytes_total, up)
            stats.inc(cluster.upstream_cx_rx_bytes_total, down)
            endpoint, cluster_name = relay.upstream.endpoint, relay.cluster
            host = stats.host(cluster_name, endpoint)
            host["cx_active"] -= 1
            host["rq_active"] -= 1
            if cluster_name == ORIGINAL_DST and not host["cx_active"]:
                stats.drop_host(cluster_name, endpoint)  # Envoy too forgets idle original destinations
        if shared.access_log.enabled:
            entry = relay.describe()
            entry.update(bytes_up=up, bytes_down=down, end=relay.end or "done",
                         duration_ms=round((time.monotonic() - relay.started) * 1000, 3))
            shared.access_log.write(entry)


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host == "::1"

