"""The benchmark keeps working: `python -m bench --quick` end to end.

It builds its own throwaway pod, runs every subject (this proxy on both loops,
with two workers and with splicing off; real Envoy with one and two workers;
socat, HAProxy with and without splicing, pproxy) against every workload once
with tiny sizes, the rule-scaling experiment, the system calls per connection
(perf) and the py-spy profile, and writes JSON, markdown and PNG charts.
Checked here: that it completes and that its output is well formed. Never its
timings: this machine is shared and noisy.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

# the quick run takes 2-3 minutes on a busy machine: its fixture gets more than the default 300 s
pytestmark = [pytest.mark.netns, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
SUBJECTS = ["direct", "proxy-uvloop", "proxy-uvloop-c2", "proxy-uvloop-copy", "proxy-asyncio", "envoy", "envoy-c2",
            "socat", "haproxy", "haproxy-splice", "pproxy", "uvloop-floor"]
PEERS = ("envoy", "socat", "haproxy", "haproxy-splice", "pproxy")  # one worker each
SYSCALL_SUBJECTS = ["direct", "proxy-uvloop", "proxy-uvloop-c2", "envoy", "envoy-c2", "haproxy", "uvloop-floor"]
WORKLOADS = ["bulk-up-1", "bulk-up-8", "bulk-down-1", "bulk-down-8", "rr-1", "rr-1-onecpu", "rr-64", "conn-32",
             "idle-200"]
CHARTS = ["throughput.png", "latency.png", "rates.png", "resources.png", "rules.png", "syscalls.png", "profile.png"]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every table in a markdown text, as rows of cells; raises if one is malformed."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            assert line.rstrip().endswith("|"), f"unterminated table row: {line!r}"
            cells = [c.strip() for c in line.strip()[1:-1].split("|")]
            if current is None:
                current = [cells]
                tables.append(current)
            else:
                assert len(cells) == len(current[0]), f"row has {len(cells)} cells, header {len(current[0])}: {line!r}"
                current.append(cells)
        else:
            current = None
    for table in tables:
        assert len(table) >= 3, f"a table without rows: {table}"
        assert all(set(c) <= set("-:") and c for c in table[1]), f"bad separator row: {table[1]}"
    return tables


@pytest.fixture(scope="module")
def quick_run(netns_prerequisites, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--profile", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=540, check=False,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, f"bench --quick exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return out, proc


def test_quick_run_reports_progress_and_the_table(quick_run):
    _, proc = quick_run
    assert "ETA" in proc.stderr
    assert "| workload | metric |" in proc.stdout


def test_json_has_every_subject_and_workload_with_positive_numbers(quick_run):
    out, _ = quick_run
    doc = json.loads((out / "latest.json").read_text())
    assert doc["failures"] == []
    assert [s["name"] for s in doc["subjects"]] == SUBJECTS
    assert [w["name"] for w in doc["workloads"]] == WORKLOADS
    assert not [r for r in doc["runs"] if r.get("failed")]
    assert {(r["subject"], r["workload"]) for r in doc["runs"]} == {(s, w) for s in SUBJECTS for w in WORKLOADS}
    for w in doc["workloads"]:
        for m in w["metrics"]:
            for s in SUBJECTS:
                cell = doc["summary"][w["name"]][m["key"]][s]
                if s == "direct" and m["relay_only"]:
                    assert cell is None, (w["name"], m["key"])  # nothing to measure without a relay
                    continue
                assert cell is not None, f"no {m['key']} for {s} in {w['name']}"
                assert all(positive(v) for v in (cell["median"], cell["min"], cell["max"])), (w["name"], m["key"], s)
                ratios = doc["ratios"][w["name"]][m["key"]]
                assert ratios["best_peer"] in PEERS
                r = ratios["subjects"][s]
                assert positive(r["to_best_peer"])
                assert positive(r["to_direct"]) or m["relay_only"]


def test_rule_scaling_and_profile_are_measured(quick_run):
    out, _ = quick_run
    doc = json.loads((out / "latest.json").read_text())
    steps = {(s["rules"], s["variant"]): s for s in doc["rules"]}
    assert set(steps) == {(n, v) for n in (1, 10) for v in ("iptables", "nft-set", "nft-native")}
    for step in steps.values():
        assert positive(step["install_s"])
        assert step["errors"] == 0 and step["served_by_proxy"] > 0
        for which in ("first", "last"):
            assert all(positive(step[which][k]) for k in ("connect_p50_us", "echo_p50_us"))
    profile = doc["profile"]
    assert profile["samples"] > 0 and profile["self"] and profile["native"]["self"]
    assert (out / profile["files"]["flamegraph"]).read_text().lstrip().startswith("<?xml")


def test_system_calls_are_counted_per_connection(quick_run):
    """The counts are the subject's own: every relay accepts, opens a socket and
    connects once per connection; the app server (`direct`) accepts and never
    connects. The CPU and context-switch figures are there (their size is a timing)."""
    out, _ = quick_run
    doc = json.loads((out / "latest.json").read_text())
    part = doc["syscalls"]
    assert [r["subject"] for r in part["runs"]] and not [r for r in part["runs"] if r.get("failed")]
    assert sorted(part["summary"]) == sorted(SYSCALL_SUBJECTS)
    for name, cell in part["summary"].items():
        calls = cell["syscalls"]
        assert cell["errors"] == 0, name
        assert positive(cell["cps"]) and positive(cell["syscalls_total"]), name
        assert 0.9 <= calls["accept4"] < 3, (name, calls["accept4"])
        assert cell["syscalls_total"] >= 0.99 * sum(calls.values()), name  # all calls, named or not
        for key in ("user_us", "system_us", "cpu_us", "voluntary", "involuntary", "syscalls_unnamed"):
            assert isinstance(cell[key], (int, float)) and math.isfinite(cell[key]) and cell[key] >= 0, (name, key)
        if name == "direct":
            assert calls.get("connect", 0) == 0 and calls.get("socket", 0) == 0
        else:
            assert 0.9 <= calls["connect"] < 1.5 and 0.9 <= calls["socket"] < 1.5, (name, calls)
    tables = markdown_tables((out / "results.md").read_text())
    table = next(t for t in tables if t[0][0] == "per connection")
    assert table[0][1:] == ["direct (app server)", *SYSCALL_SUBJECTS[1:]]
    labels = [row[0] for row in table[2:]]
    assert "`accept4`" in labels and "`connect`" in labels and labels[-1].startswith("other")
    assert "Made by `python -m bench --quick" in (out / "results.md").read_text()


def test_markdown_tables_parse(quick_run):
    out, _ = quick_run
    tables = markdown_tables((out / "results.md").read_text())
    medians, ratios = tables[0], tables[1]
    for table in (medians, ratios):
        assert table[0][:2] == ["workload", "metric"]
        assert table[0][2:2 + len(SUBJECTS)] == SUBJECTS
    doc = json.loads((out / "latest.json").read_text())
    n_metrics = sum(len(w["metrics"]) for w in doc["workloads"])
    assert len(medians) - 2 == n_metrics and len(ratios) - 2 == n_metrics
    targets = next(t for t in tables if t[0] == ["subject", "target", "met", "detail"])
    assert {row[0] for row in targets[2:]} == {"proxy-uvloop", "proxy-uvloop-c2"}
    assert all(row[2] in ("yes", "NO") for row in targets[2:])
    against_envoy = {(row[0], row[1]) for row in targets[2:] if "envoy" in row[1]}
    for subject, envoy in (("proxy-uvloop", "envoy"), ("proxy-uvloop-c2", "envoy-c2")):
        assert {(subject, f"conn/s ≥ {envoy} (conn-32)"), (subject, f"CPU per connection ≤ {envoy}'s (conn-32)"),
                (subject, f"req/s ≥ {envoy}'s (rr-64)"),
                (subject, f"no system call per connection that {envoy} does not make")} <= against_envoy
    assert any(t[0][0] == "services" for t in tables)


def test_charts_are_pngs(quick_run):
    out, _ = quick_run
    for name in CHARTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_render_redoes_the_outputs_from_the_json(quick_run, tmp_path):
    out, _ = quick_run
    proc = subprocess.run([sys.executable, "-m", "bench", "--render", str(out / "latest.json"), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "results.md").read_text() == (out / "results.md").read_text()
    assert all((tmp_path / name).exists() for name in CHARTS)


def test_a_short_soak_checks_every_byte_and_survives_its_faults(tmp_path):
    """`python -m bench --parts soak`, 20 s with a fault every 2 s (a worker
    killed, one stopped for the watchdog, direct dials, admin reads): it
    completes, nothing came back corrupted or cut with a clean FIN, the
    killed and stopped workers were replaced, and the proxy exited 0."""
    out = tmp_path / "soak"
    run = subprocess.run([sys.executable, "-m", "bench", "--parts", "soak", "--soak-seconds", "20",
                          "--fault-every", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((out / "soak.json").read_text())
    load = doc["load"]
    assert load["connections"] > 0 and load["served"] > 0 and load["bytes_checked"] > 0
    assert load.get("corrupted", 0) == 0 and load.get("truncated_clean", 0) == 0 and load.get("hung", 0) == 0
    assert doc["faults"]["kill"] >= 1 and doc["faults"]["stop"] >= 1
    assert doc["faults"]["stopped_and_killed_by_watchdog"] == doc["faults"]["stop"]
    assert doc["stats"]["server.worker_restarts"] >= 2
    assert doc["exit_status"] == 0 and doc["failures"] == []
    assert doc["start"]["fds"] > 0 and doc["end"]["fds"] > 0
    assert markdown_tables((out / "soak.md").read_text())
