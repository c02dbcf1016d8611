"""Logging as Envoy does it: spdlog patterns (`--log-format`) and Envoy's logger names.

`SpdlogFormatter` is a `logging.Formatter` that writes each record by an
spdlog pattern, the syntax of Envoy's `--log-format` (default
`[%Y-%m-%d %T.%e][%t][%l][%n] [%g:%#] %v`). The pattern is compiled once
into a list of parts; formatting a record only joins them. The flags:

    %v message              %_ message, C escapes    %j message, JSON-escaped (Envoy's own)
    %l level (info)         %L level, one letter     %n logger: Envoy's component name (below)
    %t thread id            %P process id
    %Y %C year, 2 digits    %m %d month, day         %b %h %B month name, short / full
    %a %A weekday           %H %I hour (24 / 12)     %M %S minute, second
    %e %f %F ms / us / ns   %p AM/PM                 %z UTC offset (+00:00)
    %T %X HH:MM:SS          %R HH:MM                 %D %x MM/DD/YY
    %r 12-hour time         %c date and time         %E seconds since the epoch
    %g source path          %s source file name      %# line   %! function   %@ file:line
    %o %i %u %O time since the previous line (ms, us, ns, s)
    %+ spdlog's own default %% a percent sign        %^ %$ colour range (nothing here)

A flag may carry spdlog's padding, `%8l` (right), `%-8l` (left), `%=8l`
(centre), and `!` to cut longer values (`%3!l`). Times are local, as spdlog's.
An unknown flag is written as it stands, as spdlog does.

`ENVOY_COMPONENTS` maps Envoy's logger (component) names to ours, where a
concept matches; `%n` names our loggers by it, and `--component-log-level`
and the admin API's `/logging` can use it to reach ours.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable

ENVOY_DEFAULT_PATTERN = "[%Y-%m-%d %T.%e][%t][%l][%n] [%g:%#] %v"

# Envoy 1.40's logger names (what its /logging lists).
ENVOY_LOGGERS = (
    "a2a", "admin", "ai_protocol_manager", "alternate_protocols_cache", "aws", "assert", "backtrace", "basic_auth",
    "cache_filter", "client", "config", "connection", "conn_handler", "compression", "credential_injector",
    "decompression", "dns", "dubbo", "envoy_bug", "ext_authz", "ext_proc", "rocketmq", "file", "filter",
    "forward_proxy", "geolocation", "grpc", "happy_eyeballs", "hc", "health_checker", "http", "http2", "hystrix",
    "init", "io", "jwt", "json_rpc", "kafka", "key_value_store", "lua", "local_rate_limit", "main", "matcher", "mcp",
    "misc", "mongo", "multi_connection", "notification", "oauth2", "quic", "quic_stream", "pool",
    "rate_limit_quota", "rbac", "rds", "redis", "router", "runtime", "stats", "secret", "sse", "tap", "testing",
    "thrift", "tracing", "upstream", "udp", "wasm", "websocket", "golang", "stats_sinks", "dynamic_modules",
    "ip_tagging",
)

# Envoy's component -> our loggers that do its job (the others log nothing here).
ENVOY_COMPONENTS: dict[str, tuple[str, ...]] = {
    "main": ("proxy", "proxy.server", "proxy.workers", "proxy.localaddrs"),
    "admin": ("proxy.admin",),
    "connection": ("proxy.listener",),
    "conn_handler": ("proxy.listener",),
    "filter": ("proxy.listener",),
    "upstream": ("proxy.listener",),
    "pool": ("proxy.listener",),
}

# Our logger -> the Envoy component `%n` calls it.
COMPONENT_OF = {"proxy": "main", "proxy.server": "main", "proxy.workers": "main", "proxy.localaddrs": "main",
                "proxy.admin": "admin", "proxy.listener": "connection"}

LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error",
               logging.CRITICAL: "critical"}
SHORT_LEVELS = {"debug": "D", "info": "I", "warning": "W", "error": "E", "critical": "C"}

Part = Callable[[logging.LogRecord, "_Line"], str]
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Line:
    """What one record's line is made of: its message, its time split once,
    and the time since the line before (for %o %i %u %O)."""

    __slots__ = ("message", "created", "tm", "since")

    def __init__(self, message: str, created: float, previous: float | None) -> None:
        self.message = message
        self.created = created
        self.tm = time.localtime(created)
        self.since = 0.0 if previous is None else max(created - previous, 0.0)


def level_name(record: logging.LogRecord) -> str:
    return LEVEL_NAMES.get(record.levelno, record.levelname.lower())


def component(name: str) -> str:
    """The Envoy component name of one of our loggers (its own name when none fits)."""
    while name:
        if name in COMPONENT_OF:
            return COMPONENT_OF[name]
        name = name.rpartition(".")[0]
    return "misc"


def escape_c(text: str) -> str:
    """C-style escapes for control characters, keeping trailing whitespace (Envoy's --log-format-escaped)."""
    body = text.rstrip()
    tail = text[len(body):]
    escaped = body.encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return escaped + tail


def _source(record: logging.LogRecord) -> str:
    """The source file as Envoy's %g shows it: relative to the package's root."""
    path = record.pathname
    return os.path.relpath(path, _PACKAGE_ROOT) if path.startswith(_PACKAGE_ROOT + os.sep) else path


def _strftime(fmt: str) -> Part:
    return lambda record, line: time.strftime(fmt, line.tm)


def _offset(record: logging.LogRecord, line: _Line) -> str:
    seconds = line.tm.tm_gmtoff
    sign = "+" if seconds >= 0 else "-"
    seconds = abs(seconds)
    return f"{sign}{seconds // 3600:02d}:{seconds % 3600 // 60:02d}"


def _fraction(digits: int) -> Part:
    scale = 10 ** digits
    return lambda record, line: f"{int(line.created * scale) % scale:0{digits}d}"


FLAGS: dict[str, Part] = {
    "v": lambda r, c: c.message,
    "_": lambda r, c: escape_c(c.message),
    "j": lambda r, c: json.dumps(c.message)[1:-1],
    "l": lambda r, c: level_name(r),
    "L": lambda r, c: SHORT_LEVELS.get(level_name(r), "?"),
    "n": lambda r, c: component(r.name),
    "t": lambda r, c: str(threading.get_native_id()),
    "P": lambda r, c: str(r.process),
    "Y": _strftime("%Y"), "C": _strftime("%y"), "m": _strftime("%m"), "d": _strftime("%d"),
    "b": _strftime("%b"), "h": _strftime("%b"), "B": _strftime("%B"), "a": _strftime("%a"), "A": _strftime("%A"),
    "H": _strftime("%H"), "I": _strftime("%I"), "M": _strftime("%M"), "S": _strftime("%S"), "p": _strftime("%p"),
    "T": _strftime("%H:%M:%S"), "X": _strftime("%H:%M:%S"), "R": _strftime("%H:%M"),
    "D": _strftime("%m/%d/%y"), "x": _strftime("%m/%d/%y"), "r": _strftime("%I:%M:%S %p"),
    "c": _strftime("%a %b %d %H:%M:%S %Y"),
    "e": _fraction(3), "f": _fraction(6), "F": _fraction(9),
    "z": _offset,
    "E": lambda r, c: str(int(c.created)),
    "g": lambda r, c: _source(r),
    "s": lambda r, c: r.filename,
    "#": lambda r, c: str(r.lineno),
    "!": lambda r, c: r.funcName,
    "@": lambda r, c: f"{_source(r)}:{r.lineno}",
    "o": lambda r, c: str(int(c.since * 1e3)),
    "i": lambda r, c: str(int(c.since * 1e6)),
    "u": lambda r, c: str(int(c.since * 1e9)),
    "O": lambda r, c: str(int(c.since)),
    "^": lambda r, c: "",
    "$": lambda r, c: "",
}
FLAGS["+"] = lambda r, c: "".join(part(r, c) for part in compile_pattern("[%Y-%m-%d %H:%M:%S.%e] [%n] [%l] %v"))


def _literal(text: str) -> Part:
    return lambda record, line: text


def _padded(part: Part, align: str, width: int, cut: bool) -> Part:
    def padded(record: logging.LogRecord, line: _Line) -> str:
        text = part(record, line)
        if cut and len(text) > width:
            return text[:width]
        if align == "-":
            return text.ljust(width)
        if align == "=":
            return text.center(width)
        return text.rjust(width)
    return padded


def compile_pattern(pattern: str) -> list[Part]:
    """An spdlog pattern as a list of parts, each a function of (record, line)."""
    parts: list[Part] = []
    literal: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch != "%" or i + 1 >= n:
            literal.append(ch)
            i += 1
            continue
        j = i + 1
        align = ""
        if pattern[j] in "-=":
            align, j = pattern[j], j + 1
        digits = ""
        while j < n and pattern[j].isdigit():
            digits, j = digits + pattern[j], j + 1
        cut = j < n and pattern[j] == "!" and bool(digits) and j + 1 < n
        if cut:
            j += 1
        if j >= n:  # a pattern that ends inside a flag: the rest is text
            literal.append(pattern[i:])
            break
        flag = pattern[j]
        if flag == "%":
            literal.append("%")
        elif flag in FLAGS:
            if literal:
                parts.append(_literal("".join(literal)))
                literal = []
            part = FLAGS[flag]
            parts.append(_padded(part, align, min(int(digits), 128), cut) if digits else part)
        else:
            literal.append(pattern[i:j + 1])  # spdlog writes an unknown flag as it stands
        i = j + 1
    if literal:
        parts.append(_literal("".join(literal)))
    return parts


class SpdlogFormatter(logging.Formatter):
    """Each record as an spdlog pattern writes it (one line: a traceback follows, escaped, on the same line)."""

    def __init__(self, pattern: str = ENVOY_DEFAULT_PATTERN, escaped: bool = False) -> None:
        super().__init__()
        self.pattern = pattern
        self.escaped = escaped
        self._parts = compile_pattern(pattern)
        self._previous: float | None = None

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:  # one line still: the traceback joins the message, its newlines escaped
            message = f"{message} {self.formatException(record.exc_info)!r}"
        if self.escaped:
            message = escape_c(message)
        line = _Line(message, record.created, self._previous)
        self._previous = record.created
        return "".join(part(record, line) for part in self._parts)


def logger_levels(components: Iterable[tuple[str, str]], order: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Envoy components' levels -> our loggers' levels.

    Where several components share one of our loggers, the most verbose level
    wins (`order` lists levels from most to least verbose): a message is
    never hidden that one of them asked to see.
    """
    levels: dict[str, str] = {}
    for name, level in components:
        for ours in ENVOY_COMPONENTS.get(name, ()):
            if ours not in levels or order.index(level) < order.index(levels[ours]):
                levels[ours] = level
    return tuple(levels.items())
