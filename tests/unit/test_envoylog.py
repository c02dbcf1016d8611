"""Envoy's log lines: spdlog patterns (--log-format) and Envoy's logger names."""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import pytest

from proxy.config import LOG_LEVELS
from proxy.control.envoylog import (
    ENVOY_DEFAULT_PATTERN,
    SpdlogFormatter,
    compile_pattern,
    component,
    escape_c,
    logger_levels,
)

CREATED = time.mktime((2026, 3, 4, 5, 6, 7, 0, 0, -1)) + 0.123456


def record(msg: str = "listening on [::]:15001", level: int = logging.INFO, name: str = "proxy.server",
           args: tuple = (), exc_info=None) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, "/x/proxy/control/server.py", 99, msg, args, exc_info, func="_serve")
    rec.created = CREATED
    return rec


def fmt(pattern: str, rec: logging.LogRecord | None = None) -> str:
    return SpdlogFormatter(pattern).format(rec or record())


def test_envoys_default_pattern():
    line = fmt(ENVOY_DEFAULT_PATTERN)
    tid = threading.get_native_id()
    assert line == f"[2026-03-04 05:06:07.123][{tid}][info][main] [/x/proxy/control/server.py:99] listening on [::]:15001"


def test_istios_pattern_with_tabs():
    line = fmt("%Y-%m-%dT%T.%fZ\t%l\tenvoy %n %g:%#\t%v\tthread=%t", record(level=logging.WARNING,
                                                                          name="proxy.listener"))
    assert re.fullmatch(r"2026-03-04T05:06:07\.123456Z\twarning\tenvoy connection /x/proxy/control/server\.py:99\t"
                        r"listening on \[::\]:15001\tthread=\d+", line), line


def test_a_json_pattern_stays_json_whatever_the_message():
    pattern = '{"level":"%l","time":"%Y-%m-%dT%T.%fZ","scope":"envoy %n","msg":"%j","caller":"%s:%#"}'
    line = fmt(pattern, record(msg='a "quoted"\nword\tand \\ more'))
    assert json.loads(line) == {"level": "info", "time": "2026-03-04T05:06:07.123456Z", "scope": "envoy main",
                                "msg": 'a "quoted"\nword\tand \\ more', "caller": "server.py:99"}


@pytest.mark.parametrize(("pattern", "expected"), [
    ("[%8l]", "[    info]"), ("[%-8l]", "[info    ]"), ("[%=8l]", "[  info  ]"), ("[%3!l]", "[inf]"),
    ("%L %C %m/%d %H:%M:%S %e %F", "I 26 03/04 05:06:07 123 123456000"), ("100%% %v", "100% listening on [::]:15001"),
    ("%q %v", "%q listening on [::]:15001"),  # an unknown flag stays as written, as spdlog does
    ("%s %! %@", "server.py _serve /x/proxy/control/server.py:99"), ("%^%l%$", "info"), ("trailing %", "trailing %"),
])
def test_flags_and_padding(pattern, expected):
    assert fmt(pattern) == expected


def test_levels_as_spdlog_names_them():
    names = [fmt("%l", record(level=lv)) for lv in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                                                       logging.CRITICAL)]
    assert names == ["debug", "info", "warning", "error", "critical"]


def test_a_traceback_stays_on_the_line():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        rec = record(msg="failed", level=logging.ERROR, exc_info=sys.exc_info())
    line = fmt("%l %v", rec)
    assert "\n" not in line and line.startswith("error failed ") and "ValueError: boom" in line


def test_escaped_messages():
    assert escape_c("a\tb\nc  \n") == "a\\tb\\nc  \n"  # trailing whitespace is kept, as Envoy's escaping does
    assert SpdlogFormatter("%v", escaped=True).format(record(msg="x\ny")) == "x\\ny"
    assert fmt("%_", record(msg="x\ny")) == "x\\ny"


def test_envoy_component_names():
    assert [component(n) for n in ("proxy", "proxy.server", "proxy.workers", "proxy.admin", "proxy.listener",
                                   "proxy.listener.sub", "elsewhere")] == [
        "main", "main", "main", "admin", "connection", "connection", "misc"]
    levels = dict(logger_levels([("upstream", "error"), ("connection", "debug"), ("admin", "warning"),
                                 ("misc", "trace")], LOG_LEVELS))
    assert levels == {"proxy.listener": "debug", "proxy.admin": "warning"}  # the most verbose of those sharing one


def test_compiling_keeps_text_apart_from_flags():
    assert len(compile_pattern("a%lb")) == 3 and len(compile_pattern("abc%%def")) == 1
