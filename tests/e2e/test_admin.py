"""The admin API against a running proxy: real namespaces, real traffic, real HTTP.

The admin API listens on 127.0.0.1:15000 inside the pod namespace, so every
request here is plain HTTP/1.1 over a socket opened in that namespace
(`admin()` below): the bytes on the wire are exactly what pilot-agent, a
kubelet probe or curl would send and receive.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ADMIN, PYTHON, ProxyProcess, Server, admin, echo, recv_all, setpriv_argv, stats_of, wait_until

from proxy.control.lifecycle import LISTENER_DELAY_ENV

pytestmark = pytest.mark.netns

LISTENER = "listener.[__]_5001."
# What Istio's pilot-agent asks (pkg/istio-agent/.../util/stats.go), unencoded as it sends it.
READY_QUERY = r"/stats?usedonly&filter=^(server\.state|listener_manager\.workers_started)"
UPDATE_QUERY = r"/stats?usedonly&filter=^(cluster_manager\.cds|listener_manager\.lds)\.(update_success|update_rejected)$"
MUTATING = ("/healthcheck/fail", "/healthcheck/ok", "/drain_listeners", "/quitquitquit", "/logging")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def pilot_agent_reads(body: str, name: str) -> int | None:
    """Parse a stat the way pilot-agent does: a line starting with the name, split on ':' in two."""
    for line in body.splitlines(keepends=True):
        if line.startswith(name):
            parts = line.split(":")
            assert len(parts) == 2, f"pilot-agent rejects {line!r}"
            return int(parts[1].strip())
    return None


def refused(ns, addr) -> bool:
    try:
        ns.connect(addr, timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# --- readiness: Istio's contract, byte for byte -------------------------------------

def test_readiness_contract_before_and_after_listeners(uid_world):
    """The admin API is up first and says PRE_INITIALIZING until every listener serves."""
    w = uid_world
    srv = Server(w.remote, ("198.51.100.10", 80), echo)
    proxy = ProxyProcess(w.pod, env={LISTENER_DELAY_ENV: "3s"}, wait=False)
    try:
        proxy.wait_for(lambda e: e.get("msg", "").startswith("admin API on"), what="the admin API")
        before = admin(w.pod, "GET", READY_QUERY)
        assert (before.status, before.body) == (200, "listener_manager.workers_started: 0\nserver.state: 2\n")
        assert pilot_agent_reads(before.body, "server.state") == 2
        assert admin(w.pod, "GET", "/ready").brief() == (503, "PRE_INITIALIZING\n")
        assert admin(w.pod, "GET", UPDATE_QUERY).body == "cluster_manager.cds.update_success: 1\n"
        assert refused(w.pod, ("198.51.100.10", 80)), "redirected traffic was accepted before the listeners"

        proxy.wait_for(lambda e: e.get("msg", "").startswith("ready"), what="ready")
        after = admin(w.pod, "GET", READY_QUERY)
        assert (after.status, after.body) == (200, "listener_manager.workers_started: 1\nserver.state: 0\n")
        assert after.headers["content-type"].startswith("text/plain")
        assert pilot_agent_reads(after.body, "server.state") == 0
        assert pilot_agent_reads(after.body, "listener_manager.workers_started") == 1
        # the same filter URL-encoded, as a careful client sends it
        encoded = "/stats?usedonly&filter=%5E%28server%5C.state%7Clistener_manager%5C.workers_started%29"
        assert admin(w.pod, "GET", encoded).body == after.body
        updates = admin(w.pod, "GET", UPDATE_QUERY).body
        assert updates == "cluster_manager.cds.update_success: 1\nlistener_manager.lds.update_success: 1\n"
        assert admin(w.pod, "GET", "/ready").brief() == (200, "LIVE\n")
        with w.pod.connect(("198.51.100.10", 80)) as c:
            c.sendall(b"up")
            assert c.recv(2) == b"up"
    finally:
        assert proxy.stop() == 0
        srv.close()


def test_healthcheck_and_drain_listeners_turn_ready_off(uid_world):
    w = uid_world
    srv = Server(w.remote, ("198.51.100.10", 80), echo)
    proxy = ProxyProcess(w.pod, args=("--drain-timeout", "10s"))
    try:
        assert admin(w.pod, "POST", "/healthcheck/fail").brief() == (200, "OK\n")
        assert admin(w.pod, "GET", "/ready").brief() == (503, "DRAINING\n")
        assert admin(w.pod, "GET", READY_QUERY).body == "listener_manager.workers_started: 1\nserver.state: 1\n"
        with w.pod.connect(("198.51.100.10", 80)) as c:  # a failed health check still serves traffic
            c.sendall(b"a")
            assert c.recv(1) == b"a"
        assert admin(w.pod, "POST", "/healthcheck/ok").status == 200
        assert admin(w.pod, "GET", "/ready").brief() == (200, "LIVE\n")

        live = w.pod.connect(("198.51.100.10", 80))
        live.sendall(b"b")
        assert live.recv(1) == b"b"
        assert admin(w.pod, "POST", "/drain_listeners").brief() == (200, "OK\n")
        assert admin(w.pod, "GET", "/ready").brief() == (200, "LIVE\n")  # as Envoy 1.40: the state stays LIVE
        assert refused(w.pod, ("198.51.100.10", 80))
        live.sendall(b"c")  # what was open goes on ...
        assert live.recv(1) == b"c"
        live.close()
        proxy.access(end="done", bytes_up=2)
        time.sleep(0.3)
        assert proxy.alive()  # ... and so does the process, until told to stop
        assert admin(w.pod, "POST", "/healthcheck/fail").status == 200  # readiness is the health check's
        assert admin(w.pod, "GET", "/ready").status == 503
        assert refused(w.pod, ("198.51.100.10", 80))  # the listeners stay stopped
    finally:
        assert proxy.stop() == 0
        srv.close()


def test_quitquitquit_drains_then_exits_0(uid_world):
    w = uid_world
    srv = Server(w.remote, ("198.51.100.10", 80), echo)
    proxy = ProxyProcess(w.pod, args=("--drain-timeout", "10s"))
    try:
        c = w.pod.connect(("198.51.100.10", 80))
        c.sendall(b"before")
        assert c.recv(6) == b"before"
        assert admin(w.pod, "POST", "/quitquitquit").brief() == (200, "OK\n")
        proxy.wait_for(lambda e: e.get("msg", "").startswith("stopping"), what="stopping")
        assert admin(w.pod, "GET", "/ready").brief() == (503, "DRAINING\n")  # the admin API outlives the listeners
        assert refused(w.pod, ("198.51.100.10", 80))
        c.sendall(b"during")
        assert c.recv(6) == b"during"
        assert proxy.alive()
        c.close()
        assert proxy.proc.wait(5) == 0
        assert proxy.access(end="done")["bytes_up"] == 12
        assert refused(w.pod, ADMIN)
    finally:
        proxy.stop()
        srv.close()


# --- stats against real traffic -------------------------------------------------------

TRAFFIC = {
    "clusters": [{"name": "web", "endpoints": ["198.51.100.20:8080", "198.51.100.21:8080"]}],
    "chains": [
        {"name": "to-web", "match": {"ports": [8080]}, "cluster": "web"},
        {"name": "no-smtp", "match": {"ports": [25]}, "action": "reject"},
    ],
}


def send_traffic(w) -> None:
    """3 passthrough connections (10+20+30 bytes), 2 to cluster web (one after a
    refusal by its second endpoint, where nothing listens), 1 rejected."""
    for n in (10, 20, 30):
        with w.pod.connect(("198.51.100.10", 80)) as c:
            c.sendall(b"p" * n)
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == b"p" * n
    for _ in range(2):
        with w.pod.connect(("203.0.113.7", 8080)) as c:
            c.sendall(b"w" * 5)
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == b"w" * 5
    # the RST may even beat connect()'s return
    with pytest.raises(ConnectionResetError), w.pod.connect(("198.51.100.12", 25)) as c:
        c.recv(1)


def test_stats_count_real_traffic_in_every_format(uid_world, loop_name):
    w = uid_world
    servers = [Server(w.remote, ("198.51.100.10", 80), echo), Server(w.remote, ("198.51.100.20", 8080), echo)]
    proxy = ProxyProcess(w.pod, config=TRAFFIC, loop=loop_name)
    try:
        send_traffic(w)
        wait_until(lambda: len(proxy.access_entries()) == 6, what="6 access entries")
        s = stats_of(w.pod)
        expected = {
            LISTENER + "downstream_cx_total": 6, LISTENER + "downstream_cx_active": 0,
            LISTENER + "downstream_cx_destroy": 6, LISTENER + "loop_guard_refused": 0,
            LISTENER + "downstream_cx_rx_bytes_total": 70, LISTENER + "downstream_cx_tx_bytes_total": 70,
            "cluster.original_dst.upstream_cx_total": 3, "cluster.original_dst.upstream_cx_destroy": 3,
            "cluster.original_dst.upstream_cx_tx_bytes_total": 60, "cluster.original_dst.upstream_cx_rx_bytes_total": 60,
            # per attempt, as Envoy counts: round robin sends the 2nd connection to .21 first, refused
            "cluster.web.upstream_cx_total": 3, "cluster.web.upstream_cx_connect_fail": 1,
            "cluster.web.upstream_cx_connect_timeout": 0, "cluster.web.upstream_cx_active": 0,
            "cluster.web.upstream_cx_tx_bytes_total": 10, "cluster.web.upstream_cx_rx_bytes_total": 10,
            "chain.passthrough.cx_total": 3, "chain.to-web.cx_total": 2,
            "chain.no-smtp.cx_total": 1, "chain.no-smtp.rejected": 1,
            "direction.outbound.cx_total": 6, "direction.inbound.cx_total": 0,
            "server.state": 0, "server.live": 1, "listener_manager.workers_started": 1,
            "cluster_manager.active_clusters": 2, "server.total_connections": 0,
        }
        assert {k: s.get(k) for k in expected} == expected

        text = admin(w.pod, "GET", "/stats").body
        names = [line.split(": ")[0] for line in text.splitlines()]
        assert names == sorted(names) and all(": " in line for line in text.splitlines())

        as_json = admin(w.pod, "GET", "/stats?format=json")
        assert as_json.headers["content-type"].startswith("application/json")
        assert {e["name"]: e["value"] for e in as_json.json()["stats"]} == s

        filtered = admin(w.pod, "GET", "/stats?filter=^cluster%5C.web%5C.upstream_cx_(total|connect_fail)$").body
        assert filtered == "cluster.web.upstream_cx_connect_fail: 1\ncluster.web.upstream_cx_total: 3\n"
        partial = admin(w.pod, "GET", "/stats?filter=rejected").body  # RE2 search, not a full match
        assert partial == "chain.no-smtp.rejected: 1\n"
        used = admin(w.pod, "GET", "/stats?usedonly&filter=%5Ecluster%5C.web%5C.").body
        assert "cluster.web.upstream_cx_connect_timeout" not in used  # never happened, so not "used"
        assert "cluster.web.upstream_cx_connect_fail: 1\n" in used
        assert "cluster.web.upstream_cx_active: 0\n" in used  # went up and down again: used
        assert admin(w.pod, "GET", "/stats?usedonly&format=json&filter=timeout").json() == {"stats": []}

        prom = admin(w.pod, "GET", "/stats/prometheus")
        assert prom.status == 200 and prom.headers["content-type"] == "text/plain; charset=UTF-8"  # Envoy's
        samples = {(x.name, tuple(sorted(x.labels.items()))): (f.type, x.value)
                   for f in text_string_to_metric_families(prom.body) for x in f.samples}
        assert samples[("envoy_cluster_upstream_cx_total", (("envoy_cluster_name", "web"),))] == ("counter", 3)
        assert samples[("envoy_cluster_upstream_cx_total", (("envoy_cluster_name", "original_dst"),))] == ("counter", 3)
        assert samples[("envoy_listener_downstream_cx_total", (("envoy_listener_address", "[__]_5001"),))] == ("counter", 6)
        assert samples[("envoy_listener_downstream_cx_active", (("envoy_listener_address", "[__]_5001"),))] == ("gauge", 0)
        # (the parser names every counter's sample *_total; on the wire it is envoy_chain_rejected)
        assert "\nenvoy_chain_rejected{chain_name=\"no-smtp\"} 1\n" in prom.body
        assert samples[("envoy_chain_rejected_total", (("chain_name", "no-smtp"),))] == ("counter", 1)
        assert samples[("envoy_direction_cx_total", (("direction", "outbound"),))] == ("counter", 6)
        assert samples[("envoy_server_state", ())] == ("gauge", 0)
        assert len(samples) == len(s), "every stat is one sample"
        assert admin(w.pod, "GET", "/stats?format=prometheus").body == prom.body
        only = admin(w.pod, "GET", "/stats/prometheus?usedonly&filter=server%5C.state").body
        assert only == "# TYPE envoy_server_state gauge\nenvoy_server_state{} 0\n\n"

        clusters = admin(w.pod, "GET", "/clusters").body.splitlines()
        for line in ("web::added_via_api::false", "web::198.51.100.20:8080::cx_total::2",
                     "web::198.51.100.20:8080::rq_total::2", "web::198.51.100.20:8080::cx_active::0",
                     "web::198.51.100.21:8080::cx_total::1", "web::198.51.100.21:8080::cx_connect_fail::1",
                     "web::198.51.100.21:8080::health_flags::healthy", "original_dst::added_via_api::false"):
            assert line in clusters
        # a closed original destination stays listed until a sweep 5-10 s on forgets it, as in Envoy
        # (tests/envoy/test_original_dst_hosts.py checks when); while listed, it is named as Envoy names it
        listed = [line for line in clusters if line.startswith("original_dst::198.51.100.10:80::")]
        assert not listed or "original_dst::198.51.100.10:80::hostname::original_dst198.51.100.10:80" in listed
        as_json = admin(w.pod, "GET", "/clusters?format=json").json()
        web = next(c for c in as_json["cluster_statuses"] if c["name"] == "web")
        host = next(h for h in web["host_statuses"] if h["address"]["socket_address"]["address"] == "198.51.100.21")
        assert {m["name"]: m.get("value", "0") for m in host["stats"]}["cx_connect_fail"] == "1"  # a zero: no value
    finally:
        proxy.stop()
        for srv in servers:
            srv.close()


def test_live_connections_and_their_bytes(uid_world):
    """/stats adds the bytes of open connections; /connections lists them until they end."""
    w = uid_world
    srv = Server(w.remote, ("198.51.100.10", 80), echo)
    proxy = ProxyProcess(w.pod)
    try:
        c = w.pod.connect(("198.51.100.10", 80))
        c.sendall(b"x" * 1000)
        got = b""
        while len(got) < 1000:
            got += c.recv(4096)
        s = stats_of(w.pod)
        assert s[LISTENER + "downstream_cx_active"] == 1 and s["server.total_connections"] == 1
        assert s[LISTENER + "downstream_cx_rx_bytes_total"] == 1000
        assert s["cluster.original_dst.upstream_cx_rx_bytes_total"] == 1000
        listing = admin(w.pod, "GET", "/connections").json()
        assert listing["total"] == 1
        (conn,) = listing["connections"]
        assert conn["destination"] == "198.51.100.10:80" and conn["source"].startswith(w.POD_V4 + ":")
        assert conn["direction"] == "outbound" and conn["chain"] == "passthrough" and conn["state"] == "open"
        assert (conn["bytes_up"], conn["bytes_down"], conn["upstream"]) == (1000, 1000, "198.51.100.10:80")
        assert conn["age_s"] >= 0
        assert "original_dst::198.51.100.10:80::cx_active::1" in admin(w.pod, "GET", "/clusters").body
        c.close()
        proxy.access(end="done")
        assert admin(w.pod, "GET", "/connections").json() == {"total": 0, "connections": []}
        s = stats_of(w.pod)
        assert s[LISTENER + "downstream_cx_rx_bytes_total"] == 1000  # counted once, not twice
        assert s[LISTENER + "downstream_cx_active"] == 0
    finally:
        proxy.stop()
        srv.close()


# --- the other endpoints ----------------------------------------------------------------

def test_listeners_server_info_config_dump(uid_world):
    w = uid_world
    cfg = {"addresses": ["0.0.0.0", "::"], "drain_timeout": "7s",
           "clusters": [{"name": "be", "endpoints": ["198.51.100.20:8080"]}],
           "plain_listeners": [{"name": "local-be", "port": 15080, "cluster": "be"}]}
    proxy = ProxyProcess(w.pod, config=cfg)
    try:
        listeners = admin(w.pod, "GET", "/listeners")
        assert listeners.body == "redirect::0.0.0.0:5001\nredirect::[::]:5001\nlocal-be::127.0.0.1:15080\n"
        assert admin(w.pod, "GET", "/listeners?format=json").json() == {"listener_statuses": [
            {"name": "redirect", "local_address": {"socket_address": {"address": "0.0.0.0", "port_value": 5001}},
             "additional_local_addresses": [{"socket_address": {"address": "::", "port_value": 5001}}]},
            {"name": "local-be", "local_address": {"socket_address": {"address": "127.0.0.1", "port_value": 15080}}},
        ]}
        s = stats_of(w.pod)  # stats named by each listener's first address, as Envoy names them
        assert "listener.0.0.0.0_5001.downstream_cx_total" in s and "listener.127.0.0.1_15080.downstream_cx_total" in s

        info = admin(w.pod, "GET", "/server_info").json()
        assert info["state"] == "LIVE" and info["version"].startswith("sidecar-proxy-")
        assert info["version"].split("/")[1] == "1.40.0", "the Envoy it follows, where Envoy puts its version"
        assert (info["command_line_options"]["concurrency"], info["command_line_options"]["log_level"]) == (1, "info")
        assert info["uptime_current_epoch"].endswith("s") and info["node"]["user_agent_name"] == "sidecar-proxy"

        dump = admin(w.pod, "GET", "/config_dump")  # our YAML, dumped as the bootstrap that says the same
        assert dump.headers["content-type"] == "application/json"
        bootstrap = dump.json()["configs"][0]["bootstrap"]
        (redirect, local) = bootstrap["static_resources"]["listeners"]
        assert redirect["address"] == {"socket_address": {"address": "0.0.0.0", "port_value": 5001}}
        assert redirect["additional_addresses"] == [{"address": {"socket_address": {"address": "::", "port_value": 5001}}}]
        assert local["name"] == "local-be"
        assert [c["name"] for c in bootstrap["static_resources"]["clusters"]] == ["be", "original_dst"]
        assert bootstrap["admin"] == {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}}
        eds = admin(w.pod, "GET", "/config_dump?resource=static_endpoint_configs&include_eds&name_regex=be").json()
        (be,) = eds["configs"]
        assert be["endpoint_config"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
            "socket_address": {"address": "198.51.100.20", "port_value": 8080}}

        missing = admin(w.pod, "GET", "/nope")
        assert missing.status == 404 and missing.body.startswith("invalid path. admin commands are:")
        assert "  /quitquitquit (POST): exit the server\n" in admin(w.pod, "GET", "/help").body
    finally:
        proxy.stop()


def test_mutating_endpoints_refuse_get(uid_world):
    """Envoy's rule: a GET on an endpoint that changes something is a 405 and changes nothing."""
    w = uid_world
    proxy = ProxyProcess(w.pod)
    try:
        for path in MUTATING:
            reply = admin(w.pod, "GET", path)
            assert (reply.status, reply.body) == (405, "Method GET not allowed, POST required."), path
        assert admin(w.pod, "PUT", "/quitquitquit").brief() == (405, "Method PUT not allowed, POST required.")
        assert admin(w.pod, "GET", "/ready").brief() == (200, "LIVE\n")
        assert proxy.alive()
    finally:
        assert proxy.stop() == 0


BAD_REQUESTS = [
    ("GET", "/stats?filter=(unclosed", "Invalid re2 regex '(unclosed': missing ): (unclosed"),
    ("GET", "/stats?filter=a(?=b)", "Invalid re2 regex"),  # lookahead: not RE2, as in Envoy
    ("GET", "/stats?format=xml", "unknown format 'xml' (allowed: text, json, prometheus)"),
    ("GET", "/stats/prometheus?filter=[", "Invalid re2 regex"),
    ("GET", "/listeners?format=yaml", "unknown format 'yaml' (allowed: text, json)"),
    ("GET", "/clusters?format=csv", "unknown format 'csv'"),
    ("GET", "/connections?limit=many", "limit 'many' is not a number"),
    ("POST", "/logging?level=verbose", "error: unknown logger level\n\nusage: /logging?<name>=<level>"),
    ("POST", "/logging?nosuchlogger=debug", "error: unknown logger name\n"),
    ("GET", "/config_dump?resource=static_clusters&mask=cluster", "FieldMask "),
    ("GET", "/config_dump?name_regex=(", "INVALID_ARGUMENT: Error while parsing name_regex from (: missing )"),
]


def test_bad_parameters_are_a_400_with_a_reason(uid_world):
    w = uid_world
    proxy = ProxyProcess(w.pod)
    try:
        for method, path, reason in BAD_REQUESTS:
            reply = admin(w.pod, method, path)
            assert reply.status == 400 and reply.body.startswith(reason), (path, reply)
        assert admin(w.pod, "GET", "/ready").brief() == (200, "LIVE\n"), "a bad request changed something"
        assert proxy.alive()
    finally:
        assert proxy.stop() == 0


def test_logging_changes_the_level(uid_world):
    w = uid_world
    proxy = ProxyProcess(w.pod)
    try:
        reply = admin(w.pod, "POST", "/logging")  # no parameter: list the loggers, Envoy's then ours
        assert reply.status == 200 and reply.body.startswith("active loggers:\n  a2a: info\n  admin: info\n")
        assert "  proxy.server: info\n" in reply.body
        reply = admin(w.pod, "POST", "/logging?level=warning")
        assert "  proxy.admin: warning\n" in reply.body and "  proxy.server: warning\n" in reply.body
        admin(w.pod, "POST", "/healthcheck/fail")  # logs at info: now below the level
        admin(w.pod, "POST", "/logging?paths=admin:info,upstream:error")  # Envoy's `admin` is proxy.admin
        admin(w.pod, "POST", "/healthcheck/ok")  # proxy.admin alone logs at info again
        proxy.wait_for(lambda e: e.get("msg", "").startswith("admin: health check ok"), what="the ok line")
        assert not any("health check failed" in e.get("msg", "") for e in proxy.lines)
    finally:
        assert proxy.stop() == 0


# --- where the admin API listens ----------------------------------------------------------

def run_once(w, *args: str):
    return w.pod.exec(*setpriv_argv(), PYTHON, "-m", "proxy", "run", *args, check=False)


def test_admin_address_must_be_loopback_unless_allowed(world):
    """No redirect rules here, so the remote namespace can reach the pod's 15000 directly."""
    w = world
    proc = run_once(w, "--admin-address", w.POD_V4)
    assert proc.returncode == 1
    assert f"admin: {w.POD_V4} is not a loopback address" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr

    proxy = ProxyProcess(w.pod, args=("--admin-address", w.POD_V4, "--admin-allow-remote"))
    try:
        assert any(e["level"] == "warning" and "beyond loopback" in e["msg"] for e in proxy.lines)
        assert admin(w.remote, "GET", "/ready", addr=(w.POD_V4, 15000)).brief() == (200, "LIVE\n")
    finally:
        assert proxy.stop() == 0


def test_admin_port_flag_zero_and_in_use(world):
    w = world
    proxy = ProxyProcess(w.pod, args=("--admin-port", "15999"))
    try:
        assert admin(w.pod, "GET", "/ready", addr=("127.0.0.1", 15999)).status == 200
        assert refused(w.pod, ADMIN)
    finally:
        proxy.stop()
    proxy = ProxyProcess(w.pod, config={"admin_port": 0})
    try:
        assert refused(w.pod, ADMIN)
        assert not any("admin" in e.get("msg", "") for e in proxy.lines)
    finally:
        assert proxy.stop() == 0
    blocker = w.pod.listen(ADMIN)
    try:
        proc = run_once(w)
        assert proc.returncode == 1
        assert "admin: cannot bind 127.0.0.1 port 15000: Address already in use" in proc.stderr
    finally:
        blocker.close()


# --- the live page in a real browser ----------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_in(ns, directory: Path) -> str:
    """A wrapper that runs Debian's Chromium inside the pod namespace, where the
    admin API is (Playwright starts the browser through it and talks to it over
    the pipes it inherits)."""
    wrapper = directory / "chromium-in-pod"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {ns.name} {CHROMIUM} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper)


def test_admin_page_shows_connections_live_in_chromium(uid_world, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert os.path.exists(CHROMIUM), "Debian's chromium package is needed (apt-get install chromium)"
    w = uid_world
    servers = [Server(w.remote, ("198.51.100.10", 80), echo), Server(w.remote, ("198.51.100.20", 8080), echo)]
    proxy = ProxyProcess(w.pod, config=TRAFFIC)
    held = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=chromium_in(w.pod, tmp_path), headless=True,
                args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 800})
            try:
                page = browser.new_page()
                errors = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto("http://127.0.0.1:15000/")
                expect(page.locator("#state")).to_have_text("LIVE")
                expect(page.locator("#listeners")).to_contain_text("[::]:5001")
                expect(page.locator("#connections")).to_contain_text("no live connections")
                send_traffic(w)
                expect(page.locator("#chains tr", has_text="no-smtp")).to_contain_text("reject")

                rows = page.locator("#connections tr[data-id]")
                for addr in (("198.51.100.10", 80), ("203.0.113.7", 8080)):  # new connections ...
                    c = w.pod.connect(addr)
                    held.append(c)
                    c.sendall(b"hello")
                    assert c.recv(5) == b"hello"
                expect(rows).to_have_count(2)  # ... appear within a poll or two
                expect(rows.nth(0)).to_contain_text("198.51.100.10:80")
                expect(rows.nth(0)).to_contain_text("passthrough")
                expect(rows.nth(1)).to_contain_text("203.0.113.7:8080")
                expect(rows.nth(1)).to_contain_text("198.51.100.20:8080")  # the upstream its chain chose
                expect(page.locator("#chains tr", has_text="to-web")).to_contain_text("3")
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "admin-page.png"), full_page=True)

                held.pop(0).close()
                expect(rows).to_have_count(1)  # ... and disappear when they end
                expect(rows.nth(0)).to_contain_text("203.0.113.7:8080")
                assert not errors, errors
            finally:
                browser.close()
    finally:
        for c in held:
            c.close()
        assert proxy.stop() == 0
        for srv in servers:
            srv.close()


# --- web pages cannot drive the admin API (cross-site requests, DNS rebinding, slowloris) --------

EVIL_PAGE = """<!doctype html><html><body>
<form id="quit" method="POST" action="http://127.0.0.1:15000/quitquitquit" target="a"></form>
<form id="fail" method="POST" action="http://127.0.0.1:15000/healthcheck/fail" target="b"></form>
<iframe name="a"></iframe><iframe name="b"></iframe>
<script>document.getElementById("quit").submit(); document.getElementById("fail").submit();</script>
</body></html>"""


def serve_page(html: str):
    """A handler that answers any request with `html` (a page on another origin)."""
    def handler(conn: socket.socket) -> None:
        conn.recv(65536)
        body = html.encode()
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    return handler


def test_a_page_on_another_origin_cannot_stop_the_proxy_or_fail_its_health(uid_world, tmp_path):
    """A form POST from http://127.0.0.1:8081 (another origin, even the same site) in a real
    Chromium gets 403 and changes nothing; so does a request naming a foreign Host."""
    from playwright.sync_api import sync_playwright

    w = uid_world
    proxy = ProxyProcess(w.pod)
    page_server = Server(w.pod, ("127.0.0.1", 8081), serve_page(EVIL_PAGE))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=chromium_in(w.pod, tmp_path), headless=True,
                args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                answers = []
                page.on("response", lambda r: answers.append((r.url, r.status)) if ":15000/" in r.url else None)
                page.goto("http://127.0.0.1:8081/")
                deadline = time.monotonic() + 10
                while len(answers) < 2 and time.monotonic() < deadline:
                    page.wait_for_timeout(100)
            finally:
                browser.close()
        assert sorted(answers) == [("http://127.0.0.1:15000/healthcheck/fail", 403),
                                   ("http://127.0.0.1:15000/quitquitquit", 403)], answers
        assert proxy.alive(), "a page stopped the proxy"
        assert admin(w.pod, "GET", "/ready").brief() == (200, "LIVE\n"), "a page failed the health check"

        # DNS rebinding: the page's own name in Host, even for a read
        for method, path in (("GET", "/config_dump"), ("POST", "/quitquitquit")):
            with w.pod.connect(ADMIN, timeout=10) as s:
                s.sendall(f"{method} {path} HTTP/1.1\r\nHost: rebind.example:15000\r\nConnection: close\r\n"
                          f"Content-Length: 0\r\n\r\n".encode())
                reply = recv_all(s).decode()
            assert reply.startswith(("HTTP/1.0 403", "HTTP/1.1 403")), reply[:200]
            assert "Host 'rebind.example:15000' is not this admin API" in reply
        assert proxy.alive()
        # the log writer thread and our reader run behind the reply: wait for the line
        proxy.wait_for(lambda line: "refused" in line.get("msg", "") and "rebind.example" in line.get("msg", ""),
                       timeout=10, what="the refusal in the log")
    finally:
        page_server.close()
        assert proxy.stop() == 0


def test_a_client_that_trickles_its_request_is_closed(uid_world):
    """Slowloris: connections that never finish their request headers do not stay open."""
    w = uid_world
    proxy = ProxyProcess(w.pod)
    trickling = []
    try:
        for _ in range(50):
            s = w.pod.connect(ADMIN, timeout=30)
            s.sendall(b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
            trickling.append(s)
        for s in trickling:
            s.settimeout(30)  # the server's limit is 10s: three times that is "stayed open"
            s.sendall(b"X-Slow: 1\r\n")  # still trickling
        closed_by_server = 0
        for s in trickling:
            try:
                while s.recv(4096):
                    pass
                closed_by_server += 1  # EOF
            except TimeoutError:
                pass  # still open after 30s
            except ConnectionResetError:
                closed_by_server += 1
        assert closed_by_server == 50
        assert admin(w.pod, "GET", "/ready").brief() == (200, "LIVE\n")
    finally:
        for s in trickling:
            s.close()
        proxy.stop()
