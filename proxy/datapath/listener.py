"""Accepting connections and deciding where each one goes.

The data path, in the order it runs for every accepted connection, and the
file that holds each step (read them in this order):

    accept                      the event loop; a Relay's Downstream is the protocol   (relay.py)
    -> original destination     sockopts.original_dst (TPROXY: tproxied_dst)           (sockopts.py)
    -> loop guard               our own listener, or one of our own upstream sockets?  (here)
    -> direction                original destination is a pod address: inbound         (localaddrs.py)
    -> chain selection          Envoy's precedence                                     (chains.py)
    -> upstream connect         endpoint order, mark, next endpoint on failure         (upstream.py)
    -> relay                    bytes both ways until both sides end                   (relay.py, splice.py)
    -> ended                    counters, access log                                   (here, stats.py, accesslog.py)

A listener without the original destination (a plain listener on loopback,
for proxy-aware apps) skips the first three steps: its chains match on the
address it was dialled at. A listener with `hand_off` (Envoy's
use_original_dst) gives a redirected connection to the listener bound to its
original destination, if there is one, which then decides as if it had
accepted it (Istio's virtualOutbound listener and its per-service ones).

Every per-connection failure is contained here: it ends that connection,
is logged once with the connection id, counted, and written to the access
log. Nothing a client does reaches the accept loop.

Stat names (Envoy's where the meaning is the same; upstream.py makes the cluster ones):

    listener.<address>.downstream_cx_{total,active,destroy,rx_bytes_total,tx_bytes_total}
    listener.<address>.{loop_guard_refused,resource_exhaustion}      (ours)
    listener.<address>.no_filter_chain_match
    listener.<address>.drain_refused                                  (ours: drain.py)
    listener.<address>.downstream_{cx_overflow,global_cx_overflow}   (limits.py)
    splice.{pumps_total,pumps_active,unavailable}                     (ours)
    chain.<name>.{cx_total,rejected}, direction.<inbound|outbound>.cx_total   (ours)
    tcp.<stat_prefix>.*   Envoy's tcp_proxy stats, for chains with a stat_prefix (TCP_STATS)

<address> is Envoy's form of the listener's first address, `[__]_5001` for
[::]:5001, `0.0.0.0_5001`, `127.0.0.1_15080`.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from sys import intern
from typing import Any

from ..config import ENVOY_LOG_FORMAT, Config, Endpoint, compile_format, hostport
from ..config import Listener as ListenerSpec
from .accesslog import AccessLog
from .chains import ChainTable
from .drain import Drain
from .limits import Gate, admit, move, release
from .localaddrs import LocalAddresses
from .relay import Relay, Upstream
from .sockopts import original_dst, tproxied_dst, unmapped
from .stats import Names, Stats, stat_address
from .upstream import EXHAUSTION, Connector, OwnSockets

log = logging.getLogger("proxy.listener")

LISTENER_STATS = ("downstream_cx_total", "downstream_cx_active", "downstream_cx_destroy",
                  "downstream_cx_rx_bytes_total", "downstream_cx_tx_bytes_total", "resource_exhaustion",
                  "downstream_cx_overflow", "downstream_global_cx_overflow", "drain_refused")
REDIRECT_STATS = (*LISTENER_STATS, "loop_guard_refused")
SPLICE_STATS = ("pumps_total", "pumps_active", "unavailable")
# Envoy's tcp_proxy stats, all of them. The ones we never move stay 0: the duration
# limit is for a configuration we do not take; the flush
# counters Envoy moves when a client closes while bytes of its wait to be written
# upstream, which its deferred writes make nearly every time a client sends its last
# bytes and its FIN together; we write at once (README, "Differences from Envoy").
TCP_STATS = ("downstream_cx_total", "downstream_cx_no_route", "downstream_cx_tx_bytes_total",
             "downstream_cx_tx_bytes_buffered", "downstream_cx_rx_bytes_total", "downstream_cx_rx_bytes_buffered",
             "downstream_flow_control_paused_reading_total", "downstream_flow_control_resumed_reading_total",
             "idle_timeout", "max_downstream_connection_duration", "upstream_flush_total", "upstream_flush_active")

LOOP_HINT = ("the proxy's own upstream connection was redirected back to it: "
             "the rules do not exempt the proxy (check that it runs as the UID, "
             "mark or cgroup the redirect rules bypass)")
EXHAUSTION_LOG_INTERVAL = 1.0  # seconds between two warnings of running out of descriptors or memory


class Shared:
    """State every listener of one proxy process shares."""

    def __init__(self, config: Config, stats: Stats, access_log: AccessLog, local: LocalAddresses,
                 loop: asyncio.AbstractEventLoop, ids: itertools.count[int] | None = None) -> None:
        """`ids`: where connection ids come from (a worker's are unique across the workers)."""
        self.config, self.stats, self.access_log, self.local = config, stats, access_log, local
        self.ids = ids if ids is not None else itertools.count(1)
        self.live: dict[int, Relay] = {}
        self.gate = Gate(config.max_connections)  # the whole proxy's connection limit (limits.py)
        self.drain = Drain(config.drain_strategy)  # new connections a drain refuses (drain.py)
        self.own = OwnSockets()
        self.tproxy = config.inbound_mode == "tproxy"  # TPROXY'd inbound: the local address is the destination
        self.listener_stats: dict[str, Names] = {}  # listener name -> its stats
        self.exhaustion_logged = float("-inf")
        self.connector = Connector(config, stats, self.own, loop, self._connect_exhaustion)
        self.by_address: dict[tuple[str, int], Listener] = {}  # every listener's addresses, for hand-offs
        chains = [c for spec in config.listeners for c in (*spec.chains, spec.default_chain) if c is not None]
        self.chain_stats = {c.name: Names(f"chain.{c.name}.", ("cx_total", "rejected") if c.action == "reject"
                                          else ("cx_total",)) for c in chains}
        # per chain: its tcp_proxy stats (chains may share a prefix, and then the stats), its idle
        # timeout (inf: none), and its own access logs (one writer per file and format)
        by_prefix = {p: Names(f"tcp.{p}.", TCP_STATS) for p in {c.stat_prefix for c in chains} if p}
        self.tcp_stats = {c.name: by_prefix[c.stat_prefix] for c in chains if c.stat_prefix}
        self.idle_timeouts = {c.name: _idle(c.idle_timeout, config.idle_timeout) for c in chains}
        self.shortest_idle_timeout = min((config.idle_timeout, *self.idle_timeouts.values()))
        writers = {(log.path, log.format): AccessLog(log.path, _rendering(log.format))
                   for c in chains for log in c.access_logs}
        self.chain_logs = {c.name: tuple(writers[log.path, log.format] for log in c.access_logs)
                           for c in chains if c.access_logs}
        self.chain_log_names = {c.name: c.log_name for c in chains if c.log_name is not None}
        for names in by_prefix.values():
            stats.declare(*names.all)
        self.direction_stats = {d: f"direction.{d}.cx_total" for d in ("inbound", "outbound")}
        self.splice_stats = Names("splice.", SPLICE_STATS)
        # every configured chain and direction is listed in /stats from the start
        for names in self.chain_stats.values():
            stats.declare(*names.all)
        stats.declare(*self.direction_stats.values())
        if config.splice == "auto":
            stats.declare(*self.splice_stats.all)

    def close(self) -> None:
        """Write out and close every access log."""
        self.access_log.close()
        for logs in self.chain_logs.values():
            for log_ in logs:
                log_.close()

    def note_exhaustion(self, names: Names, message: str) -> None:
        """Out of descriptors or memory: count every time, log once a second."""
        self.stats.inc(names.resource_exhaustion)
        now = time.monotonic()
        if now - self.exhaustion_logged >= EXHAUSTION_LOG_INTERVAL:
            self.exhaustion_logged = now
            log.warning("%s", message)

    def listener_for(self, host: str, port: int) -> Listener | None:
        """The listener of an address, as Envoy hands a connection off: the one
        bound to exactly that address, else a wildcard one on the same port."""
        found = self.by_address.get((host, port))
        if found is None:
            found = self.by_address.get(("::" if ":" in host else "0.0.0.0", port))
        if found is None and ":" not in host:
            wildcard = self.by_address.get(("::", port))
            if wildcard is not None and wildcard.spec.v4_on_v6:
                found = wildcard
        return found

    def _connect_exhaustion(self, relay: Relay, message: str) -> None:
        """The connector could not open a socket for `relay`: its listener counts it."""
        self.note_exhaustion(self.listener_stats[relay.listener], message)

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
            if (upstream := relay.confirmed) is not None:
                cluster = upstream.attempts.route.names
                counts[cluster.upstream_cx_tx_bytes_total] += up
                counts[cluster.upstream_cx_rx_bytes_total] += down
            tcp = self.tcp_stats.get(relay.chain)
            if tcp is not None:
                counts[tcp.downstream_cx_rx_bytes_total] += up
                counts[tcp.downstream_cx_tx_bytes_total] += down
                counts[tcp.downstream_cx_tx_bytes_buffered] += _buffered(relay.downstream.transport)
                if upstream is not None:
                    counts[tcp.downstream_cx_rx_bytes_buffered] += _buffered(upstream.transport)
        return counts


class Listener:
    """One logical listener (config.Listener), on any number of sockets (a relay.Owner)."""

    def __init__(self, shared: Shared, loop: asyncio.AbstractEventLoop, spec: ListenerSpec,
                 address: tuple[str, int] | None = None):
        """`address`: the first address it listens on, which names its stats (as
        in Envoy); its first configured address if not given."""
        self.shared, self.loop, self.spec = shared, loop, spec
        self.name = spec.name
        self.splice = shared.config.splice == "auto"  # relay.Relay asks, per bulk direction
        self.port = spec.addresses[0].port
        self.table = ChainTable(spec.chains)
        if address is None:
            address = spec.addresses[0]
        stats = REDIRECT_STATS if spec.original_dst else LISTENER_STATS
        if spec.default_chain is None:
            stats = (*stats, "no_filter_chain_match")
        self.names = Names(f"listener.{stat_address(*address)}.", stats)
        self.gate = Gate(spec.max_connections)
        shared.listener_stats[self.name] = self.names
        shared.stats.declare(*self.names.all)
        for endpoint in spec.addresses:
            shared.by_address[endpoint.host, endpoint.port] = self

    def protocol(self) -> asyncio.Protocol:
        """Protocol factory for loop.create_server: one Relay per connection (past a limit, a reset)."""
        names = self.names
        refused = admit(self.gate, self.shared.gate, self.shared.stats, names.downstream_cx_overflow,
                        names.downstream_global_cx_overflow, self.name)
        return refused or Relay(next(self.shared.ids), self).downstream

    # accept -> decision ---------------------------------------------------------
    def accepted(self, relay: Relay) -> None:
        """Decide about one accepted connection; nothing in here reaches the loop."""
        self.shared.live[relay.id] = relay
        try:
            self._decide(relay)
        except Exception:  # a bug: this connection ends, the proxy goes on
            log.exception("conn=%d failed while accepting", relay.id)
            relay.close("error", reset=True)

    def _count(self, relay: Relay) -> None:
        """The connection is this listener's (also one handed to it)."""
        relay.owner, relay.listener = self, self.name
        relay.idle_timeout = self.shared.config.idle_timeout
        counters = self.shared.stats.counters  # (the counters themselves: fewer calls per connection)
        counters[self.names.downstream_cx_total] += 1
        counters[self.names.downstream_cx_active] += 1

    def _decide(self, relay: Relay) -> None:
        shared, stats = self.shared, self.shared.stats
        transport = relay.downstream.transport
        peer = transport.get_extra_info("peername")
        if peer is None:  # reset before we could even ask who it was
            self._reset_early(relay)
            return
        # interned: a pod sees the same few addresses over and over, and an
        # idle connection should not keep its own copy of each
        src, src_port = intern(unmapped(peer[0])), peer[1]
        relay.source = Endpoint(src, src_port)
        if not self.spec.original_dst:
            self._count(relay)
            if self.table.chains:  # they match on the address it was dialled at
                host, port = transport.get_extra_info("sockname")[:2]
                relay.destination = Endpoint(intern(unmapped(host)), port)
            self._route(relay, src, src_port, "outbound" if self.spec.direction == "any" else self.spec.direction)
            return
        try:
            orig = None
            if shared.tproxy:  # a TPROXY'd connection arrives as it was addressed (sockopts.py)
                orig = tproxied_dst(transport.get_extra_info("sockname"), self.port)
            if orig is None:  # an IPv4 client, also one on a dual-stack socket, needs the IPv4 call
                sock = relay.downstream.raw_socket()
                if sock is None:  # reset already: the loop has let go of the socket
                    self._reset_early(relay)
                    return
                orig = original_dst(sock, ipv4=":" not in src)
        except OSError as exc:
            self._count(relay)
            self._refuse(relay, "error", f"cannot read the original destination: {exc}")
            return
        if orig is None:  # no conntrack entry at all
            self._count(relay)
            self._refuse_direct(relay)
            return
        dst, dst_port = orig
        relay.destination = Endpoint(intern(dst), dst_port)
        if (src, src_port, dst, dst_port) in shared.own:  # one of our own upstream sockets
            self._count(relay)
            stats.inc(self.names.loop_guard_refused)
            self._refuse(relay, "loop_guard", LOOP_HINT)
            return
        if dst_port == self.port and (dst in shared.local or _is_loopback(dst)):
            # conntrack saw it, but nothing rewrote it: it came to our own port
            self._count(relay)
            stats.inc(self.names.loop_guard_refused)
            self._refuse_direct(relay)
            return
        decider = self
        if self.spec.hand_off:
            target = shared.listener_for(dst, dst_port)
            if target is not None:
                decider = target
        if decider is not self:  # its limit counts it from now on (ours did at accept)
            move(self.gate, decider.gate)
        decider._count(relay)
        direction = decider.spec.direction
        if direction == "any":
            direction = "inbound" if dst in shared.local else "outbound"
        decider._route(relay, src, src_port, direction)

    def _route(self, relay: Relay, src: str, src_port: int, direction: str) -> None:
        """The chain, then the upstream (or the end) of a connection this listener decides about."""
        shared, stats = self.shared, self.shared.stats
        relay.direction = direction
        counters = stats.counters
        counters[shared.direction_stats[direction]] += 1
        drain = shared.drain
        if (drain.stopped or drain.sequences) and drain.refuses(direction, self.loop.time()):  # drain.py
            counters[self.names.drain_refused] += 1
            relay.close("drain_refused", reset=True)
            return
        destination = relay.destination
        chain = None
        if destination is not None and self.table.chains:
            chain = self.table.lookup(destination.host, destination.port, src, direction, src_port)
        if chain is None:
            chain = self.spec.default_chain
        if chain is None:  # Envoy: no filter chain, the connection is closed
            stats.inc(self.names.no_filter_chain_match)
            relay.close("no_filter_chain_match")
            return
        relay.chain = chain.name
        relay.idle_timeout = shared.idle_timeouts[chain.name]
        names = shared.chain_stats[chain.name]
        counters[names.cx_total] += 1
        tcp = shared.tcp_stats.get(chain.name)
        if tcp is not None:
            counters[tcp.downstream_cx_total] += 1
        if chain.action == "reject":
            stats.inc(names.rejected)
            relay.close("rejected", reset=True)
        elif chain.action == "close":  # Envoy: a chain without network filters, or no such cluster
            if tcp is not None:
                stats.inc(tcp.downstream_cx_no_route)
            relay.close_unserved("no_route")
        else:
            shared.connector.forward(relay, chain)

    def _reset_early(self, relay: Relay) -> None:
        """The client reset before it could be decided about: counted here, ended."""
        self._count(relay)
        relay.close("downstream_reset", reset=True)

    def _refuse(self, relay: Relay, reason: str, why: str) -> None:
        log.warning("conn=%d %s -> %s refused (%s): %s", relay.id, relay.source or "-",
                    relay.destination or "-", reason, why)
        relay.close(reason, reset=True)

    def _refuse_direct(self, relay: Relay) -> None:
        self._refuse(relay, "not_redirected", f"{relay.source} dialled the redirected port directly; "
                                              "nothing to forward to")

    # upstream (upstream.Connector makes the attempts) -------------------------------
    def connected(self, relay: Relay, up: Upstream) -> None:
        self.shared.connector.connected(relay, up)

    def connect_failed(self, relay: Relay, up: Upstream, timed_out: bool, reason: str) -> None:
        self.shared.connector.failed(relay, up, timed_out, reason)

    # bulk ---------------------------------------------------------------------------
    def flow(self, relay: Relay, paused: bool) -> None:
        tcp = self.shared.tcp_stats.get(relay.chain)
        if tcp is not None:
            self.shared.stats.inc(tcp.downstream_flow_control_paused_reading_total if paused
                                  else tcp.downstream_flow_control_resumed_reading_total)

    def pumped(self, change: int) -> None:
        """A splice pump started (+1) or stopped (-1)."""
        names, stats = self.shared.splice_stats, self.shared.stats
        if change > 0:
            stats.inc(names.pumps_total)
        stats.inc(names.pumps_active, change)

    def pump_unavailable(self, relay: Relay, exc: OSError) -> None:
        self.shared.stats.inc(self.shared.splice_stats.unavailable)
        if exc.errno in EXHAUSTION:
            self.shared.note_exhaustion(self.names, f"out of resources ({errno.errorcode[exc.errno]} "
                                        "making a splice pump): bulk transfers are copied until some close")
        else:
            log.warning("conn=%d cannot splice (%s): copying instead", relay.id, exc)

    # end ------------------------------------------------------------------------------
    def ended(self, relay: Relay) -> None:
        shared, stats = self.shared, self.shared.stats
        shared.live.pop(relay.id, None)
        release(self.gate, shared.gate)
        up = relay.upstream
        if up is not None:
            shared.connector.release(up)
        names, counters = self.names, stats.counters
        counters[names.downstream_cx_active] -= 1
        counters[names.downstream_cx_destroy] += 1
        sent, received = relay.downstream.received, relay.bytes_from_upstream
        counters[names.downstream_cx_rx_bytes_total] += sent
        counters[names.downstream_cx_tx_bytes_total] += received
        if (confirmed := relay.confirmed) is not None:
            shared.connector.closed(relay, confirmed, sent, received)
        # tcp_proxy's figures count what it relayed: Envoy reads nothing from the client
        # before its upstream connects, so the bytes of a client no upstream served are not there
        relayed = sent if confirmed is not None else 0
        tcp = shared.tcp_stats.get(relay.chain)
        if tcp is not None:
            stats.inc(tcp.downstream_cx_rx_bytes_total, relayed)
            stats.inc(tcp.downstream_cx_tx_bytes_total, received)
            if relay.end == "idle_timeout":
                stats.inc(tcp.idle_timeout)
        chain_logs = shared.chain_logs.get(relay.chain, ())
        if shared.access_log.enabled or chain_logs:
            entry = relay.describe()
            entry.update(bytes_up=sent, bytes_down=received, end=relay.end or "done",
                         duration_ms=round((time.monotonic() - relay.started) * 1000, 3))
            shared.access_log.write(entry)
            if chain_logs:  # Envoy's formats: %BYTES_RECEIVED% as tcp_proxy counts it, %UPSTREAM_HOST%
                # the last endpoint tried, connected or not, %FILTER_CHAIN_NAME% the bootstrap's name
                entry.update(chain=shared.chain_log_names.get(relay.chain, relay.chain), bytes_up=relayed,
                             upstream=str(up.endpoint) if up is not None else None,
                             upstream_local=hostport(*confirmed.key[:2]) if confirmed is not None else None)
                for chain_log in chain_logs:
                    chain_log.write(entry)


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host == "::1"


def _idle(chain_timeout: float | None, default: float) -> float:
    """A chain's idle timeout in seconds: its own, or the proxy's; 0 is never (inf)."""
    if chain_timeout is None:
        return default
    return chain_timeout or math.inf


def _rendering(fmt: str | None) -> Callable[[dict[str, Any]], str]:
    """An Envoy format (or Envoy's default) as an access-log formatter: one line per connection."""
    render = compile_format(fmt if fmt is not None else ENVOY_LOG_FORMAT)
    return lambda entry: render(entry).removesuffix("\n")


def _buffered(transport: asyncio.Transport | None) -> int:
    return transport.get_write_buffer_size() if transport is not None and not transport.is_closing() else 0
