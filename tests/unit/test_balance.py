"""Load balancing and weighted clusters: the order each connection tries endpoints in."""

from __future__ import annotations

import itertools
from collections import Counter

from proxy.config import Cluster, Endpoint, WeightedCluster
from proxy.datapath.balance import LeastRequest, Random, RoundRobin, attempts, pick_weighted, policy_for

EPS = tuple(Endpoint("198.51.100.1", p) for p in (1, 2, 3))
CLUSTER = Cluster("c", EPS)


def ports(order):
    return [e.port for e in order]


def test_round_robin_starts_one_further_each_time_and_keeps_the_rest_in_order():
    rr = RoundRobin(CLUSTER)
    assert [ports(rr.order()) for _ in range(4)] == [[1, 2, 3], [2, 3, 1], [3, 1, 2], [1, 2, 3]]


def test_random_starts_where_it_is_told():
    draws = iter([2, 0])
    policy = Random(CLUSTER, choose=lambda n: next(draws))
    assert ports(policy.order()) == [3, 1, 2]
    assert ports(policy.order()) == [1, 2, 3]


def test_least_request_takes_the_less_loaded_of_two_draws():
    draws = itertools.cycle([0, 1])
    policy = LeastRequest(CLUSTER, choose=lambda n: next(draws))
    assert ports(policy.order())[0] == 1  # a tie: the first draw
    policy.opened(EPS[0])
    assert ports(policy.order())[0] == 2  # endpoint 1 has one open, endpoint 2 none
    policy.closed(EPS[0])
    assert ports(policy.order())[0] == 1


def test_no_endpoints_is_an_empty_order_for_every_policy():
    for name in ("round_robin", "random", "least_request"):
        assert policy_for(Cluster("hole", (), lb_policy=name)).order() == []


def test_max_connect_attempts_cuts_or_goes_round_again():
    order = list(EPS)
    assert attempts(order, None) == order
    assert ports(attempts(order, 2)) == [1, 2]
    assert ports(attempts(order[:1], 3)) == [1, 1, 1]  # Envoy retries the one host


def test_weighted_clusters_by_their_weights():
    clusters = (WeightedCluster("a", 1), WeightedCluster("b", 3))
    assert [pick_weighted(clusters, choose=lambda n, p=p: p) for p in range(4)] == ["a", "b", "b", "b"]
    seen = Counter(pick_weighted(clusters) for _ in range(4000))
    assert 0.6 < seen["b"] / 4000 < 0.9  # about 3/4, with any random source
