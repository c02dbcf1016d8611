"""The access log's line formats."""

from __future__ import annotations

import json
import os
import stat

import pytest

from proxy.datapath.accesslog import AccessLog, _chunks, format_json, format_text

ENTRIES = [
    {"id": 7, "start": 1796111401.8978624, "listener": "redirect", "source": "192.0.2.1:48828",
     "destination": "198.51.100.10:80", "direction": "outbound", "chain": "passthrough", "cluster": "original_dst",
     "upstream": "198.51.100.10:80", "bytes_up": 1048576, "bytes_down": 512, "end": "done", "duration_ms": 12.345},
    {"id": 8, "start": 1796111402.0, "listener": "local-web", "source": "[2001:db8::1]:40000",
     "destination": "-", "direction": "outbound", "chain": "plain.local-web", "cluster": None,
     "upstream": None, "bytes_up": 0, "bytes_down": 0, "end": "connect_failed", "duration_ms": 0.0},
]


@pytest.mark.parametrize("entry", ENTRIES)
def test_json_line_is_what_json_dumps_writes(entry):
    line = format_json(entry)
    assert line == json.dumps({"type": "access", **entry}, separators=(",", ":"))
    assert json.loads(line) == {"type": "access", **entry}


def test_text_line():
    assert format_text(ENTRIES[0]) == ("2026-12-01T07:50:01.897Z conn=7 outbound 192.0.2.1:48828 -> 198.51.100.10:80"
                                       " chain=passthrough upstream=198.51.100.10:80 up=1048576B down=512B 12.3ms done")
    assert " upstream=- " in format_text(ENTRIES[1])


def test_writes_never_cut_a_line_and_stay_within_pipe_buf():
    lines = [format_json({**ENTRIES[0], "id": i}) for i in range(200)]
    chunks = _chunks(lines, 4096)
    assert "".join(chunks) == "".join(line + "\n" for line in lines)
    assert all(len(c.encode()) <= 4096 and c.endswith("\n") for c in chunks)
    assert len(chunks) > 1


def test_the_file_is_made_readable_by_owner_and_group_only(tmp_path):
    """It holds every source and destination address: 0640, whatever the umask lets through."""
    path = tmp_path / "access.log"
    old = os.umask(0)
    try:
        AccessLog(str(path), "json").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
