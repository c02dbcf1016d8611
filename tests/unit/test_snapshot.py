"""Snapshots of the data plane: several workers' added up, and across the control channel."""

from __future__ import annotations

import json

from proxy.datapath.snapshot import Snapshot, merge


def worker(n: int, conn_ages: list[float]) -> Snapshot:
    return Snapshot(
        counters={"listener.[__]_5001.downstream_cx_total": 10 * n, "listener.[__]_5001.downstream_cx_active": 0},
        declared={"listener.[__]_5001.downstream_cx_total", f"only.in.worker{n}"},
        live_bytes={"listener.[__]_5001.downstream_cx_rx_bytes_total": n},
        hosts={"web": {("198.51.100.20", 8080): {"cx_total": n, "cx_active": 1}}},
        connections=[{"id": n + 10 * i, "age_s": age} for i, age in enumerate(conn_ages)],
        total_connections=len(conn_ages) + 5,
    )


def test_merge_adds_up_and_lists_the_oldest_connections_first():
    merged = merge([worker(1, [0.5, 3.0]), worker(2, [1.0])], limit=2)
    assert merged.counters == {"listener.[__]_5001.downstream_cx_total": 30, "listener.[__]_5001.downstream_cx_active": 0}
    assert merged.declared == {"listener.[__]_5001.downstream_cx_total", "only.in.worker1", "only.in.worker2"}
    assert merged.live_bytes == {"listener.[__]_5001.downstream_cx_rx_bytes_total": 3}
    assert merged.hosts == {"web": {("198.51.100.20", 8080): {"cx_total": 3, "cx_active": 2}}}
    assert [c["age_s"] for c in merged.connections] == [3.0, 1.0]  # the limit keeps the oldest
    assert merged.total_connections == (2 + 5) + (1 + 5)


def test_a_zero_counter_stays_used_after_merging():
    """A gauge that went up and down again is "used" (shown by ?usedonly) even at 0."""
    assert "listener.[__]_5001.downstream_cx_active" in merge([worker(1, [])], 10).counters


def test_snapshot_survives_the_control_channel():
    snap = worker(3, [0.25])
    assert Snapshot.from_json(json.loads(json.dumps(snap.to_json()))) == snap
