"""When a dead worker is started again, and when the supervisor gives up (control/watchdog.py)."""

from __future__ import annotations

from proxy.control.watchdog import Restarts


def test_each_restart_waits_twice_as_long_and_a_crash_loop_gives_up():
    restarts = Restarts(first=0.25, longest=8.0, limit=5, window=60.0)
    waits = [restarts.after_death(t) for t in (0, 1, 2, 3, 4)]
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert restarts.after_death(5) is None  # the sixth death within a minute


def test_the_wait_is_bounded_and_old_deaths_are_forgotten():
    restarts = Restarts(first=1.0, longest=3.0, limit=10, window=60.0)
    assert [restarts.after_death(t) for t in range(4)] == [1.0, 2.0, 3.0, 3.0]
    assert restarts.after_death(200.0) == 1.0  # a minute later: a fresh start
    assert len(restarts.deaths) == 1
