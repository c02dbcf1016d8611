"""Value parsers: each takes (value, where) and returns the value or raises
ConfigError(where, ...), whichever source the value came from (a file, an
environment variable, a flag): `where` names it.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import reprlib
from collections.abc import Callable
from typing import Any

from .model import (
    DRAIN_STRATEGIES,
    LOG_FORMATS,
    LOG_LEVELS,
    LOOPS,
    MAX_CONCURRENCY,
    MAX_CONNECTIONS,
    SPLICE_MODES,
    Endpoint,
    IPNetwork,
)

MESSAGE_LIMIT = 300  # characters of a ConfigError's message


class ConfigError(Exception):
    """A configuration value that cannot be used; str() is the one-line message."""

    def __init__(self, where: str, message: str, *, source: str | None = None, line: int | None = None):
        self.where, self.message, self.source, self.line = where, message, source, line
        prefix = ""
        if source:
            prefix = f"{source}:{line}: " if line else f"{source}: "
        if len(message) > MESSAGE_LIMIT:  # a library's text may quote a whole value
            message = message[:MESSAGE_LIMIT - 3] + "..."
        super().__init__(f"{prefix}{where}: {message}" if where else f"{prefix}{message}")


def as_list(value: Any, where: str) -> list[Any]:
    """`value` if it is a list, else a ConfigError at `where`."""
    if not isinstance(value, list):
        raise ConfigError(where, f"expected a list, got {type(value).__name__}")
    return value


def parse_port(value: Any, where: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) <= 5:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(where, f"{short(value)} is not a port")
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ConfigError(where, f"{short(value)} is not a port ({low}-65535)")
    return value


def parse_concurrency(value: Any, where: str) -> int:
    """1 to MAX_CONCURRENCY worker processes (an int, or its digits in a string from a flag),
    or `auto`: one per CPU this process may run on (its affinity, which a cgroup's
    cpuset narrows), at most MAX_CONCURRENCY."""
    if value == "auto":
        return auto_concurrency()
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) <= 3:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENCY:
        raise ConfigError(where, f"{short(value)} is not a number of workers (1-{MAX_CONCURRENCY}, or auto)")
    return value


def auto_concurrency() -> int:
    """`concurrency: auto`: a worker per CPU this process may run on, 1 to MAX_CONCURRENCY."""
    return min(max(len(os.sched_getaffinity(0)), 1), MAX_CONCURRENCY)


def parse_connections(value: Any, where: str) -> int:
    """A number of connections, 1 to MAX_CONNECTIONS (an int, or its ASCII digits from a flag)."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) <= 9:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONNECTIONS:
        raise ConfigError(where, f"{short(value)} is not a number of connections (1-{MAX_CONNECTIONS})")
    return value


def parse_access_log(value: Any, where: str) -> str:
    """stderr, stdout, off or a file path; YAML reads a bare off as false."""
    return "off" if value is False else parse_path(value, where)


# How inbound connections reach the proxy (iptables/redirect.sh --inbound-mode):
# nat REDIRECT, or TPROXY (the app then sees the client's address).
INBOUND_MODES = ("redirect", "tproxy")
# Where the proxy's connection to the app comes from with REDIRECT: the pod's
# address (the kernel's choice), or Istio's InboundPassthroughBindIpv4 (::6 for IPv6).
INBOUND_SOURCES = ("pod-ip", "127.0.0.6")


def parse_splice(value: Any, where: str) -> str:
    """auto or off; YAML reads a bare off as false (and on as true), so those count too."""
    if value is False or value is True:
        return "auto" if value else "off"
    return parse_choice(SPLICE_MODES)(value, where)


def parse_mark(value: Any, where: str) -> int:
    """An SO_MARK value: an integer or a string in any base Python reads (0x1)."""
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise ConfigError(where, f"{short(value)} is not a mark (an integer such as 0x1)") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 0xFFFFFFFF:
        raise ConfigError(where, f"{short(value)} is not a mark (1-0xffffffff)")
    return value


MAX_DURATION = 365 * 86400.0  # a year: anything longer is a typo, or NaN/inf
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any, where: str) -> float:
    """Seconds as a number, or a string such as 250ms, 5s, 2m, 1h."""
    if isinstance(value, bool):
        raise ConfigError(where, f"{short(value)} is not a duration")
    try:
        if isinstance(value, (int, float)):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION.match(value)):
            seconds = float(m.group(1)) * _UNIT[m.group(2)]
        else:
            raise ConfigError(where, f"{short(value)} is not a duration (e.g. 5s, 250ms, 1h)")
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ConfigError(where, f"{short(value)} is not a duration of at most {MAX_DURATION // 86400:g} days")
    if seconds <= 0:
        raise ConfigError(where, f"{short(value)} must be positive")
    return seconds


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 40
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 2, 4, 3


def short(value: Any) -> str:
    """A value for an error message, cut to 40 characters, whatever it holds."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an integer of more than 4,300 digits has no repr
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else "a value"
    return text if len(text) <= 40 else text[:37] + "..."


def parse_network(value: Any, where: str) -> IPNetwork:
    if not isinstance(value, str):
        raise ConfigError(where, f"{short(value)} is not a CIDR")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ConfigError(where, f"{short(value)} is not a CIDR ({exc})") from None


def parse_address(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(where, f"{short(value)} is not an IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(where, f"{short(value)} is not an IP address") from None


def parse_endpoint(value: Any, where: str) -> Endpoint:
    """`198.51.100.10:80` or `[2001:db8::10]:80`."""
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(where, f"{short(value)} is not an endpoint (HOST:PORT, [V6]:PORT)")
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(where, f"{short(value)}: write an IPv6 endpoint as [ADDRESS]:PORT")
    return Endpoint(parse_address(host, where), parse_port(port, where))


def parse_choice(choices: tuple[str, ...]) -> Callable[[Any, str], str]:
    def parse(value: Any, where: str) -> str:
        if value not in choices:
            raise ConfigError(where, f"{short(value)} is not one of {', '.join(choices)}")
        return str(value)
    return parse


NAME = re.compile(r"[A-Za-z0-9_.|-]+")  # | for Istio's cluster names: outbound|80||reviews.default.svc.cluster.local


def parse_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ConfigError(where, f"{short(value)} is not a name (letters, digits, _ . - |)")
    return value


def parse_text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(where, f"{short(value)} is not a non-empty string")
    return value


def parse_path(value: Any, where: str) -> str:
    """A file or directory path: a non-empty string without NUL (no system call takes one)."""
    path = parse_text(value, where)
    if "\0" in path:
        raise ConfigError(where, f"{short(value)} holds a NUL byte, which no path can")
    return path


def parse_bool(value: Any, where: str) -> bool:
    """true/false in YAML; also the strings true, false, 1, 0, yes, no (flags, env)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ConfigError(where, f"{short(value)} is not a boolean (true or false)")


def parse_names(value: Any, where: str) -> tuple[str, ...]:
    """Host names: a list, or comma-separated in a string (a flag)."""
    items = value.split(",") if isinstance(value, str) else as_list(value, where)
    names = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or not re.fullmatch(r"[A-Za-z0-9.:_-]+", item.strip()):
            raise ConfigError(f"{where}[{i}]", f"{short(item)} is not a host name")
        names.append(item.strip())
    return tuple(names)


def parse_admin_port(value: Any, where: str) -> int | None:
    """A port; 0 (or null) is no admin API, `ephemeral` a port the kernel picks (see model.Config)."""
    if value is None:
        return None
    if value == "ephemeral":
        return 0
    return parse_port(value, where, allow_zero=True) or None


def parse_mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(where, f"expected a mapping, got {type(value).__name__}")
    return value


def parse_texts(value: Any, where: str) -> tuple[str, ...]:
    return tuple(parse_text(v, f"{where}[{i}]") for i, v in enumerate(as_list(value, where)))


def parse_logger_levels(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """[[logger, level], ...]: levels of single loggers."""
    pairs = []
    for i, item in enumerate(as_list(value, where)):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ConfigError(f"{where}[{i}]", f"{short(item)} is not a pair [logger, level]")
        pairs.append((parse_text(item[0], f"{where}[{i}][0]"), parse_choice(LOG_LEVELS)(item[1], f"{where}[{i}][1]")))
    return tuple(pairs)


def parse_addresses(value: Any, where: str) -> tuple[str, ...]:
    items = as_list(value, where)
    if not items:
        raise ConfigError(where, "needs at least one address")
    return tuple(parse_address(v, f"{where}[{i}]") for i, v in enumerate(items))


# Top-level settings that flags and env vars may also set: name -> parser.
SETTINGS: dict[str, Callable[[Any, str], Any]] = {
    "mark": parse_mark,
    "cgroup": parse_path,
    "loop": parse_choice(LOOPS),
    "concurrency": parse_concurrency,
    "log_format": parse_choice(LOG_FORMATS),
    "log_level": parse_choice(LOG_LEVELS),
    "access_log": parse_access_log,
    "connect_timeout": parse_duration,
    "idle_timeout": parse_duration,
    "drain_timeout": parse_duration,
    "splice": parse_splice,
    "inbound_mode": lambda value, where: parse_choice(INBOUND_MODES)(
        value.lower() if value in ("REDIRECT", "TPROXY") else value, where),  # Istio spells them so
    "tproxy_mark": parse_mark,
    "inbound_source": parse_choice(INBOUND_SOURCES),
    "admin_address": parse_address,
    "admin_port": parse_admin_port,
    "admin_allow_remote": parse_bool,
    "admin_hosts": parse_names,
    "max_connections": parse_connections,
    "admin_address_path": parse_text,
    "log_pattern": parse_text,
    "logger_levels": parse_logger_levels,
    "drain_time": parse_duration,
    "drain_strategy": parse_choice(DRAIN_STRATEGIES),
    "bootstrap": parse_mapping,
    "envoy_node": parse_mapping,
    "command_line": parse_mapping,
    "ignored": parse_texts,
}

# The short form of the redirected listener (with `chains` and `plain_listeners`):
# settings too, but they make a listener rather than set a field of Config.
SHORT_FORM: dict[str, Callable[[Any, str], Any]] = {
    "port": parse_port,
    "addresses": parse_addresses,
    "default_action": parse_choice(("original", "reject")),
    "redirect_max_connections": parse_connections,  # the redirected port's listener's max_connections
}

# Settings whose absence means "off": `mark: null` in a file is the same as no mark.
OPTIONAL = ("mark", "cgroup", "max_connections", "admin_address_path", "log_pattern", "bootstrap", "envoy_node",
            "command_line")

# The environment variables the proxy honours: the design note's, Istio's names for
# inbound interception, and the event loop, which `sidecar-envoy` can take from nowhere
# else (Envoy's command line has no flag for it, and a harness that runs `envoy ARGS`
# must run it unchanged).
LOOP_ENV = "SIDECAR_PROXY_LOOP"
ENVIRONMENT = {"ISTIO_PROXY_PORT": "port", "ISTIO_SO_MARK": "mark",
               # Istio's names, as iptables/redirect.sh reads them
               "INBOUND_INTERCEPTION_MODE": "inbound_mode", "INBOUND_TPROXY_MARK": "tproxy_mark",
               LOOP_ENV: "loop"}
