"""A bootstrap loaded as real Envoy loads it: --config-yaml merged over -c,
and the bound admin address written to --admin-address-path.

Real Envoy 1.40 and sidecar-envoy each run in a throwaway network
namespace as UID 1337, with the same command line: an Istio-shaped
bootstrap, --config-yaml over it (its admin on a port the kernel picks, a
new node id, one more cluster), and --admin-address-path. Envoy's merged
bootstrap is read from its /config_dump; ours is what sidecar-envoy built
(Config.bootstrap, what our /config_dump is made from). They must be the
same, but for what Envoy adds to the node about itself (user agent, build,
extensions). Both write the admin address in the same form, and it answers;
both write their log to --log-path and nothing to stderr.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest
from envoyproc import envoy_binary, scratch_namespace
from support import ProxyProcess, recv_all, wait_until

from proxy import envoy_cli
from proxy.demo.netns import NetNs

pytestmark = pytest.mark.netns

ENVOY, SIDECAR_ENVOY = Path(envoy_binary()), Path(sys.executable).parent / "sidecar-envoy"
BOOTSTRAP = Path(__file__).parent / "bootstraps" / "valid" / "istio-sidecar.yaml"
CONFIG_YAML = """\
admin: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}
node: {id: merged-node, metadata: {EXTRA: "yes"}}
static_resources:
  clusters: [{name: extra, type: STATIC, connect_timeout: 2s}]
"""
ENVOYS_OWN_NODE_KEYS = ("user_agent_name", "user_agent_build_version", "extensions")


@pytest.fixture
def scratch(netns_prerequisites):
    """A namespace with loopback, and a directory UID 1337 can write."""
    with scratch_namespace("scp-env") as made:
        yield made


def argv(binary: Path, address_path: str) -> tuple[str, ...]:
    return (str(binary), "-c", str(BOOTSTRAP), "--config-yaml", CONFIG_YAML, "--admin-address-path", address_path,
            "--concurrency", "1", "-l", "warning", "--disable-hot-restart", "--log-path", f"{address_path}.log")


def run_and_read(ns: NetNs, binary: Path, directory: str, name: str) -> tuple[str, dict]:
    """Start `binary`, wait for its admin address file, read /config_dump there, stop it."""
    path = os.path.join(directory, name)
    proc = ProxyProcess(ns, command=argv(binary, path), wait=False)
    try:
        written = wait_until(lambda: os.path.exists(path) and Path(path).read_text(), timeout=30,
                             what=f"{name} to be written")
        host, _, port = written.rpartition(":")
        dump = get_json(ns, (host, int(port)), "/config_dump")
    finally:
        code = proc.stop(signal.SIGTERM)
    assert code == 0
    assert proc.raw == [] and Path(f"{path}.log").read_text(), "the log goes to --log-path, and only there"
    return written, dump


def get_json(ns: NetNs, addr: tuple[str, int], path: str) -> dict:
    """GET over HTTP/1.1 (Envoy's admin answers HTTP/1.0 with 426) from inside `ns`."""
    with ns.connect(addr, timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {addr[0]}\r\nConnection: close\r\n\r\n".encode())
        raw = recv_all(s)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split()[1] == b"200", head
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    return json.loads(body)


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, body = out + body[:n], body[n + 2:]
    return out


def test_config_yaml_and_admin_address_path_as_envoy(scratch):
    ns, directory = scratch
    theirs, envoy_dump = run_and_read(ns, ENVOY, directory, "envoy-admin")
    ours, _ = run_and_read(ns, SIDECAR_ENVOY, directory, "sidecar-admin")
    for written in (theirs, ours):
        assert re.fullmatch(r"127\.0\.0\.1:\d+", written), written  # no newline, as Envoy writes it
    assert not ours.endswith(":15000") and not ours.endswith(":0")  # the kernel's port, as configured
    bootstrap = next(c["bootstrap"] for c in envoy_dump["configs"] if c["@type"].endswith("BootstrapConfigDump"))
    for key in ENVOYS_OWN_NODE_KEYS:
        bootstrap["node"].pop(key, None)
    config = envoy_cli.configure(envoy_cli.parse(["-c", str(BOOTSTRAP), "--config-yaml", CONFIG_YAML]))
    assert config.bootstrap == bootstrap
    assert config.bootstrap["node"]["id"] == "merged-node"  # a scalar replaced
    assert config.bootstrap["node"]["cluster"] == "app.default"  # a message merged
    assert config.bootstrap["node"]["metadata"]["EXTRA"] == "yes"
    assert [c["name"] for c in config.bootstrap["static_resources"]["clusters"]][-1] == "extra"  # a list appended
