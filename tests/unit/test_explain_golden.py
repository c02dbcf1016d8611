"""`sidecar-proxy explain` on fixed rule sets: golden outputs, and its parts.

The rules are the project's own: `iptables/redirect.sh --dry-run` renders
the iptables ones here (iptables-restore input reads as iptables-save
output without counters); nft's JSON cannot be rendered without nft, so
tests/unit/golden/explain/*.nft.json hold what `nft -j list ruleset` printed
for redirect.sh's nft-native dry run (tests/e2e/test_explain.py checks that
they still are). The machine is left out: the pod's routes and addresses
and the proxy's identity are given (the demo's pod, 192.0.2.1 and
2001:db8:1::1). Each case's text output is compared with
tests/unit/golden/explain/<case>.txt; after an intended change:

    UPDATE_GOLDEN=1 python -m pytest tests/unit/test_explain_golden.py
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import config as cfg
from proxy.datapath.chains import ChainTable, Connection, prune, select
from proxy.explain.render import summary, to_json, to_text
from proxy.explain.report import Facts, ProxyIdentity, Request, explain
from proxy.explain.rules import RulesError, Ruleset, parse_nft_json, parse_save
from proxy.explain.walk import Packet, walk

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden" / "explain"
SERVICES = "tests/unit/golden/explain/explicit.services"

POD_V4, POD_V6 = "192.0.2.1", "2001:db8:1::1"
LOCAL = frozenset({POD_V4, POD_V6, "127.0.0.1", "::1"})

# the demo's configuration, with an IPv6 service too
CONFIG = cfg.from_data({
    "clusters": [{"name": "reviews", "endpoints": ["198.51.100.21:8080", "198.51.100.22:8080"]},
                 {"name": "reviews-v6", "endpoints": ["[2001:db8:2::21]:8080"], "mark": "0x2"}],
    "chains": [
        {"name": "reviews", "match": {"ports": [80], "destinations": ["198.51.100.20/32"]}, "cluster": "reviews"},
        {"name": "reviews-v6", "match": {"ports": [80], "destinations": ["2001:db8:2::20/128"]},
         "cluster": "reviews-v6"},
        {"name": "port-80-from-the-lab", "match": {"ports": [80], "sources": ["203.0.113.0/24"]},
         "cluster": "reviews"},
        {"name": "no-smtp", "match": {"ports": [25]}, "action": "reject"},
    ],
})


def route(dst):
    """The demo pod's routes: lo for its own and loopback addresses, else eth0."""
    if str(dst) in LOCAL or dst.is_loopback:
        return dst, "lo"
    return ipaddress.ip_address(POD_V4 if dst.version == 4 else POD_V6), "eth0"


def dry_run(*args: str) -> str:
    proc = subprocess.run(["sh", str(REPO / "iptables" / "redirect.sh"), *args, "--ipv6", "on", "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def iptables_rules(family: int, *args: str) -> Ruleset:
    """One family's part of redirect.sh's dry run."""
    v4, marker, v6 = dry_run(*args).partition("# ==== sidecar-proxy IPv6 rules")
    return parse_save(v4 if family == 4 else marker + v6, family)


def nft_rules(name: str) -> Ruleset:
    return parse_nft_json(json.loads((GOLDEN / f"{name}.nft.json").read_text()))


def facts(ruleset: Ruleset, proxy_uid: int = 1337, config: cfg.Config = CONFIG, classid: int = 0,
          cgroup_path: str | None = None) -> Facts:
    identity = ProxyIdentity(5001, uid=proxy_uid, pid=4242, classid=classid, cgroup_path=cgroup_path,
                             found="pid 4242 listens on port 5001")
    return Facts(ruleset, config, "config proxy.yaml", LOCAL, route, identity, connections=None)


def ask(to: str, *, src: str | None = None, inbound: bool = False, uid: int | None = 0, mark: int = 0,
        classid: int = 0, cgroup_path: str | None = "/app.slice") -> Request:
    host, port = to.rsplit(":", 1)
    return Request(ipaddress.ip_address(host.strip("[]")), int(port),
                   ipaddress.ip_address(src) if src else None, None, inbound, uid=None if inbound else uid,
                   gid=None if inbound else uid, mark=mark, classid=classid, cgroup_path=cgroup_path)


# name -> (rules, facts keyword arguments, request)
CASES = {
    "uid_to_a_service_address": (lambda: iptables_rules(4, "--method", "uid"), {}, ask("198.51.100.20:80")),
    "uid_passthrough": (lambda: iptables_rules(4, "--method", "uid"), {}, ask("198.51.100.10:443")),
    "uid_reject_chain": (lambda: iptables_rules(4, "--method", "uid"), {}, ask("198.51.100.25:25")),
    "uid_as_the_proxy": (lambda: iptables_rules(4, "--method", "uid"), {}, ask("198.51.100.20:80", uid=1337)),
    "uid_loopback": (lambda: iptables_rules(4, "--method", "uid"), {}, ask("127.0.0.1:9000")),
    "uid_own_pod_ip": (lambda: iptables_rules(4, "--method", "uid"), {}, ask(f"{POD_V4}:8080")),
    "uid_inbound": (lambda: iptables_rules(4, "--method", "uid"), {},
                    ask(f"{POD_V4}:8080", src="192.0.2.2", inbound=True)),
    "uid_inbound_to_the_proxy_port": (lambda: iptables_rules(4, "--method", "uid"), {},
                                      ask(f"{POD_V4}:5001", src="192.0.2.2", inbound=True)),
    "uid_source_prefix_chain_without_from": (
        lambda: iptables_rules(4, "--method", "uid", "--inbound-ports", "80"), {},
        ask(f"{POD_V4}:80", inbound=True)),
    "uid_excluded_port": (lambda: iptables_rules(4, "--method", "uid", "--exclude-outbound-ports", "25,3306"), {},
                          ask("198.51.100.25:25")),
    "uid_proxy_runs_as_another_uid": (lambda: iptables_rules(4, "--method", "uid"), {"proxy_uid": 1000},
                                      ask("198.51.100.10:80")),
    "uid_ipv6_link_local": (lambda: iptables_rules(6, "--method", "uid"), {}, ask("[fe80::1]:80")),
    "mark_nft_ipv6_cluster": (lambda: nft_rules("mark"), {}, ask("[2001:db8:2::20]:80")),
    "mark_nft_ipv4_passthrough_loops": (lambda: nft_rules("mark"), {}, ask("198.51.100.10:80")),
    "cgroup_classid": (lambda: iptables_rules(4, "--method", "cgroup"), {"classid": 0x100001},
                       ask("198.51.100.10:80")),
    "cgroup_path_unknown": (lambda: iptables_rules(4, "--method", "cgroup", "--cgroup-path", "/proxy.slice"),
                            {"cgroup_path": "/proxy.slice/sidecar"}, ask("198.51.100.10:80", cgroup_path=None)),
    "explicit_listed_passthrough_loops": (
        lambda: iptables_rules(4, "--method", "explicit", "--services", SERVICES), {}, ask("198.51.100.10:80")),
    "explicit_nft_not_listed": (lambda: nft_rules("explicit"), {}, ask("198.51.100.30:80")),
    "explicit_nft_ipv6_listed": (lambda: nft_rules("explicit"), {}, ask("[2001:db8:2::20]:80")),
    # how the proxy's connection to the app leaves: from 127.0.0.6 (::6), or from the client with the tproxy mark
    "uid_inbound_from_127_0_0_6": (lambda: iptables_rules(4, "--method", "uid", "--inbound-source", "127.0.0.6"),
                                   {"config": dataclasses.replace(CONFIG, inbound_source="127.0.0.6")},
                                   ask(f"{POD_V4}:8080", src="192.0.2.2", inbound=True)),
    "uid_inbound_ipv6_from_6": (lambda: iptables_rules(6, "--method", "uid", "--inbound-source", "127.0.0.6"),
                                {"config": dataclasses.replace(CONFIG, inbound_source="127.0.0.6")},
                                ask(f"[{POD_V6}]:8080", src="2001:db8:1::2", inbound=True)),
    "uid_inbound_tproxy": (lambda: iptables_rules(4, "--method", "uid", "--inbound-mode", "tproxy"),
                           {"config": dataclasses.replace(CONFIG, inbound_mode="tproxy")},
                           ask(f"{POD_V4}:8080", src="192.0.2.2", inbound=True)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name):
    rules, facts_args, request = CASES[name]
    text = to_text(explain(request, facts(rules(), **facts_args)))
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"no golden file {path.name}: run with UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{path.name} differs: run with UPDATE_GOLDEN=1 and review the diff"


# What each case must say, whatever the wording: the verdicts the golden files show.
VERDICTS = {
    "uid_to_a_service_address": ("captured", "reviews", "reviews", "198.51.100.21:8080", "none"),
    "uid_passthrough": ("captured", "passthrough", "original_dst", "198.51.100.10:443", "none"),
    "uid_reject_chain": ("captured", "no-smtp", None, None, "none"),
    "uid_as_the_proxy": ("not captured", None, None, None, None),
    "uid_loopback": ("not captured", None, None, None, None),
    "uid_own_pod_ip": ("captured", "passthrough", "original_dst", "192.0.2.1:8080", "none"),
    "uid_inbound": ("captured", "passthrough", "original_dst", "192.0.2.1:8080", "none"),
    "uid_inbound_to_the_proxy_port": ("not captured", None, None, None, None),
    "uid_excluded_port": ("not captured", None, None, None, None),
    "uid_proxy_runs_as_another_uid": ("captured", "passthrough", "original_dst", "198.51.100.10:80", "loop"),
    "uid_ipv6_link_local": ("not captured", None, None, None, None),
    "mark_nft_ipv6_cluster": ("captured", "reviews-v6", "reviews-v6", "[2001:db8:2::21]:8080", "loop"),
    "mark_nft_ipv4_passthrough_loops": ("captured", "passthrough", "original_dst", "198.51.100.10:80", "loop"),
    "cgroup_classid": ("captured", "passthrough", "original_dst", "198.51.100.10:80", "none"),
    "cgroup_path_unknown": ("unknown", "passthrough", "original_dst", "198.51.100.10:80", "none"),
    "uid_source_prefix_chain_without_from": ("captured", None, None, None, "unknown"),
    "explicit_listed_passthrough_loops": ("captured", "passthrough", "original_dst", "198.51.100.10:80", "loop"),
    "explicit_nft_not_listed": ("not captured", None, None, None, None),
    "explicit_nft_ipv6_listed": ("captured", "reviews-v6", "reviews-v6", "[2001:db8:2::21]:8080", "none"),
    "uid_inbound_from_127_0_0_6": ("captured", "passthrough", "original_dst", "192.0.2.1:8080", "none"),
    "uid_inbound_ipv6_from_6": ("captured", "passthrough", "original_dst", "[2001:db8:1::1]:8080", "none"),
    "uid_inbound_tproxy": ("captured", "passthrough", "original_dst", "192.0.2.1:8080", "none"),
}


@pytest.mark.parametrize("name, source, mark, rule", [
    ("uid_inbound", None, None, "sidecar-proxy: proxy own traffic, uid 1337"),
    ("uid_inbound_from_127_0_0_6", "127.0.0.6", None, "sidecar-proxy: proxy to the app, from 127.0.0.6"),
    ("uid_inbound_ipv6_from_6", "::6", None, "sidecar-proxy: proxy to the app, from ::6"),
    ("uid_inbound_tproxy", "192.0.2.2", 0x539, "sidecar-proxy: proxy to the app, tproxy mark 0x539"),
])
def test_the_connection_to_the_app_leaves_as_the_data_path_makes_it(name, source, mark, rule):
    """inbound_source and inbound_mode change the proxy's own connection to the app
    (upstream._to_app): explain's loop walk follows that connection, and the rule
    that lets it out is the one made for it."""
    rules, facts_args, request = CASES[name]
    e = explain(request, facts(rules(), **facts_args))
    assert e.decision is not None and e.loop is not None and e.loop.walk is not None
    assert (e.decision.source_address, e.decision.mark) == (source, mark)
    assert e.loop.verdict == "none" and e.loop.walk.hits[-1].rule.comment == rule


@pytest.mark.parametrize("name", sorted(CASES))
def test_verdicts(name):
    rules, facts_args, request = CASES[name]
    s = summary(explain(request, facts(rules(), **facts_args)))
    assert (s["outcome"], s["chain"], s["cluster"], s["upstream"], s["loop"]) == VERDICTS[name]


def test_warnings_name_the_loops():
    uid = explain(ask("198.51.100.30:80"), facts(iptables_rules(4, "--method", "uid"), proxy_uid=1000))
    assert len(uid.warnings) == 1 and "runs as UID 1000" in uid.warnings[0] and "UID 1337" in uid.warnings[0]
    listed = explain(ask("198.51.100.30:80"),
                     facts(iptables_rules(4, "--method", "explicit", "--services", SERVICES)))
    assert len(listed.warnings) == 1 and "198.51.100.10:80 is captured" in listed.warnings[0]
    nft = explain(ask("198.51.100.30:80"), facts(nft_rules("explicit")))
    assert len(nft.warnings) == 1 and "198.51.100.10:80 is captured" in nft.warnings[0]
    fine = explain(ask("198.51.100.30:80"), facts(iptables_rules(4, "--method", "uid")))
    assert fine.warnings == []
    empty = explain(ask("198.51.100.30:80"), facts(parse_save("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n", 4)))
    assert empty.warnings == ["no sidecar-proxy rules here: is this the pod's network namespace? "
                              "(redirect.sh installs them)"]
    assert summary(empty)["outcome"] == "not captured"


def test_json_has_what_the_text_has():
    e = explain(ask("198.51.100.20:80"), facts(iptables_rules(4, "--method", "uid")))
    data = json.loads(json.dumps(to_json(e)))
    assert [h["comment"] for h in data["rules"]["hits"]] == [
        "sidecar-proxy: outbound capture", "sidecar-proxy: outbound, every destination",
        "sidecar-proxy: outbound to proxy port 5001"]
    assert data["rules"]["verdict"] == {"kind": "redirect", "port": 5001, "reason": None}
    assert [s["step"] for s in data["proxy"]["steps"]][:2] == ["destination port", "destination prefix"]
    assert data["verdict"]["chain"] == "reviews" and data["verdict"]["upstream"] == "198.51.100.21:8080"
    assert data["proxy"]["loop_guard"]["verdict"] == "none"


def test_round_robin_follows_the_running_proxys_count():
    rules = iptables_rules(4, "--method", "uid")
    for sent, expected in ((0, "198.51.100.21:8080"), (1, "198.51.100.22:8080"), (4, "198.51.100.21:8080")):
        f = facts(rules)
        f.connections = {"reviews": sent}
        assert summary(explain(ask("198.51.100.20:80"), f))["upstream"] == expected


# ------------------------------------------------------------------ parts --

def test_counters_and_comments_of_iptables_save():
    text = ("*nat\n:OUTPUT ACCEPT [0:0]\n:SIDECAR_OUTPUT - [0:0]\n"
            '[7:420] -A OUTPUT -p tcp -m comment --comment "sidecar-proxy: outbound capture" -j SIDECAR_OUTPUT\n'
            "[3:180] -A SIDECAR_OUTPUT ! -d 10.0.0.0/8 -p tcp -m multiport --dports 80,8000:8002 -j DNAT "
            "--to-destination 192.0.2.9\nCOMMIT\n")
    rules = parse_save(text, 4)
    hook, dnat = rules.tables[0].chains["OUTPUT"][0], rules.tables[0].chains["SIDECAR_OUTPUT"][0]
    assert (hook.packets, hook.comment, hook.target, hook.jump) == (7, "sidecar-proxy: outbound capture", "JUMP",
                                                                   "SIDECAR_OUTPUT")
    assert dnat.target == "DNAT" and dnat.packets == 3
    packet = Packet(4, ipaddress.ip_address("198.51.100.1"), 8001, ipaddress.ip_address(POD_V4), uid=0, oif="eth0")
    w = walk(rules, packet, "outbound")
    assert w.verdict.kind == "other" and w.verdict.rule == dnat, "someone else's DNAT: not ours, not captured"
    inside = walk(rules, Packet(4, ipaddress.ip_address("10.1.2.3"), 8001, None, uid=0, oif="eth0"), "outbound")
    assert inside.verdict.kind == "accept" and [h.rule for h in inside.hits] == [hook]


def test_goto_does_not_come_back_and_return_does():
    text = ("*nat\n:OUTPUT ACCEPT [0:0]\n:A - [0:0]\n:B - [0:0]\n"
            "-A OUTPUT -p tcp -j A\n-A OUTPUT -p tcp -j REDIRECT --to-ports 5001\n"
            "-A A -p tcp --dport 80 -g B\n-A A -j RETURN\n"
            "-A B -j RETURN\nCOMMIT\n")
    rules = parse_save(text, 4)
    to = ipaddress.ip_address("198.51.100.1")
    via_goto = walk(rules, Packet(4, to, 80, uid=0, oif="eth0"), "outbound")
    assert via_goto.verdict.kind == "redirect"  # B's RETURN goes back to OUTPUT, past A
    assert [h.rule.chain for h in via_goto.hits] == ["OUTPUT", "A", "B", "OUTPUT"]
    other = walk(rules, Packet(4, to, 81, uid=0, oif="eth0"), "outbound")
    assert [h.rule.chain for h in other.hits] == ["OUTPUT", "A", "OUTPUT"]


def test_a_match_it_does_not_know_is_cannot_tell_not_a_guess():
    text = "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp -m statistic --mode random --probability 0.5 " \
           "-j REDIRECT --to-ports 5001\nCOMMIT\n"
    w = walk(parse_save(text, 4), Packet(4, ipaddress.ip_address("198.51.100.1"), 80, uid=0, oif="eth0"),
             "outbound")
    assert w.verdict.kind == "unknown" and "--mode" in w.verdict.reason


@pytest.mark.parametrize("text", ["-A OUTPUT -j RETURN\n", "*nat\n-X OUTPUT\n", '*nat\n-A OUTPUT -m comment '
                                  '--comment "unterminated\n'])
def test_text_that_is_not_iptables_save_is_one_line(text):
    with pytest.raises(RulesError) as info:
        parse_save(text, 4)
    assert "\n" not in str(info.value) and str(info.value).startswith("line ")


def test_prune_is_select_step_by_step():
    """explain's steps are the data path's own: the last survivors are select()'s answer."""
    chains = CONFIG.redirect.chains
    for dst, port, src in (("198.51.100.20", 80, POD_V4), ("203.0.113.5", 80, "203.0.113.9"),
                           ("198.51.100.99", 80, POD_V4), ("198.51.100.99", 25, POD_V4)):
        conn = Connection(ipaddress.ip_address(dst), port, ipaddress.ip_address(src), "outbound")
        steps = list(prune(chains, conn))
        last = steps[-1][2]
        assert (last[0] if last else None) == select(chains, conn) == ChainTable(chains).select(conn)


# ------------------------------------------------------------ the command --

def command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "explain", *args], cwd=REPO, capture_output=True,
                          text=True)


@pytest.mark.parametrize(("args", "culprit"), [
    (["--to", "198.51.100.1"], "--to: '198.51.100.1' has no port"),
    (["--to", "198.51.100.1:99999"], "--to: '99999' is not a port"),
    (["--to", "example.com:80"], "--to: 'example.com' is not an IP address"),
    (["--to", "198.51.100.1:80", "--from", "2001:db8::1"], "different address families"),
    (["--to", "198.51.100.1:80", "--mark", "lots"], "--mark: 'lots' is not a number"),
    (["--to", "198.51.100.1:80", "--uid", "no-such-user-here"], "--uid: 'no-such-user-here'"),
    (["--to", "198.51.100.1:80", "--inbound", "--uid", "0"], "an inbound connection has no local socket owner"),
])
def test_bad_flags_are_one_line_and_exit_2(args, culprit):
    out = command(*args)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and culprit in out.stderr, out.stderr


def test_saved_rules_from_a_file_and_a_bad_file(tmp_path):
    saved = tmp_path / "rules.save"
    saved.write_text(dry_run("--method", "uid").partition("# ==== sidecar-proxy IPv6 rules")[0])
    config = tmp_path / "proxy.yaml"
    config.write_text(json.dumps(CONFIG.to_dict()))
    out = command("--to", "198.51.100.20:80", "--from", POD_V4, "--rules", str(saved), "--config", str(config),
                  "--json")
    data = json.loads(out.stdout)
    assert data["verdict"]["chain"] == "reviews" and data["rules"]["backend"] == "iptables"
    garbage = tmp_path / "garbage"
    garbage.write_text("*nat\nthis is not a rule\n")
    out = command("--to", "198.51.100.20:80", "--rules", str(garbage), "--config", str(config))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("could not read:")]
    assert lines == [f"could not read: the rules: {garbage}: line 2: not a rule: this is not a rule"]
    assert "chain reviews" in out.stdout  # the rest is still explained


# iptables-save of an inbound TPROXY set-up (Istio's TPROXY interception mode),
# shaped as redirect.sh --inbound-mode tproxy writes it: mangle PREROUTING hands
# inbound connections to the proxy, nat PREROUTING has no inbound capture.
TPROXY_SAVE = """\
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:SIDECAR_TPROXY_INBOUND - [0:0]
:SIDECAR_TPROXY - [0:0]
:SIDECAR_TPROXY_OUTPUT - [0:0]
[0:0] -A PREROUTING -p tcp -m comment --comment "sidecar-proxy: inbound capture, tproxy" -j SIDECAR_TPROXY_INBOUND
[0:0] -A OUTPUT -p tcp -m comment --comment "sidecar-proxy: tproxy replies" -j SIDECAR_TPROXY_OUTPUT
[0:0] -A SIDECAR_TPROXY_INBOUND -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
[0:0] -A SIDECAR_TPROXY_INBOUND -p tcp -m mark --mark 0x539 -j RETURN
[0:0] -A SIDECAR_TPROXY_INBOUND -i lo -m comment --comment "sidecar-proxy: stays on lo" -j RETURN
[0:0] -A SIDECAR_TPROXY_INBOUND -p tcp -m tcp --dport 5001 -j RETURN
[0:0] -A SIDECAR_TPROXY_INBOUND -p tcp -m tcp --dport 22 -m comment --comment "sidecar-proxy: excluded" -j RETURN
[0:0] -A SIDECAR_TPROXY_INBOUND -m comment --comment "sidecar-proxy: inbound, every port" -j SIDECAR_TPROXY
[0:0] -A SIDECAR_TPROXY -p tcp -j TPROXY --on-port 5001 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff
[0:0] -A SIDECAR_TPROXY_OUTPUT -p tcp -m connmark --mark 0x539 -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
"""


def test_tproxy_in_mangle_takes_inbound_before_nat():
    rules = parse_save(TPROXY_SAVE, 4)
    client = ipaddress.ip_address("192.0.2.2")
    w = walk(rules, Packet(4, ipaddress.ip_address(POD_V4), 8080, client, iif="eth0"), "inbound")
    assert w.verdict.kind == "tproxy" and w.verdict.port == 5001 and w.verdict.captured
    assert [h.rule.chain for h in w.hits] == ["PREROUTING", "SIDECAR_TPROXY_INBOUND", "SIDECAR_TPROXY"]
    ssh = walk(rules, Packet(4, ipaddress.ip_address(POD_V4), 22, client, iif="eth0"), "inbound")
    assert ssh.verdict.kind == "accept"
    # the app's outbound connection: mangle OUTPUT's CONNMARK restore needs a connection mark, a new one has none
    out = walk(rules, Packet(4, ipaddress.ip_address("198.51.100.1"), 80, ipaddress.ip_address(POD_V4), uid=0,
                             oif="eth0"), "outbound")
    assert out.verdict.kind == "accept" and [h.rule.chain for h in out.hits] == ["OUTPUT"]
