"""Envoy's access-log format strings, for TCP: parsed once when the config is
loaded, rendered once per finished connection (datapath/accesslog.py).

A format is text with `%OPERATOR%` or `%OPERATOR(ARG)%` in it (`%%` is a
percent sign). The operators are Envoy's command operators that mean
something for a TCP connection; the HTTP ones (`%REQ(...)%`, `%PROTOCOL%`,
...) render as Envoy renders them for a connection without requests ("-",
or 0 for codes). An operator Envoy does not know is a config error, as in
Envoy ("Not supported field in StreamInfo").

`render` takes a connection as plain data (an access-log entry: see
`FIELDS`) and returns the line.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

# Envoy's default format (its file access logger without a format), whose
# HTTP fields read "-" or 0 for a TCP connection.
DEFAULT = ('[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
           '%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
           '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
           '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n')

# What an entry carries (the access log's entry, relay.Relay.describe plus its end):
FIELDS = ("id", "start", "source", "destination", "chain", "cluster", "upstream", "upstream_local",
          "bytes_up", "bytes_down", "duration_ms", "end")

# How a connection ended -> Envoy's response flags (short, long), as Envoy 1.40 writes
# them for tcp_proxy (tests/envoy/test_datapath_conformance.py): a connection whose
# every attempt failed has used up its attempts too (URX), whatever max_connect_attempts.
FLAGS = {
    "connect_failed": ("UF,URX", "UpstreamConnectionFailure,UpstreamRetryLimitExceeded"),
    "connect_timeout": ("UF,URX", "UpstreamConnectionFailure,UpstreamRetryLimitExceeded"),
    "upstream_overflow": ("UO", "UpstreamOverflow"),
    "no_healthy_upstream": ("UH", "NoHealthyUpstream"),
    "no_route": ("NC", "NoClusterFound"),
}

Entry = Mapping[str, Any]
Part = Callable[[Entry], str]

_TOKEN = re.compile(r"%([A-Z_0-9]+)(?:\(([^)]*)\))?(?::(\d+))?%|%%")


def _address(key: str, part: str = "all") -> Part:
    """An address of the entry: whole, without its port, or its port alone ("-" if there is none)."""
    def render(entry: Entry) -> str:
        value = str(entry.get(key) or "-")
        if value == "-":
            return "-"
        host, _, port = value.rpartition(":")
        if part == "host":
            return host.strip("[]")
        return port if part == "port" else value
    return render


def _field(key: str) -> Part:
    return lambda entry: "-" if entry.get(key) in (None, "") else str(entry[key])


def _flags(index: int) -> Part:
    return lambda entry: FLAGS.get(entry.get("end") or "", ("-", "-"))[index]


def _duration(entry: Entry) -> str:
    return str(int(entry["duration_ms"]))


def _start_time(fmt: str | None) -> Part:
    """Envoy's START_TIME: ISO 8601 with milliseconds by default; strftime with %1f-%9f and %s."""
    if not fmt:
        return lambda entry: _strftime("%Y-%m-%dT%H:%M:%S.%3fZ", entry["start"])
    return lambda entry: _strftime(fmt, entry["start"])


def _strftime(fmt: str, seconds: float) -> str:
    def fraction(match: re.Match[str]) -> str:
        digits = int(match.group(1) or 9)
        return f"{seconds % 1:.9f}"[2:2 + digits]
    fmt = re.sub(r"%(\d)?f", fraction, fmt).replace("%s", str(int(seconds)))
    return time.strftime(fmt, time.gmtime(seconds))


_HOSTNAME = socket.gethostname()

# operator -> how it renders (a function of its argument, or of nothing)
_SIMPLE: dict[str, Part] = {
    "BYTES_RECEIVED": lambda e: str(e["bytes_up"]),
    "BYTES_SENT": lambda e: str(e["bytes_down"]),
    "DURATION": _duration,
    "DOWNSTREAM_REMOTE_ADDRESS": _address("source"),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": _address("source", "host"),
    "DOWNSTREAM_REMOTE_PORT": _address("source", "port"),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": _address("source"),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT": _address("source", "host"),
    "DOWNSTREAM_LOCAL_ADDRESS": _address("destination"),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": _address("destination", "host"),
    "DOWNSTREAM_LOCAL_PORT": _address("destination", "port"),
    "UPSTREAM_HOST": _address("upstream"),
    "UPSTREAM_REMOTE_ADDRESS": _address("upstream"),
    "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": _address("upstream", "host"),
    "UPSTREAM_REMOTE_PORT": _address("upstream", "port"),
    "UPSTREAM_LOCAL_ADDRESS": _address("upstream_local"),
    "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": _address("upstream_local", "host"),
    "UPSTREAM_LOCAL_PORT": _address("upstream_local", "port"),
    "UPSTREAM_CLUSTER": _field("cluster"),
    "UPSTREAM_CLUSTER_RAW": _field("cluster"),
    "CONNECTION_ID": _field("id"),
    "FILTER_CHAIN_NAME": _field("chain"),
    "RESPONSE_FLAGS": _flags(0),
    "RESPONSE_FLAGS_LONG": _flags(1),
    "HOSTNAME": lambda e: _HOSTNAME,
    # HTTP's, for a connection without requests
    "PROTOCOL": lambda e: "-",
    "RESPONSE_CODE": lambda e: "0",
    "RESPONSE_CODE_DETAILS": lambda e: "-",
    "UPSTREAM_TRANSPORT_FAILURE_REASON": lambda e: "-",
    "CONNECTION_TERMINATION_DETAILS": lambda e: "-",
    "REQUESTED_SERVER_NAME": lambda e: "-",
    "ROUTE_NAME": lambda e: "-",
    "UPSTREAM_WIRE_BYTES_SENT": lambda e: str(e["bytes_up"]),
    "UPSTREAM_WIRE_BYTES_RECEIVED": lambda e: str(e["bytes_down"]),
    "DOWNSTREAM_WIRE_BYTES_SENT": lambda e: str(e["bytes_down"]),
    "DOWNSTREAM_WIRE_BYTES_RECEIVED": lambda e: str(e["bytes_up"]),
}
_WITH_ARGUMENT: dict[str, Callable[[str], Part]] = {
    "REQ": lambda arg: lambda e: "-",
    "RESP": lambda arg: lambda e: "-",
    "TRAILER": lambda arg: lambda e: "-",
    "DYNAMIC_METADATA": lambda arg: lambda e: "-",
    "FILTER_STATE": lambda arg: lambda e: "-",
    "ENVIRONMENT": lambda arg: lambda e: "-",
}


def compile_format(fmt: str) -> Callable[[Entry], str]:
    """A renderer for `fmt`; ValueError names the first operator it cannot render."""
    parts: list[str | Part] = []
    last = 0
    for match in _TOKEN.finditer(fmt):
        parts.append(fmt[last:match.start()])
        last = match.end()
        if match.group(0) == "%%":
            parts.append("%")
            continue
        name, arg, length = match.group(1), match.group(2), match.group(3)
        if name == "START_TIME":
            part = _start_time(arg)
        elif name in _SIMPLE and arg is None:
            part = _SIMPLE[name]
        elif name in _WITH_ARGUMENT and arg is not None:
            part = _WITH_ARGUMENT[name](arg)
        else:
            raise ValueError(f"%{name}{'(' + arg + ')' if arg is not None else ''}% is not an operator "
                             "of Envoy's TCP access log")
        parts.append(_truncated(part, int(length)) if length else part)
    parts.append(fmt[last:])
    pieces = [p for p in parts if p != ""]

    def render(entry: Entry) -> str:
        return "".join(p if isinstance(p, str) else p(entry) for p in pieces)
    return render


def _truncated(part: Part, length: int) -> Part:
    return lambda entry: part(entry)[:length]
