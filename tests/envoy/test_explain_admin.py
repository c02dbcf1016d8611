"""`sidecar-proxy explain --admin` with nothing else, against real Envoy and sidecar-envoy.

The same bootstrap, the same redirect rules (UID method, proxy port 15001),
in a fresh pod each: explain reads the configuration from the running
proxy alone. Real Envoy has no /effective_config, so explain reads the
bootstrap in its /config_dump; sidecar-envoy answers /effective_config with
its own model. Both must give the decision the bootstrap says, for a
connection a chain sends to a cluster and for one the default chain passes
through, and a connection made afterwards must take that chain (the access
log says which, with Envoy's %FILTER_CHAIN_NAME%).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
from envoyproc import ORIGINAL_DST_FILTER, SUBJECTS, subject, tcp_proxy, write_bootstrap
from support import PYTHON

from proxy.demo.netns import PodWorld, ThreadedServer

pytestmark = pytest.mark.netns

REDIRECT = Path(__file__).resolve().parents[2] / "iptables" / "redirect.sh"
PORT = 15001
SERVICE = ("198.51.100.100", 80)  # a chain sends it to the cluster `backend`
BACKEND = ("198.51.100.20", 8080)
ELSEWHERE = ("198.51.100.10", 80)  # the default chain: passthrough to it
LOG_FORMAT = "%DOWNSTREAM_LOCAL_ADDRESS% %FILTER_CHAIN_NAME% %UPSTREAM_HOST%\n"


def bootstrap(log_path: str) -> dict:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}},
        "static_resources": {
            "listeners": [{
                "name": "virtualOutbound",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": PORT}},
                "listener_filters": [ORIGINAL_DST_FILTER],
                "filter_chains": [{"name": "to-backend", "filter_chain_match": {
                    "destination_port": SERVICE[1],
                    "prefix_ranges": [{"address_prefix": SERVICE[0], "prefix_len": 32}]},
                    "filters": tcp_proxy("backend", "backend", log_path, LOG_FORMAT)}],
                "default_filter_chain": {"name": "passthrough", "filters": tcp_proxy(
                    "passthrough", "PassthroughCluster", log_path, LOG_FORMAT)},
            }],
            "clusters": [
                {"name": "backend", "type": "STATIC", "connect_timeout": "2s", "load_assignment": {
                    "cluster_name": "backend", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                        "socket_address": {"address": BACKEND[0], "port_value": BACKEND[1]}}}}]}]}},
                {"name": "PassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                 "connect_timeout": "2s"},
            ],
        },
    }


def drain(conn: socket.socket) -> None:
    while conn.recv(65536):
        pass


@pytest.mark.parametrize("kind", SUBJECTS)
def test_explain_reads_the_running_proxy_alone(kind, netns_prerequisites):
    directory = tempfile.mkdtemp(prefix="scp-explain-admin-")
    os.chmod(directory, 0o777)  # the access log is written as UID 1337
    log_path = os.path.join(directory, "access.log")
    path = write_bootstrap(directory, bootstrap(log_path))
    world = PodWorld()
    servers = [ThreadedServer(world.remote, address, drain) for address in (BACKEND, ELSEWHERE)]
    try:
        world.pod.exec("sh", str(REDIRECT), "--method", "uid", "--proxy-port", str(PORT))
        runner = subject(kind, world.pod, path)
        try:
            # (the model names a default chain after its listener too: explain says "virtualOutbound.passthrough")
            for to, chain, logged, cluster, upstream in (
                    (SERVICE, "to-backend", "to-backend", "backend", BACKEND),
                    (ELSEWHERE, "virtualOutbound.passthrough", "passthrough", "PassthroughCluster", ELSEWHERE)):
                out = world.pod.exec(PYTHON, "-m", "proxy", "explain", "--json", "--admin", "127.0.0.1:15000",
                                     "--to", f"{to[0]}:{to[1]}", check=False)
                assert out.returncode == 0 and "Traceback" not in out.stderr, out.stdout + out.stderr
                told = json.loads(out.stdout)
                read_from = "/config_dump" if kind == "envoy" else "/effective_config"
                assert told["proxy"]["config"] == f"the running proxy's {read_from}, 127.0.0.1:15000"
                verdict = told["verdict"]
                assert (verdict["outcome"], verdict["chain"], verdict["cluster"], verdict["upstream"]) == (
                    "captured", chain, cluster, f"{upstream[0]}:{upstream[1]}"), verdict
                with world.pod.connect(to, timeout=5) as conn:  # and real traffic takes that chain
                    conn.sendall(b"x")
                    conn.shutdown(socket.SHUT_WR)
                    drain(conn)
                expected = f"{to[0]}:{to[1]} {logged} {upstream[0]}:{upstream[1]}"
                deadline = time.monotonic() + 10
                while expected not in Path(log_path).read_text().splitlines() and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert expected in Path(log_path).read_text().splitlines(), Path(log_path).read_text()
        finally:
            runner.stop()
    finally:
        for server in servers:
            server.close()
        world.close()
        shutil.rmtree(directory, ignore_errors=True)
