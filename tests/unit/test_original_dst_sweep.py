"""ORIGINAL_DST hosts in /clusters: they stay after their connections close until
a sweep every cleanup_interval finds them idle and not picked since the sweep
before, as Envoy's ORIGINAL_DST cluster keeps them (tests/envoy/test_original_dst_hosts.py
checks the same against the real binary)."""

from __future__ import annotations

import proxy.config as cfg
from proxy.datapath.stats import Stats
from proxy.datapath.upstream import Connector, OwnSockets

A, B = cfg.Endpoint("198.51.100.10", 80), cfg.Endpoint("198.51.100.11", 80)


class Timers:
    """The loop's call_later; the test fires what is due by hand."""

    def __init__(self) -> None:
        self.due: list[tuple[float, object, tuple]] = []

    def call_later(self, delay, callback, *args):
        self.due.append((delay, callback, args))

    def fire(self) -> None:
        due, self.due = self.due, []
        for _, callback, args in due:
            callback(*args)


def world(interval: float = 2.0):
    config = cfg.Config(clusters=(cfg.Cluster("pass", (), kind="original_dst", cleanup_interval=interval),))
    stats, timers = Stats(), Timers()
    connector = Connector(config, stats, OwnSockets(), timers, lambda relay, message: None)  # type: ignore[arg-type]
    return connector, stats, timers


def picked(connector: Connector, stats: Stats, endpoint: cfg.Endpoint, active: int = 0) -> None:
    """What a connection to `endpoint` leaves: picked, counted, `active` still open."""
    connector._picked("pass", connector.routes["pass"], endpoint)
    host = stats.host("pass", endpoint)
    host["cx_total"] += 1
    host["cx_active"] += active


def test_an_idle_host_leaves_at_the_second_sweep_after_its_pick():
    connector, stats, timers = world(interval=2.0)
    changes = "cluster.pass.membership_change"
    picked(connector, stats, A)
    picked(connector, stats, A)  # one sweep is due however many picks come before it
    assert [delay for delay, _, _ in timers.due] == [2.0]
    assert stats[changes] == 1  # the host came
    timers.fire()  # picked since the last sweep: stays
    assert stats.hosts["pass"][A]["cx_total"] == 2 and stats[changes] == 1
    timers.fire()  # idle and not picked since: gone, and no sweep is due any more
    assert stats.hosts["pass"] == {} and timers.due == [] and stats[changes] == 2
    picked(connector, stats, A)  # a later pick starts over
    assert stats.hosts["pass"][A]["cx_total"] == 1 and len(timers.due) == 1 and stats[changes] == 3


def test_a_host_with_a_connection_open_stays():
    connector, stats, timers = world()
    picked(connector, stats, A, active=1)
    picked(connector, stats, B)
    for _ in range(3):
        timers.fire()
    assert list(stats.hosts["pass"]) == [A]  # B went at the second sweep
    stats.hosts["pass"][A]["cx_active"] -= 1  # its connection closes
    timers.fire()
    assert stats.hosts["pass"] == {} and timers.due == []
    assert stats["cluster.pass.membership_change"] == 4  # A came, B came, B went, A went


def test_hosts_that_go_in_one_sweep_are_one_membership_change():
    connector, stats, timers = world()
    picked(connector, stats, A)
    picked(connector, stats, B)
    timers.fire()
    timers.fire()
    assert stats.hosts["pass"] == {} and stats["cluster.pass.membership_change"] == 3  # as Envoy counts


def test_the_implicit_original_dst_cluster_sweeps_at_envoys_default():
    connector, _, _ = world()
    assert connector.routes[cfg.ORIGINAL_DST].cleanup == cfg.DEFAULT_CLEANUP_INTERVAL == 5.0
    assert connector.to_app.cleanup == 5.0
