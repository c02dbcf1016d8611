"""What the data path shows of itself, as plain data (the admin API renders it).

A `Snapshot` is everything the admin endpoints render about traffic: the
counters, the bytes of connections still open, the per-host stats of
/clusters and the live connections. One process (`--concurrency 1`) takes
its own (`take`); with several workers the supervisor asks each one over its
control channel (control/supervisor.py) and adds the answers up (`merge`): every
counter and gauge of the proxy is a sum over its workers, and the live
connections are one list, oldest first. Snapshots cross the control channel
as JSON (`to_json`, `from_json`).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .listener import Shared


@dataclass
class Snapshot:
    counters: dict[str, int] = field(default_factory=dict)  # stats written at least once (Envoy's "used")
    declared: set[str] = field(default_factory=set)  # stats listed from start-up, 0 until used
    live_bytes: dict[str, int] = field(default_factory=dict)  # bytes of open connections, by their stat
    hosts: dict[str, dict[tuple[str, int], dict[str, int]]] = field(default_factory=dict)  # cluster -> host -> stats
    connections: list[dict[str, Any]] = field(default_factory=list)  # the first live connections, oldest first
    total_connections: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"counters": self.counters, "declared": sorted(self.declared), "live_bytes": self.live_bytes,
                "hosts": {c: [[h, p, s] for (h, p), s in hosts.items()] for c, hosts in self.hosts.items()},
                "connections": self.connections, "total_connections": self.total_connections}

    def add(self, counters: dict[str, int]) -> Snapshot:
        """Counters kept outside the data path (the process's log lines), listed from the start."""
        self.declared.update(counters)
        for name, value in counters.items():
            if value:
                self.counters[name] = self.counters.get(name, 0) + value
        return self

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        return cls(dict(data["counters"]), set(data["declared"]), dict(data["live_bytes"]),
                   {c: {(h, p): s for h, p, s in hosts} for c, hosts in data["hosts"].items()},
                   list(data["connections"]), data["total_connections"])


def take(shared: Shared, limit: int) -> Snapshot:
    """This process's data plane, with at most `limit` connections."""
    stats = shared.stats
    hosts = {cluster: {(e.host, e.port): dict(counters) for e, counters in by_host.items()}
             for cluster, by_host in stats.hosts.items()}
    now = time.monotonic()
    views = []
    for relay in itertools.islice(shared.live.values(), limit):
        view = relay.describe()
        del view["start"]
        view.update(state="open" if relay.connected else "connecting",
                    bytes_up=relay.bytes_from_downstream, bytes_down=relay.bytes_from_upstream,
                    age_s=round(now - relay.started, 3))
        views.append(view)
    return Snapshot(dict(stats.counters), set(stats.declared), dict(shared.live_counts()), hosts, views,
                    len(shared.live))


def merge(snapshots: Iterable[Snapshot], limit: int) -> Snapshot:
    """Several workers' snapshots as one proxy's."""
    counters: Counter[str] = Counter()
    live: Counter[str] = Counter()
    declared: set[str] = set()
    hosts: dict[str, dict[tuple[str, int], Counter[str]]] = {}
    connections: list[dict[str, Any]] = []
    total = 0
    for snap in snapshots:
        counters.update(snap.counters)
        live.update(snap.live_bytes)
        declared |= snap.declared
        for cluster, by_host in snap.hosts.items():
            merged = hosts.setdefault(cluster, {})
            for host, stats in by_host.items():
                merged.setdefault(host, Counter()).update(stats)
        connections += snap.connections
        total += snap.total_connections
    connections.sort(key=lambda view: -view["age_s"])
    return Snapshot(dict(counters), declared, dict(live),
                    {c: {h: dict(s) for h, s in by_host.items()} for c, by_host in hosts.items()},
                    connections[:limit], total)
