"""datapath/drain.py: Envoy's drain decision, asked once per new connection."""

from __future__ import annotations

import random

from proxy.datapath.drain import DIRECTIONS, Drain, Sequence, drain_close


def never(n: int) -> int:
    """The random source at its highest: a connection is refused only when certain."""
    return n - 1


def always(n: int) -> int:
    return 0


def test_immediate_refuses_from_the_start():
    assert drain_close("immediate", Sequence(100.0, 600.0), 100.0, never)


def test_gradual_counts_whole_seconds_as_envoy_does():
    """Envoy truncates the time left to whole seconds, so the elapsed time is
    rounded up: 0 at the very start, 1 from then to one second in, and so on."""
    seq = Sequence(100.0, 600.0)
    assert not drain_close("gradual", seq, 100.0, always)
    assert drain_close("gradual", seq, 100.5, always)  # 1 > 0
    assert not drain_close("gradual", seq, 100.5, lambda n: 1)  # 1 > 1 is false
    assert drain_close("gradual", seq, 101.5, lambda n: 1)  # 2 > 1


def test_gradual_refuses_past_the_deadline_and_with_no_drain_time():
    assert drain_close("gradual", Sequence(100.0, 10.0), 110.0, never)
    assert drain_close("gradual", Sequence(100.0, 0.5), 100.2, never)  # 0 whole seconds: at once, as Envoy


def test_gradual_probability_is_elapsed_over_drain_time():
    """P(refuse) after k whole seconds of a d-second drain is k/d, Envoy's formula."""
    rng = random.Random(12)
    seq = Sequence(0.0, 10.0)
    for elapsed in (1, 3, 5, 9):
        refused = sum(drain_close("gradual", seq, elapsed, rng.randrange) for _ in range(20000))
        assert abs(refused / 20000 - elapsed / 10) < 0.02, elapsed


def test_a_drain_refuses_only_its_own_direction():
    drain = Drain("immediate", never)
    assert not drain.refuses("inbound", 0.0) and not drain.refuses("outbound", 0.0)
    drain.start(DIRECTIONS["inbound"], 5.0, 0.0)
    assert drain.refuses("inbound", 0.0)
    assert not drain.refuses("outbound", 4.9)


def test_stopped_directions_refuse_whatever_the_strategy():
    drain = Drain("gradual", always)
    drain.stop(DIRECTIONS["inbound"])
    assert drain.refuses("inbound", 0.0) and not drain.refuses("outbound", 0.0)
    drain.stop(DIRECTIONS["all"])
    assert drain.refuses("outbound", 0.0)


def test_a_second_drain_of_a_direction_keeps_the_first_timeline():
    """Envoy: a graceful drain of a direction already draining changes nothing."""
    drain = Drain("gradual", never)
    drain.start(("inbound",), 10.0, 0.0)
    drain.start(("inbound", "outbound"), 600.0, 9.0)
    assert drain.sequences["inbound"] == Sequence(0.0, 10.0)
    assert drain.sequences["outbound"] == Sequence(9.0, 600.0)
    assert drain.refuses("inbound", 10.0) and not drain.refuses("outbound", 10.0)
