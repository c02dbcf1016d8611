"""Counters: cheap to bump on the data path, rendered only when asked for.

Every statistic is an integer in one `collections.Counter`, keyed by its full
dotted name. Names follow Envoy's where the meaning is the same
(`listener.<name>.downstream_cx_total`, `cluster.<name>.upstream_cx_connect_fail`,
...), so tools written against Envoy's /stats find what they expect; ours
carry names Envoy has no equivalent for (`listener.<name>.loop_guard_refused`,
`chain.<name>.rejected`, `direction.<dir>.cx_total`).

Bytes are counted per connection on the hot path (see relay.Side.received)
and added here when the connection ends.
"""

from __future__ import annotations

from collections import Counter


class Stats:
    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    def inc(self, name: str, by: int = 1) -> None:
        self.counters[name] += by

    def dec(self, name: str, by: int = 1) -> None:
        self.counters[name] -= by

    def __getitem__(self, name: str) -> int:
        return self.counters[name]

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self.counters.items()))
