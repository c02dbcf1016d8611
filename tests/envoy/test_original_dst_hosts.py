"""An ORIGINAL_DST cluster's hosts in /clusters, beside real Envoy 1.40.

Envoy keeps each original destination it connected to (or failed to) in
/clusters after the connection closes, with its counters, until a sweep
every cleanup_interval finds it with no connection open and not picked
since the sweep before. The same bootstrap (cleanup_interval 1s) runs as
real Envoy and as sidecar-envoy on each loop, in a fresh pod with the
project's redirect rules: right after a served and a refused connection
both list the same host lines, and both forget them within two intervals;
the cluster's membership stats move alike.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time

import pytest
from envoyproc import LOOPS, subject, write_bootstrap
from support import echo, wait_until
from test_stats_delta import BOOTSTRAP, ECHO, PORT, REDIRECT, REFUSED

from proxy.demo.netns import PodWorld, ThreadedServer

pytestmark = pytest.mark.netns

INTERVAL = 1.0


def host_lines(runner) -> list[str]:
    """The per-host lines of the passthrough cluster (an original destination is in them)."""
    return sorted(line for line in runner.admin("/clusters").splitlines()
                  if line.startswith("PassthroughCluster::198.51.100."))


def membership(runner) -> dict[str, int]:
    """Every cluster's membership stats (hosts listed, changes to them), but the proxy's own
    `original_dst`, which Envoy has not."""
    return {name: value for name, value in runner.stats().items()
            if name.startswith("cluster.") and not name.startswith("cluster.original_dst.")
            and ("membership_" in name or "max_host_weight" in name)}


def all_closed(lines: list[str]) -> list[str]:
    """The lines, if they list hosts and none has a connection open (else [])."""
    active = [line for line in lines if "::cx_active::" in line]
    return lines if active and all(line.endswith("::cx_active::0") for line in active) else []


def run(kind: str, bootstrap_path: str) -> tuple[list[str], float, list[dict[str, int]]]:
    """(host lines once both connections are closed, seconds until they are gone,
    membership stats at the start, once both are closed, once they are gone)."""
    world = PodWorld()
    server = ThreadedServer(world.remote, ECHO, echo)
    try:
        world.pod.exec("sh", str(REDIRECT), "--method", "uid", "--proxy-port", str(PORT))
        runner = subject(kind, world.pod, bootstrap_path)
        try:
            stats = [membership(runner)]
            with world.pod.connect(ECHO) as c:
                c.sendall(b"hello")
                assert c.recv(5) == b"hello"
            with world.pod.connect(REFUSED) as c:
                c.settimeout(5)
                assert c.recv(10) == b""
            closed = time.monotonic()
            lines = wait_until(lambda: all_closed(host_lines(runner)), 2.0, f"{kind}: hosts listed, none open")
            stats.append(membership(runner))
            wait_until(lambda: not host_lines(runner), 4 * INTERVAL, f"{kind}: end to the hosts' listing")
            took = time.monotonic() - closed
            stats.append(membership(runner))
            return lines, took, stats
        finally:
            runner.stop()
    finally:
        server.close()
        world.close()


@pytest.fixture(scope="module")
def bootstrap_path(netns_prerequisites):
    directory = tempfile.mkdtemp(prefix="scp-odhosts-")
    bootstrap = copy.deepcopy(BOOTSTRAP)
    bootstrap["static_resources"]["clusters"][0]["cleanup_interval"] = f"{INTERVAL:g}s"
    # STATIC clusters with endpoints and without, unused: their membership is set once
    bootstrap["static_resources"]["clusters"] += [
        {"name": "web", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
            "cluster_name": "web", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": host, "port_value": 80}}}}
                for host in ("198.51.100.20", "198.51.100.21")]}]}},
        {"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "1s"}]
    try:
        yield write_bootstrap(directory, bootstrap)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def envoy(bootstrap_path):
    return run("envoy", bootstrap_path)


@pytest.mark.parametrize("loop", LOOPS)
def test_original_destinations_stay_listed_until_swept_as_in_envoy(envoy, bootstrap_path, loop):
    envoy_lines, envoy_gone, envoy_stats = envoy
    ours, ours_gone, ours_stats = run(loop, bootstrap_path)
    served = f"PassthroughCluster::{ECHO[0]}:{ECHO[1]}::"
    refused = f"PassthroughCluster::{REFUSED[0]}:{REFUSED[1]}::"
    # what the two connections leave: the served host and the refused one, with their counters
    assert served + "cx_total::1" in envoy_lines and refused + "cx_connect_fail::1" in envoy_lines
    assert ours == envoy_lines, (f"only Envoy's: {sorted(set(envoy_lines) - set(ours))}; "
                                 f"only ours ({loop}): {sorted(set(ours) - set(envoy_lines))}")
    # the cluster's membership as it comes and goes: none, two hosts (two changes), none (one more)
    assert envoy_stats[1]["cluster.PassthroughCluster.membership_total"] == 2
    assert envoy_stats[2]["cluster.PassthroughCluster.membership_change"] == 3
    assert envoy_stats[0]["cluster.web.membership_total"] == 2 and envoy_stats[0]["cluster.web.membership_change"] == 1
    assert ours_stats == envoy_stats
    # swept within two intervals of the close in both (the second sweep after the last pick)
    assert envoy_gone <= 2 * INTERVAL + 0.5 and ours_gone <= 2 * INTERVAL + 0.5, (envoy_gone, ours_gone)
