"""Accepting connections and deciding where each one goes.

The data path, in the order it runs for every accepted connection:

    accept                      (the event loop; Relay.downstream is the protocol)
    -> original destination     (sockopts.original_dst)
    -> loop guard               (our own listener, or one of our own upstream sockets?)
    -> direction                (original destination is a pod address: inbound)
    -> chain selection          (chains.ChainTable.select, Envoy's precedence)
    -> upstream connect         (upstream.connect: endpoint order, mark, timeout)
    -> relay                    (relay.Relay: bytes both ways until both sides end)

A plain listener (loopback, for proxy-aware apps) skips the first four steps:
it has no original destination and always goes to its one cluster.

Every per-connection failure is contained here: it ends that connection,
is logged once with the connection id, counted, and written to the access
log. Nothing a client does reaches the accept loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

from . import upstream
from .accesslog import AccessLog
from .chains import ChainTable, Connection
from .config import Chain, Config, Endpoint, PlainListener
from .localaddrs import LocalAddresses
from .relay import Relay
from .sockopts import original_dst, plain_ip
from .stats import Stats

log = logging.getLogger("proxy.listener")

# The chain a connection gets when no configured chain matches it. Istio calls
# the same thing PassthroughCluster; Envoy, the default filter chain.
PASSTHROUGH = Chain(name="passthrough", action="original")
BLACKHOLE = Chain(name="blackhole", action="reject")

LOOP_HINT = ("the proxy's own upstream connection was redirected back to it: "
             "the rules do not exempt the proxy (check that it runs as the UID, "
             "mark or cgroup the redirect rules bypass)")


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

    def __post_init__(self) -> None:
        self.balancers = {c.name: upstream.RoundRobin(c) for c in self.config.clusters}
        self.table = ChainTable(self.config.chains)
        self.default_chain = PASSTHROUGH if self.config.default_action == "original" else BLACKHOLE


class Listener:
    """One logical listener: the redirected port, or a plain listener."""

    def __init__(self, shared: Shared, loop: asyncio.AbstractEventLoop, plain: PlainListener | None = None):
        self.shared = shared
        self.loop = loop
        self.plain = plain
        self.name = plain.name if plain else "redirect"
        self.port = plain.port if plain else shared.config.port
        self._stat = f"listener.{self.name}."

    def protocol(self):
        """Protocol factory for loop.create_server: one Relay per connection."""
        relay = Relay(next(self.shared.ids), self.loop, self.shared.config.idle_timeout,
                      self._accepted, self._ended)
        return relay.downstream

    # accept -> decision ---------------------------------------------------------
    def _accepted(self, relay: Relay) -> None:
        shared, stats = self.shared, self.shared.stats
        shared.live[relay.id] = relay
        stats.inc(self._stat + "downstream_cx_total")
        stats.inc(self._stat + "downstream_cx_active")
        transport = relay.downstream.transport
        peer = transport.get_extra_info("peername")
        relay.info = info = {
            "id": relay.id, "start": time.time(), "listener": self.name,
            "source": _fmt(plain_ip(peer[0]), peer[1]), "destination": "-",
            "direction": "-", "chain": "-", "upstream": None,
        }
        if self.plain is not None:
            info["direction"], info["chain"] = "outbound", f"plain:{self.name}"
            self._forward(relay, shared.config.cluster(self.plain.cluster).name)
            return
        try:
            orig = original_dst(transport.get_extra_info("socket"))
        except OSError as exc:
            self._refuse(relay, "error", f"cannot read the original destination: {exc}")
            return
        if orig is None:
            self._refuse(relay, "not_redirected",
                         f"{info['source']} dialled the redirected port directly; nothing to forward to")
            return
        dst, dst_port = plain_ip(orig[0]), orig[1]
        info["destination"] = _fmt(dst, dst_port)
        src = plain_ip(peer[0])
        if (src, peer[1]) in shared.own or (dst_port == self.port and (dst in shared.local or dst.is_loopback)):
            stats.inc(self._stat + "loop_guard_refused")
            self._refuse(relay, "loop_guard", LOOP_HINT)
            return
        direction = "inbound" if dst in shared.local else "outbound"
        info["direction"] = direction
        stats.inc(f"direction.{direction}.cx_total")
        chain = shared.table.select(Connection(dst, dst_port, src, direction)) or shared.default_chain
        info["chain"] = chain.name
        stats.inc(f"chain.{chain.name}.cx_total")
        if chain.action == "reject":
            stats.inc(f"chain.{chain.name}.rejected")
            relay.close("rejected", reset=True)
        elif chain.action == "cluster":
            self._forward(relay, chain.cluster)
        else:
            self._forward(relay, None, Endpoint(str(dst), dst_port))

    def _refuse(self, relay: Relay, reason: str, why: str) -> None:
        log.warning("conn=%d %s -> %s refused (%s): %s", relay.id, relay.info["source"],
                    relay.info["destination"], reason, why)
        relay.close(reason, reset=True)

    def _forward(self, relay: Relay, cluster_name: str | None, original: Endpoint | None = None) -> None:
        config = self.shared.config
        if cluster_name is None:
            endpoints, timeout, mark = [original], config.connect_timeout, config.mark
            stat = "cluster.original_dst."
        else:
            cluster = config.cluster(cluster_name)
            endpoints = self.shared.balancers[cluster_name].order()
            timeout = cluster.connect_timeout
            mark = cluster.mark if cluster.mark is not None else config.mark
            stat = f"cluster.{cluster_name}."
        relay.info["cluster"] = stat.split(".")[1]
        relay.task = self.loop.create_task(self._connect(relay, endpoints, timeout, mark, stat),
                                           name=f"connect-{relay.id}")

    # upstream -> relay --------------------------------------------------------------
    async def _connect(self, relay: Relay, endpoints, timeout: float, mark: int | None, stat: str) -> None:
        stats = self.shared.stats
        stats.inc(stat + "upstream_cx_total")
        try:
            sock, endpoint, key = await upstream.connect(self.loop, endpoints, timeout, mark, self.shared.own)
        except upstream.ConnectFailed as exc:
            stats.inc(stat + ("upstream_cx_connect_timeout" if exc.timeout else "upstream_cx_connect_fail"))
            if exc.exhausted:
                self._exhausted(exc)
            else:
                log.info("conn=%d upstream connect failed: %s", relay.id, exc)
            relay.close("connect_timeout" if exc.timeout else "connect_failed", reset=True)
            return
        except PermissionError as exc:  # SO_MARK lost its privilege after start-up?
            log.error("conn=%d cannot open upstream socket: %s", relay.id, exc)
            relay.close("error", reset=True)
            return
        relay.upstream_key = key
        relay.info["upstream"] = str(endpoint)
        if relay.ended:  # the client went away while we were connecting
            self.shared.own.discard(key)
            sock.close()
            return
        stats.inc(stat + "upstream_cx_active")
        relay.info["upstream_stat"] = stat
        side = relay.attach_upstream()
        try:
            await self.loop.create_connection(lambda: side, sock=sock)
        except OSError as exc:
            log.info("conn=%d upstream socket failed: %s", relay.id, exc)
            relay.close("connect_failed", reset=True)
            return
        relay.task = None
        relay.start()

    def _exhausted(self, exc: Exception) -> None:
        """Out of descriptors or memory: count every time, log once a second."""
        self.shared.stats.inc(self._stat + "resource_exhaustion")
        now = time.monotonic()
        if now - self.shared.exhaustion_logged >= 1.0:
            self.shared.exhaustion_logged = now
            log.warning("out of resources (%s): refusing connections until some close", exc)

    # end ------------------------------------------------------------------------------
    def _ended(self, relay: Relay) -> None:
        shared, stats, info = self.shared, self.shared.stats, relay.info
        shared.live.pop(relay.id, None)
        shared.own.discard(relay.upstream_key)
        if relay.task is not None and not relay.task.done():
            relay.task.cancel()
        stats.dec(self._stat + "downstream_cx_active")
        stats.inc(self._stat + "downstream_cx_destroy")
        up, down = relay.bytes_from_downstream, relay.bytes_from_upstream
        stats.inc(self._stat + "downstream_cx_rx_bytes_total", up)
        stats.inc(self._stat + "downstream_cx_tx_bytes_total", down)
        if "upstream_stat" in info:
            stat = info.pop("upstream_stat")
            stats.dec(stat + "upstream_cx_active")
            stats.inc(stat + "upstream_cx_tx_bytes_total", up)
            stats.inc(stat + "upstream_cx_rx_bytes_total", down)
        info.update(bytes_up=up, bytes_down=down, end=relay.end or "done",
                    duration_ms=round((time.monotonic() - relay.started) * 1000, 3))
        shared.access_log.write(info)


def _fmt(addr, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"

