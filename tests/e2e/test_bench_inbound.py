"""`python -m bench.inbound --quick` end to end: REDIRECT against TPROXY keeps working.

Checked: it completes, every mode and workload is measured, every figure is a
positive finite number (the relay-only ones absent for `direct`), the markdown
table has a row per metric. Never a timing: this machine is shared and noisy.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.netns, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
MODES = ("direct", "redirect", "tproxy")
WORKLOADS = ("conn-32", "rr-1", "bulk-up-1", "bulk-down-1")


def test_bench_inbound_quick(netns_prerequisites, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.inbound", "--quick", "--reps", "1", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=540, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "inbound.json").read_text())
    assert doc["failures"] == []
    measured = {(r["workload"], r["mode"]) for r in doc["runs"]}
    assert measured == {(w, m) for w in WORKLOADS for m in MODES}
    for run in doc["runs"]:
        for key, value in run["metrics"].items():
            if value is None and run["mode"] != "direct" and key.startswith("cpu_"):
                # CPU is read in clock ticks: a slow quick run may see none (bench prints why)
                assert run["raw"]["cpu_s"] < 1 / os.sysconf("SC_CLK_TCK"), (run, key)
            elif value is None:
                assert run["mode"] == "direct" and key.startswith(("cpu_", "kib_", "rss_")), (run, key)
            else:
                assert math.isfinite(value) and value > 0, (run, key)
    rows = [line for line in (tmp_path / "inbound.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + sum(len(doc["metrics"][w]) for w in WORKLOADS)  # the header, a row per metric
    assert all(row.count("|") == 8 for row in rows), rows
