"""`sidecar-proxy explain` against what real traffic does.

For every method x backend x family of test_methods.py, the same pod, rules
(with the same exclusions), servers and proxy. For each path a connection
can take (the probes of test_methods.py: outbound to a remote service, to a
service address, to loopback, to an excluded port and CIDR, to the own pod
IP; inbound to the app and to an excluded port), explain is asked first,
inside the pod, as root, reading the installed rules and the running proxy's
admin API. Then the connection is made, and:

- captured or not: the proxy's access log has a new entry exactly when
  explain said "captured", with the direction, chain, cluster and upstream
  explain named;
- the rules: the packet counters (read from the listings here, not with
  explain's parsers) moved for every rule explain said the connection hits,
  and for no rule but those and the ones the proxy's own upstream connection
  hits (explain's loop-guard walk).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from support import PYTHON, ProxyProcess
from test_methods import (
    APP_PORT,
    CONFIG,
    EXCLUSIONS,
    IPTABLES,
    LOCAL_PORT,
    MARK,
    SSH_PORT,
    V4,
    V6,
    fmt,
    greeting,
    method,
    method_prerequisites,  # noqa: F401 (a fixture: pytest finds it here)
    native,
    script,
    send_digest,
    servers,
)

from proxy.demo.netns import PodWorld, run

pytestmark = pytest.mark.netns

METHODS = ["uid", "mark", "cgroup-net_cls", "cgroup-v2", "explicit"]
ADMIN = "127.0.0.1:15000"  # the proxy's default admin address, inside the pod


def explain(world: PodWorld, nsenter: bool, config: Path, *args: str) -> dict:
    """`sidecar-proxy explain --json` in the pod, as root: the proxy's config file, its counters."""
    cmd = (PYTHON, "-m", "proxy", "explain", "--json", "--config", str(config), "--admin", ADMIN, *args)
    out = run(world.pod.nsenter_argv(*cmd), check=False) if nsenter else world.pod.exec(*cmd, check=False)
    assert out.returncode == 0, f"explain {' '.join(args)}: exit {out.returncode}\n{out.stdout}{out.stderr}"
    return json.loads(out.stdout)


def _key(hit: dict) -> tuple[str, int]:
    return hit["chain"], hit["index"]


NAT_CHAINS = ("nat_output", "nat_prerouting", "SIDECAR_OUTPUT", "SIDECAR_INBOUND", "SIDECAR_REDIRECT",
              "SIDECAR_IN_REDIRECT")


def counters(world: PodWorld, backend: str, family: str) -> dict[tuple[str, int], int]:
    """Packet counters of the nat rules, by (chain, position in the chain),
    read from the listings (not with explain's parsers): `iptables-save -c`,
    or `nft list table` for nft-native (where the raw table's chain is left
    out: it counts every packet, not a connection's first)."""
    found: dict[tuple[str, int], int] = {}
    if backend == "nft-native":
        chain = ""
        for line in world.pod.exec("nft", "list", "table", "inet", "sidecar_proxy").stdout.splitlines():
            words = line.split()
            if words[:1] == ["chain"]:
                chain, position = words[1], 0
            elif "counter packets" in line and chain in NAT_CHAINS:
                position += 1
                found[(chain, position)] = int(words[words.index("packets") + 1])
        return found
    tool = "iptables-save" if family == "ipv4" else "ip6tables-save"
    for line in world.pod.exec(tool, "-c", "-t", "nat").stdout.splitlines():
        if line.startswith("[") and " -A " in line:
            packets, chain = line[1:].split(":")[0], line.split()[2]
            position = 1 + sum(1 for (c, _) in found if c == chain)
            found[(chain, position)] = int(packets)
    return found


def probes(f) -> list[tuple[str, str, tuple[str, int], tuple[str, ...]]]:
    """(name, who connects, to where, explain's extra arguments)."""
    return [
        ("web", "app", f.web, ()),
        ("service address", "app", f.vip, ()),
        ("loopback", "app", (f.loopback, LOCAL_PORT), ()),
        ("excluded port", "app", f.smtp, ()),
        ("excluded CIDR", "app", f.outside, ()),
        ("own pod IP", "app", (f.pod, APP_PORT), ()),
        ("own pod IP, excluded port", "app", (f.pod, SSH_PORT), ()),
        ("inbound", "remote", (f.pod, APP_PORT), ("--inbound", "--from", f.remote)),
        ("inbound, excluded port", "remote", (f.pod, SSH_PORT), ("--inbound", "--from", f.remote)),
    ]


def connect(world: PodWorld, who: str, name: str, addr: tuple[str, int]) -> None:
    ns = world.pod if who == "app" else world.remote
    if name == "web":
        send_digest(ns, addr, 1000)
    else:
        greeting(ns, addr)


@pytest.mark.parametrize("f", [V4, V6], ids=lambda f: f.name)
@pytest.mark.parametrize("backend", ["iptables", "nft-native"])
@pytest.mark.parametrize("method_name", METHODS)
@pytest.mark.usefixtures("method_prerequisites")
def test_explain_agrees_with_real_traffic(world, tmp_path, method_name, backend, f):
    w = world
    with method(method_name, tmp_path) as m, servers(w, f):
        if backend == "nft-native":
            m = native(m)
        script(w, m, "redirect.sh", *m.args, *EXCLUSIONS)
        config = tmp_path / "proxy.json"  # the proxy's effective config: its --mark flag included
        config.write_text(json.dumps({**CONFIG, "mark": MARK} if "--mark" in m.proxy.get("args", ()) else CONFIG))
        proxy = ProxyProcess(w.pod, config=CONFIG, **m.proxy)
        try:
            seen_captured = set()
            for name, who, addr, extra in probes(f):
                told = explain(w, m.nsenter, config, "--to", fmt(*addr), *extra)
                verdict = told["verdict"]
                assert verdict["outcome"] in ("captured", "not captured"), (name, told)
                assert told["unreadable"] == [] and told["warnings"] == [], (name, told)
                entries = len(proxy.access_entries())
                before = counters(w, backend, f.name)
                connect(w, who, name, addr)
                if verdict["captured"]:
                    entry = proxy.wait_new_access(entries, timeout=5.0)
                    assert entry is not None, f"{name}: explain said captured; the proxy never saw it"
                    assert entry["destination"] == fmt(*addr)
                    got = {k: entry[k] for k in ("direction", "chain", "cluster", "upstream")}
                    assert got == {k: verdict[k] for k in got}, (name, told)
                    assert verdict["loop"] == "none", told["proxy"]["loop_guard"]
                    seen_captured.add(name)
                else:
                    time.sleep(0.3)  # a capture would have reached the access log by now
                    assert len(proxy.access_entries()) == entries, f"{name}: explain said not captured"
                after = counters(w, backend, f.name)
                moved = {rule for rule, n in after.items() if n > before.get(rule, 0)}
                hits = {_key(h) for h in told["rules"]["hits"]}
                own = {_key(h) for h in (told["proxy"] or {}).get("loop_guard", {}).get("hits", [])} \
                    if told["proxy"] and told["proxy"]["loop_guard"] else set()
                assert hits <= moved, f"{name}: explain's rules {hits - moved} did not count the connection"
                assert moved <= hits | own, f"{name}: rules {moved - hits - own} counted it; explain missed them"
            # the probes cover both answers, and both directions of capture
            assert {"service address", "inbound"} <= seen_captured, seen_captured
            assert "loopback" not in seen_captured and "excluded port" not in seen_captured
        finally:
            proxy.stop()


def test_unreadable_rules_are_one_line_and_the_rest_is_explained():
    """Without privilege (UID 65534, no capabilities) iptables-save and nft
    refuse: explain says so in one line, exits 1, no traceback, and still
    gives the proxy's decision from the config file."""
    directory = tempfile.mkdtemp(prefix="scp-explain-")  # pytest's own are private to root
    try:
        os.chmod(directory, 0o755)
        config = os.path.join(directory, "proxy.yaml")
        with open(config, "w") as file:
            json.dump(CONFIG, file)
        os.chmod(config, 0o644)
        out = _as_nobody("--to", "198.51.100.100:80", "--config", config)
    finally:
        shutil.rmtree(directory)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    unreadable = [line for line in out.stdout.splitlines() if line.startswith("could not read: the rules:")]
    assert len(unreadable) == 1, out.stdout
    assert "chain vip-ipv4" in out.stdout and "cluster backend-ipv4" in out.stdout
    assert "rules (OUTPUT): not read" in out.stdout


def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--",
                           PYTHON, "-m", "proxy", "explain", *args], capture_output=True, text=True, cwd="/")


# The nft JSON fixtures of tests/unit/test_explain_golden.py: redirect.sh's arguments.
NFT_FIXTURES = {
    "mark": ("--method", "mark", "--exclude-outbound-ports", "25", "--exclude-inbound-ports", "2222"),
    "explicit": ("--method", "explicit", "--services", "tests/unit/golden/explain/explicit.services"),
}
FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "golden" / "explain"


def _normal(data: dict) -> list:
    """nft's JSON without what changes from one load to the next (handles, counters, version)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "handle"} if "counter" not in value else \
                {"counter": {}}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    return [strip(item) for item in data["nftables"] if "metainfo" not in item]


@pytest.mark.parametrize("name", sorted(NFT_FIXTURES))
def test_the_nft_fixtures_are_what_nft_prints_for_the_scripts_rules(netns_prerequisites, world, name):
    """The unit tests' nft JSON is nft's own listing of redirect.sh's
    nft-native dry run, loaded into a fresh pod; regenerate it from this
    test's output when the rules change."""
    repo = Path(__file__).resolve().parents[2]
    rules = subprocess.run(["sh", "iptables/redirect.sh", *NFT_FIXTURES[name], "--ipv6", "on", "--backend",
                            "nft-native", "--dry-run"], cwd=repo, capture_output=True, text=True, check=True).stdout
    world.pod.exec("nft", "-f", "-", input=rules)
    listed = json.loads(world.pod.exec("nft", "-j", "list", "ruleset").stdout)
    fixture = json.loads((FIXTURES / f"{name}.nft.json").read_text())
    assert _normal(listed) == _normal(fixture), f"{name}.nft.json is stale:\n{json.dumps(listed, indent=1)}"


@pytest.mark.parametrize("f", [V4, V6], ids=lambda f: f.name)
@pytest.mark.parametrize("case", ["proxy-as-another-uid", "explicit-lists-a-passthrough"])
@pytest.mark.usefixtures("method_prerequisites")
def test_explain_warns_about_a_loop_that_real_traffic_then_shows(world, tmp_path, case, f):
    """The two loops of the issue, warned about beforehand and then made:
    the UID bypass while the proxy runs as UID 1000, and the explicit method
    listing a destination the proxy forwards as it is. Either way the
    proxy's own upstream connection comes back to it, its loop guard refuses
    it, and the app's connection is reset."""
    w = world
    if case == "proxy-as-another-uid":
        args, proxy_args = ["--method", "uid"], {"uid": 1000}
        warned = "runs as UID 1000"
    else:
        services = tmp_path / "services"
        services.write_text(f"{fmt(*f.web)}\n")
        args, proxy_args = ["--method", "explicit", "--services", str(services)], {}
        warned = f"{fmt(*f.web)} is captured"
    w.pod.exec("sh", str(IPTABLES / "redirect.sh"), *args)
    config = tmp_path / "proxy.json"
    config.write_text(json.dumps(CONFIG))
    with servers(w, f) as srv:
        proxy = ProxyProcess(w.pod, config=CONFIG, **proxy_args)
        try:
            told = explain(w, False, config, "--to", fmt(*f.web))
            assert any(warned in line for line in told["warnings"]), told["warnings"]
            assert told["verdict"]["outcome"] == "captured" and told["verdict"]["loop"] == "loop", told["verdict"]
            with pytest.raises(ConnectionResetError):
                send_digest(w.pod, f.web, 1000)
            assert proxy.access(end="loop_guard")["destination"] == fmt(*f.web)
            assert not srv["web"].accepted
        finally:
            proxy.stop()
    w.pod.exec("sh", str(IPTABLES / "cleanup.sh"))


@pytest.mark.usefixtures("method_prerequisites")
def test_admin_alone_explains_as_the_config_file_does(world, tmp_path):
    """--admin alone reads the running proxy's own model (/effective_config),
    which has what a bootstrap cannot say (a chain's direction, the proxy's
    own clusters): for a proxy started from our YAML, the decision is the
    one --config gives, for connections it forwards as they are and to a
    cluster, in both families."""
    w = world
    w.pod.exec("sh", str(IPTABLES / "redirect.sh"), "--method", "uid")
    config = tmp_path / "proxy.json"
    config.write_text(json.dumps(CONFIG))
    proxy = ProxyProcess(w.pod, config=CONFIG)
    try:
        for to in (V4.web, V4.vip, V6.web):
            alone = w.pod.exec(PYTHON, "-m", "proxy", "explain", "--json", "--admin", ADMIN, "--to", fmt(*to),
                               check=False)
            assert alone.returncode == 0 and "Traceback" not in alone.stderr, alone.stdout + alone.stderr
            told, given = json.loads(alone.stdout), explain(w, False, config, "--to", fmt(*to))
            assert told["unreadable"] == [] and told["proxy"] is not None
            assert told["proxy"]["config"] == f"the running proxy's /effective_config, {ADMIN}"

            def decision(proxy: dict) -> dict:  # (the rule counters move with each admin request)
                return {k: v for k, v in proxy.items() if k not in ("config", "loop_guard")}

            assert decision(told["proxy"]) == decision(given["proxy"]), (to, told["proxy"])
            assert told["proxy"]["loop_guard"]["text"] == given["proxy"]["loop_guard"]["text"]
            assert told["verdict"] == given["verdict"]
    finally:
        proxy.stop()
    w.pod.exec("sh", str(IPTABLES / "cleanup.sh"))
