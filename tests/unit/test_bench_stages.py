"""`python -m bench.stages` runs the proxy's data path in one process and times each stage.

Checked: every stage is reached, as often per connection as the data path
goes through it, with a positive time; the whole cost is positive; the
markdown has a row per stage. Never a timing: this machine is shared and noisy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import stages

ROOT = Path(__file__).resolve().parents[2]

# per conn-32 connection: one accept, one attempt, one confirm; two create_connection
# steps (its start and its end), two sockets closed, two SO_LINGER turned off
CALLS = {"event loop: create_connection's steps": 2, "sockets closed": 2, "  SO_LINGER 0 turned off": 2}


def test_every_stage_is_timed_once_per_connection(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.stages", "--connections", "200", "--rounds", "2",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "stages.json").read_text())
    assert doc["stages"] == [label for label, _, _ in stages.STAGES if label in doc["stages"]]
    assert len(doc["stages"]) >= len(stages.STAGES) - 2  # a stage may be gone from the code, not most
    summary = stages.summarise(doc)
    assert summary["direct"] > 0 and summary["proxy"] > 0
    for label in doc["stages"]:
        assert summary["calls"][label] == CALLS.get(label, 1), label
        assert summary["stages"][label] > 0, label
    rows = [line for line in (tmp_path / "stages.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 3 + len(doc["stages"])  # the header, the three totals, a row per stage
    assert proc.stdout == (tmp_path / "stages.md").read_text()


def test_bad_arguments_are_one_line_errors():
    proc = subprocess.run([sys.executable, "-m", "bench.stages", "--rounds", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--rounds at least 1" in proc.stderr.strip().splitlines()[-1]
