"""Which endpoint, in which order: a cluster's load-balancing policy, and a
chain's weighted clusters. Pure: no sockets, only the counts they are told.

Each policy answers `order()`: the endpoints to try for one connection, the
chosen one first and then the others (the connection goes on to the next
when one refuses, as far as the chain's max_connect_attempts allows).

- round_robin: each connection starts one further along (Envoy's ROUND_ROBIN
  with equal weights).
- random: a random start (Envoy's RANDOM).
- least_request: of two endpoints drawn at random, the one with fewer open
  connections (Envoy's LEAST_REQUEST with its default choice_count of 2; a
  TCP connection is one request, as in Envoy's TCP pool).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from ..config import Cluster, Endpoint, WeightedCluster


class Policy:
    """The endpoints of one cluster, in the order one connection should try them."""

    def __init__(self, cluster: Cluster, choose: Callable[[int], int] = random.randrange) -> None:
        """`choose(n)`: a random index below n (tests pass their own)."""
        self.endpoints = cluster.endpoints
        self.choose = choose

    def order(self) -> list[Endpoint]:
        raise NotImplementedError

    def _from(self, start: int) -> list[Endpoint]:
        eps = self.endpoints
        return list(eps[start:] + eps[:start])


class RoundRobin(Policy):
    def __init__(self, cluster: Cluster, choose: Callable[[int], int] = random.randrange) -> None:
        super().__init__(cluster, choose)
        self._next = 0

    def order(self) -> list[Endpoint]:
        if not self.endpoints:
            return []
        start = self._next % len(self.endpoints)
        self._next = start + 1
        return self._from(start)


class Random(Policy):
    def order(self) -> list[Endpoint]:
        return self._from(self.choose(len(self.endpoints))) if self.endpoints else []


class LeastRequest(Policy):
    """Power of two choices over the endpoints' open connections (`opened`/`closed` keep the count)."""

    def __init__(self, cluster: Cluster, choose: Callable[[int], int] = random.randrange) -> None:
        super().__init__(cluster, choose)
        self.open = dict.fromkeys(cluster.endpoints, 0)

    def order(self) -> list[Endpoint]:
        n = len(self.endpoints)
        if n < 2:
            return list(self.endpoints)
        a, b = self.choose(n), self.choose(n)
        pick = a if self.open[self.endpoints[a]] <= self.open[self.endpoints[b]] else b
        return self._from(pick)

    def opened(self, endpoint: Endpoint) -> None:
        if endpoint in self.open:
            self.open[endpoint] += 1

    def closed(self, endpoint: Endpoint) -> None:
        if endpoint in self.open:
            self.open[endpoint] -= 1


POLICIES: dict[str, type[Policy]] = {"round_robin": RoundRobin, "random": Random, "least_request": LeastRequest}


def policy_for(cluster: Cluster) -> Policy:
    return POLICIES[cluster.lb_policy](cluster)


def attempts(order: list[Endpoint], limit: int | None) -> list[Endpoint]:
    """The endpoints one connection tries: each once, or exactly `limit` attempts,
    going round the order again if it has fewer endpoints (as Envoy's
    max_connect_attempts may try one host several times)."""
    if limit is None or not order:
        return order
    return [order[i % len(order)] for i in range(limit)]


def pick_weighted(clusters: Sequence[WeightedCluster], choose: Callable[[int], int] = random.randrange) -> str:
    """One cluster, with a chance proportional to its weight (Envoy's weighted_clusters)."""
    point = choose(sum(c.weight for c in clusters))
    for cluster in clusters:
        if point < cluster.weight:
            return cluster.name
        point -= cluster.weight
    raise AssertionError("a point below the total weight falls in some cluster")
