"""The README's first command: the demo shows interception and leaves nothing behind."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from proxy.demo.demo import SCENARIOS

pytestmark = pytest.mark.netns


def leftovers(text: str) -> list[str]:
    """Namespaces named in the demo's output that still exist, and demo mounts."""
    names = re.findall(r"namespace (scp-\w+-\w+)", text)
    assert names, "the demo did not say which namespaces it built"
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    with open("/proc/mounts") as f:
        mounts = f.read()
    return [n for n in names if n in existing] + [line for line in mounts.splitlines() if "scp-demo-" in line]


@pytest.mark.parametrize("backend", ["auto", "nft-native"])
@pytest.mark.parametrize("method", ["uid", "mark", "cgroup", "explicit"])
def test_demo_shows_each_path_and_cleans_up(netns_prerequisites, method, backend):
    proc = subprocess.run([sys.executable, "-m", "proxy", "demo", "--method", method, "--backend", backend],
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"installed: method {method}" in out
    if backend == "nft-native":  # the rules it prints, and their counters, are nft's
        assert "backend nft-native" in out and "outbound chain (IPv4 and IPv6, one nft table)" in out
        assert re.search(r'rule +\+\d+ nat_output +"outbound capture" -> SIDECAR_OUTPUT', out), out
        assert re.search(r'rule +\+1 SIDECAR_REDIRECT +"outbound to proxy port 5001" -> REDIRECT', out), out
    # the reject chain and the cluster chain are visible, with the endpoints round robin
    assert "chain no-smtp, upstream -, ended: rejected" in out
    assert "hello from reviews-1" in out and "hello from reviews-2" in out
    assert "inbound, chain passthrough, upstream 192.0.2.1:8080, ended: done" in out
    assert "hello from a local sidecar-aware service" in out  # loopback is never captured
    if method == "explicit":  # only listed services are captured
        assert "hello from web; I see you as 192.0.2.1" in out
        assert out.count("outbound, chain passthrough") == 0
    else:
        assert "<- the proxy's own upstream connection" in out
        assert "outbound, chain passthrough, upstream [2001:db8:2::10]:80, ended: done" in out
    if method == "mark":
        assert "effective capabilities 0000000000001000" in out
    else:
        assert "effective capabilities 0000000000000000" in out
    assert explain_agrees(out) == len(SCENARIOS)
    assert leftovers(out) == []


def explain_agrees(out: str) -> int:
    """For every connection of the demo, what explain said beforehand is what
    happened: not captured when the proxy never saw it, else the proxy's
    direction, chain and upstream. The number of connections checked."""
    blocks = out.split("\n  * ")[1:]
    for block in blocks:
        said = re.search(r"^ +explain (.*)$", block, re.M)
        did = re.search(r"^ +proxy  (.*)$", block, re.M)
        assert said and did, block
        if did.group(1) == "(never saw it)":
            assert said.group(1) == "not captured", block
        else:
            assert said.group(1).startswith("captured: "), block
            what = re.fullmatch(r"conn \d+: (.*), ended: \S+", did.group(1))
            assert what and said.group(1) == f"captured: {what.group(1)}", block
    return len(blocks)


def test_demo_cleans_up_when_interrupted(netns_prerequisites):
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # wait until it is in the middle of things
        lines.append(line)
        if line.startswith("[3]"):
            break
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: cleaning up" in err
    assert leftovers("".join(lines) + rest) == []
