"""The admin API beside real Envoy 1.40's, on the same bootstrap and command line.

Real Envoy, then sidecar-envoy, run in one throwaway network namespace as
UID 1337 with the same command line on the same bootstrap (Istio's sidecar
bootstrap and three more of tests/envoy/bootstraps/valid), and each gets
the same requests: every admin endpoint both serve, with the query parameters tools
use, including ones that must fail. For each request the two must agree on
the status, the Content-Type, and for JSON the structure: every key at
every depth and the JSON type of every value (values themselves masked; a
list is the union of its elements' structures, so order and length do not
count). What is left is listed in DIFFERENCES, each with its reason, and
must stay exactly that: a new difference fails, and so does a listed one
that went away (README "Differences from Envoy" says the same).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from envoyproc import AdminReply, admin_request, envoy_binary, scratch_namespace
from support import ProxyProcess, wait_until

from proxy.admin import configdump
from proxy.demo.netns import NetNs

pytestmark = pytest.mark.netns

VALID = Path(__file__).parent / "bootstraps" / "valid"
# Istio's sidecar bootstrap (runtime layers, ORIGINAL_DST and STATIC clusters, a default chain), and
# ones with both circuit-breaker priorities, every match field, weighted clusters; each gets its admin
# API from --config-yaml (merged over -c alike: test_loads_as_envoy_loads.py)
BOOTSTRAPS = ("istio-sidecar.yaml", "circuit-breakers.yaml", "every-match-field.yaml", "weighted-clusters.yaml")
ADMIN_PORT = 15000
ADMIN_YAML = f"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {ADMIN_PORT}}}}}}}"

# (method, path): every endpoint both serve, in an order where what a request changes
# (levels, counters, health) is the same for both when the next one reads it.
REQUESTS = [
    ("GET", "/ready"), ("GET", "/"), ("GET", "/help"), ("GET", "/server_info"), ("POST", "/server_info"),
    ("GET", "/config_dump"), ("GET", "/config_dump?include_eds"),
    ("GET", "/config_dump?resource=static_clusters"), ("GET", "/config_dump?resource=static_listeners"),
    ("GET", "/config_dump?resource=static_clusters&mask=cluster.name,last_updated"),
    ("GET", "/config_dump?resource=static_listeners&mask=listener.name,listener.address"),
    ("GET", "/config_dump?resource=static_endpoint_configs&include_eds"),
    ("GET", "/config_dump?resource=dynamic_active_clusters"),
    ("GET", "/config_dump?mask=bootstrap.node.id,bootstrap.admin"), ("GET", "/config_dump?mask=static_clusters"),
    ("GET", "/config_dump?name_regex=Pass.*&resource=static_clusters"),
    ("GET", "/config_dump?name_regex=virtual.*"), ("GET", "/config_dump?resource=&mask="),
    ("GET", "/config_dump?mask=nope"), ("GET", "/config_dump?resource=static_clusters&mask=cluster"),
    ("GET", "/config_dump?resource=bootstrap"), ("GET", "/config_dump?resource=nope"),
    ("GET", "/config_dump?resource=static_endpoint_configs"), ("GET", "/config_dump?name_regex=("),
    ("GET", "/certs"), ("GET", "/runtime"), ("GET", "/memory"), ("GET", "/init_dump"),
    ("GET", "/hot_restart_version"),
    ("GET", "/listeners"), ("GET", "/listeners?format=json"),
    ("GET", "/clusters"), ("GET", "/clusters?format=json"),
    ("GET", "/stats"), ("GET", "/stats?format=json"), ("GET", "/stats/prometheus"),
    ("GET", "/stats?usedonly&filter=^(server\\.state|listener_manager\\.workers_started)"),
    ("GET", "/logging"), ("POST", "/logging"), ("POST", "/logging?admin=debug"),
    ("POST", "/logging?paths=main:info,upstream:error"), ("POST", "/logging?level=warning"),
    ("POST", "/logging?paths="), ("POST", "/logging?admin=nope"), ("POST", "/logging?nope=debug"),
    ("POST", "/logging?admin=debug&main=info"),
    ("GET", "/reset_counters"), ("POST", "/reset_counters"),
    ("GET", "/healthcheck/fail"), ("POST", "/healthcheck/fail"), ("GET", "/ready"),
    ("POST", "/healthcheck/ok"), ("GET", "/ready"),
    ("GET", "/no/such/endpoint"),
]

# (request, where in the JSON, what differs) -> why. Each is in README "Differences from Envoy".
NO_HISTOGRAMS = "the proxy keeps no histograms (no latency distributions): its stats are counters and gauges"
DIFFERENCES = {
    (("GET", "/stats?format=json"), "stats[]", "histograms only in Envoy's"): NO_HISTOGRAMS,
}


def shape(value: Any) -> Any:
    """The structure of JSON with the values masked: keys, and the type of each value.
    A list is one merged structure of all its elements."""
    if isinstance(value, dict):
        return {key: shape(inner) for key, inner in value.items()}
    if isinstance(value, list):
        merged: Any = None
        for item in value:
            merged = merge(merged, shape(item))
        return [merged] if merged is not None else []
    return {type(value).__name__}


def merge(a: Any, b: Any) -> Any:
    """One structure for two (None: nothing yet); a value of two different kinds is "mixed"."""
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, dict) and isinstance(b, dict):
        return {key: merge(a.get(key), b.get(key)) for key in {**a, **b}}
    if isinstance(a, list) and isinstance(b, list):
        return [merge(a[0] if a else None, b[0] if b else None)] if (a or b) else []
    if isinstance(a, set) and isinstance(b, set):
        return a | b
    return {"mixed"}


def differences(theirs: Any, ours: Any, where: str = "") -> list[tuple[str, str]]:
    """Where two structures differ: (path, what)."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        out = []
        for key in {**theirs, **ours}:
            at = f"{where}.{key}" if where else key
            if key not in ours:
                out.append((where or "(top)", f"{key} only in Envoy's"))
            elif key not in theirs:
                out.append((where or "(top)", f"{key} only in ours"))
            else:
                out += differences(theirs[key], ours[key], at)
        return out
    if isinstance(theirs, list) and isinstance(ours, list):
        if not theirs or not ours:
            return [] if theirs == ours else [(where, "empty in " + ("ours" if theirs else "Envoy's"))]
        return differences(theirs[0], ours[0], where + "[]")
    return [] if theirs == ours else [(where, f"{sorted(theirs) if isinstance(theirs, set) else theirs} in Envoy's, "
                                              f"{sorted(ours) if isinstance(ours, set) else ours} in ours")]


def compare(request: tuple[str, str], theirs: AdminReply, ours: AdminReply) -> list[tuple[tuple[str, str], str, str]]:
    """Every difference between two answers to one request."""
    found = []
    if theirs.status != ours.status:
        found.append((request, "status", f"{theirs.status} from Envoy, {ours.status} from ours"))
    if theirs.content_type != ours.content_type:
        found.append((request, "content-type", f"{theirs.content_type!r} from Envoy, {ours.content_type!r} from ours"))
    if theirs.content_type == ours.content_type == "application/json":
        found += [(request, where, what)
                  for where, what in differences(shape(json.loads(theirs.body)), shape(json.loads(ours.body)))]
    return found


@pytest.fixture
def scratch(netns_prerequisites):
    """A namespace with loopback only (no traffic leaves it), and a directory UID 1337 can write."""
    with scratch_namespace("scp-adm") as made:
        yield made


def answers(ns: NetNs, binary: str, bootstrap: Path, loop: str | None = None) -> list[AdminReply]:
    """Start `binary` with the shared command line (sidecar-envoy on event loop
    `loop`), ask every request in turn, stop it."""
    argv = (binary, "-c", str(bootstrap), "--config-yaml", ADMIN_YAML, "--disable-hot-restart", "-l", "warning",
            "--concurrency", "2", "--drain-time-s", "45", "--component-log-level", "upstream:debug")
    proc = ProxyProcess(ns, command=argv, wait=False, env=None if loop is None else {"SIDECAR_PROXY_LOOP": loop})
    try:
        wait_until(lambda: _live(ns), timeout=30, what=f"{binary} to be LIVE")
        return [admin_request(ns, ADMIN_PORT, method, path) for method, path in REQUESTS]
    finally:
        code = proc.stop(signal.SIGTERM)
        assert code == 0, (binary, code, proc.raw[-5:])


def _live(ns: NetNs) -> bool:
    try:
        return admin_request(ns, ADMIN_PORT, "GET", "/ready", timeout=2).body == "LIVE\n"
    except OSError:
        return False


# every bootstrap on uvloop; Istio's on asyncio too (the admin API runs on the proxy's loop)
CASES = [*((name, "uvloop") for name in BOOTSTRAPS), (BOOTSTRAPS[0], "asyncio")]


@pytest.mark.parametrize(("name", "loop"), CASES)
def test_every_admin_endpoint_as_envoy_answers_it(scratch, name, loop):
    ns, _ = scratch
    envoy = answers(ns, envoy_binary(), VALID / name)
    ours = answers(ns, str(Path(sys.executable).parent / "sidecar-envoy"), VALID / name, loop)
    found = {}
    for request, theirs, mine in zip(REQUESTS, envoy, ours, strict=True):
        for where in compare(request, theirs, mine):
            found[where] = mine.body[:300]
    unexpected = {key: body for key, body in found.items() if key not in DIFFERENCES}
    assert not unexpected, "differences from Envoy not in DIFFERENCES (nor in README):\n" + "\n".join(
        f"  {method} {path}: {where}: {what}\n    ours began: {body!r}"
        for ((method, path), where, what), body in unexpected.items())
    gone = set(DIFFERENCES) - set(found)
    assert not gone, f"listed differences that are gone (update DIFFERENCES and README): {sorted(gone)}"
    # what the comparison rests on: both answered, and the answers carry what tools read
    def answer(replies: list[AdminReply], request: tuple[str, str], nth: int = 0) -> AdminReply:
        return [r for q, r in zip(REQUESTS, replies, strict=True) if q == request][nth]

    for replies in (envoy, ours):  # the readiness contract, byte for byte
        assert [answer(replies, ("GET", "/ready"), i) for i in range(3)] == [
            AdminReply(200, "text/plain; charset=UTF-8", "LIVE\n"),
            AdminReply(503, "text/plain; charset=UTF-8", "DRAINING\n"),
            AdminReply(200, "text/plain; charset=UTF-8", "LIVE\n")]
    for request, reply in zip(REQUESTS, ours, strict=True):  # what istioctl's decoder does with a dump
        if request[1].startswith("/config_dump") and reply.status == 200:
            decoded = configdump.decode(reply.body)  # raises on what admin.v3.ConfigDump cannot read
            assert len(decoded.configs) == len(json.loads(reply.body).get("configs", [])), request
    dumped = [json.loads(answer(r, ("GET", "/config_dump")).body) for r in (envoy, ours)]
    assert [c["@type"] for c in dumped[0]["configs"]] == [c["@type"] for c in dumped[1]["configs"]]
    bootstraps = [d["configs"][0]["bootstrap"] for d in dumped]
    for bootstrap in bootstraps:
        for key in ("user_agent_name", "user_agent_build_version", "extensions"):
            bootstrap["node"].pop(key)
    assert bootstraps[0] == bootstraps[1], "the same bootstrap, but for who runs it"
    # values that do not depend on who runs it or when: equal, not only alike
    for request in (("GET", "/certs"), ("GET", "/init_dump"), ("GET", "/hot_restart_version"), ("GET", "/runtime"),
                    ("GET", "/config_dump?resource=static_endpoint_configs&include_eds"),
                    ("GET", "/config_dump?resource=static_clusters&mask=cluster.name,last_updated")):
        theirs, mine = (answer(r, request).body for r in (envoy, ours))
        if theirs.startswith("{"):
            theirs, mine = (json.dumps(_no_times(json.loads(b)), sort_keys=True) for b in (theirs, mine))
        assert theirs == mine, request
    cluster_lines = [sorted(line for line in answer(r, ("GET", "/clusters")).body.splitlines()
                            if line.split("::")[1] in ("observability_name", "default_priority", "high_priority",
                                                       "added_via_api")) for r in (envoy, ours)]
    assert cluster_lines[0] == cluster_lines[1] and cluster_lines[0], "circuit breakers and names in /clusters"
    levels = [answer(r, ("POST", "/logging?paths=main:info,upstream:error")).body.splitlines() for r in (envoy, ours)]
    assert levels[1][:len(levels[0]) - 1] == levels[0][:-1], "Envoy's loggers, their order and levels"


def _no_times(data: Any) -> Any:
    """JSON without its last_updated times (when each process started)."""
    if isinstance(data, dict):
        return {k: _no_times(v) for k, v in data.items() if k != "last_updated"}
    if isinstance(data, list):
        return [_no_times(v) for v in data]
    return data
