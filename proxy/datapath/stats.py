"""Counters: cheap to bump on the data path, rendered only when asked for.

Every statistic is an integer in one `collections.Counter`, keyed by its full
dotted name. Names follow Envoy's where the meaning is the same
(`listener.[__]_5001.downstream_cx_total`, `cluster.<name>.upstream_cx_connect_fail`,
...), so tools written against Envoy's /stats find what they expect; ours
carry names Envoy has no equivalent for (`listener.<address>.loop_guard_refused`,
`chain.<name>.rejected`, `direction.<dir>.cx_total`).

A name is in `counters` once it has been bumped: that is Envoy's "used" (what
`/stats?usedonly` shows). Names declared at start-up (`declare`) are listed
with 0 until then, as Envoy lists the stats of every configured listener and
cluster. Whether a stat is a gauge is a property of its name (`is_gauge`).

Per-host counters (`hosts`) are what Envoy shows per endpoint in /clusters,
not in /stats.

Bytes are counted per connection on the hot path (see relay.Side.received)
and added here when the connection ends; /stats adds the live connections'
bytes when it renders (see listener.Shared.live_counts).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from ..config import Endpoint, hostport

# Envoy's per-host stats, in the order /clusters prints them (sorted by name).
HOST_STATS = ("cx_active", "cx_connect_fail", "cx_total", "rq_active", "rq_error",
              "rq_success", "rq_timeout", "rq_total")
HOST_GAUGES = frozenset({"cx_active", "rq_active"})


def stat_address(host: str, port: int) -> str:
    """An address as Envoy puts it in a stat name (`listener.[__]_5001.`): no ':' there."""
    return hostport(host, port).replace(":", "_")


def is_gauge(name: str) -> bool:
    """Envoy's gauges among our names: everything counting what is open or held now."""
    return name.endswith(("_active", "_buffered"))


class Names:
    """The full names of a group of stats under one prefix, made once rather
    than per connection: `Names("cluster.web.", CLUSTER_STATS).upstream_cx_total`
    is "cluster.web.upstream_cx_total"."""

    def __init__(self, prefix: str, stats: Iterable[str]) -> None:
        stats = tuple(stats)
        self.all = tuple(prefix + stat for stat in stats)
        for stat, name in zip(stats, self.all, strict=True):
            setattr(self, stat, name)

    def __getattr__(self, stat: str) -> str:
        """Only for a name the group does not have (the others are attributes)."""
        raise AttributeError(f"no stat {stat!r} in this group")


class Stats:
    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.declared: set[str] = set()
        self.hosts: dict[str, dict[Endpoint, Counter[str]]] = {}

    # the data path ---------------------------------------------------------------
    def inc(self, name: str, by: int = 1) -> None:
        self.counters[name] += by

    def dec(self, name: str, by: int = 1) -> None:
        self.counters[name] -= by

    def host(self, cluster: str, host: Endpoint) -> Counter[str]:
        """The per-host counters of one endpoint (created on first use)."""
        hosts = self.hosts.get(cluster)
        if hosts is None:
            hosts = self.hosts[cluster] = {}
        counters = hosts.get(host)
        if counters is None:
            counters = hosts[host] = Counter()
        return counters

    def sweep_hosts(self, cluster: str, keep: set[Endpoint]) -> int:
        """Forget the hosts of `cluster` with no connection open, but those in `keep`;
        how many went."""
        hosts = self.hosts.get(cluster, {})
        gone = [h for h, counters in hosts.items() if not counters["cx_active"] and h not in keep]
        for host in gone:
            del hosts[host]
        return len(gone)

    # set-up and rendering ----------------------------------------------------------
    def declare(self, *names: str) -> None:
        """Stats that exist from start-up: listed with 0 until first used."""
        self.declared.update(names)

    def __getitem__(self, name: str) -> int:
        return self.counters[name]

    def used(self, name: str) -> bool:
        return name in self.counters

    def snapshot(self) -> dict[str, int]:
        """Every known stat (declared or used) and its value, sorted by name."""
        values = dict.fromkeys(self.declared, 0)
        values.update(self.counters)
        return dict(sorted(values.items()))
