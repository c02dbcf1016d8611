"""`/logging` as Envoy 1.40 answers it, with Envoy's logger names. Pure.

Envoy's loggers (components) each have a level; /logging lists them in
Envoy's order and changes them:

    POST /logging                       the list
    POST /logging?level=L               every logger
    POST /logging?NAME=L                one logger
    POST /logging?paths=N1:L1,N2:L2     several loggers
    (more than one parameter: 400 "invalid number of parameters")

An Envoy name reaches the proxy's loggers that do its job
(control/envoylog.py's ENVOY_COMPONENTS: `admin` -> proxy.admin,
`connection` -> proxy.listener, ...); one of ours that several Envoy names
reach takes the most verbose of their levels. Envoy names without a
counterpart keep their level and log nothing. The proxy's own logger names
(`proxy.listener`) are accepted too, and listed after Envoy's. A parameter
with an empty value is no parameter, as in Envoy (`?paths=` only lists).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..config import LOG_LEVELS
from ..control.envoylog import ENVOY_COMPONENTS, ENVOY_LOGGERS, logger_levels

ENVOY_LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")  # spdlog's, as /logging takes them
USAGE = ("usage: /logging?<name>=<level> (change single level)\n"
         "usage: /logging?paths=name1:level1,name2:level2,... (change multiple levels)\n"
         "usage: /logging?level=<level> (change all levels)\n"
         "usage: /logging?group=<group_name>:<level> (change group of loggers)\n"
         "levels: " + "".join(f"{level} " for level in ENVOY_LEVELS) + "\n")


class LoggingError(ValueError):
    """A /logging request Envoy refuses; str() is Envoy's reason."""


def initial_levels(level: str, components: str = "") -> dict[str, str]:
    """Every Envoy logger's level at start: -l, then --component-log-level's (a:l,b:l)."""
    levels = dict.fromkeys(ENVOY_LOGGERS, "warning" if level == "warn" else level)
    for item in filter(None, components.split(",")):
        name, _, value = item.partition(":")
        if name in levels:
            levels[name] = "warning" if value == "warn" else value
    return levels


def requested(params: Iterable[tuple[str, str]], ours: Iterable[str]) -> tuple[str | None, dict[str, str]]:
    """What a request asks: ("all", level) for ?level=, or (None, {logger: level}). Raises LoggingError."""
    given = [(k, v) for k, v in params if v != ""]
    if not given:
        return None, {}
    if len(given) != 1:
        raise LoggingError("invalid number of parameters")
    (key, value), = given
    if key == "group":
        raise LoggingError("group parameter requires fine-grain logging to be enabled")
    if key == "level":
        return _level(value), {}
    names: dict[str, str] = {}
    pairs = [(key, value)] if key != "paths" else [_pair(item) for item in value.split(",") if item.strip()]
    for name, level in pairs:
        names[name] = _level(level)
    known = set(ENVOY_LOGGERS) | set(ours)
    if any(name not in known for name in names):
        raise LoggingError("unknown logger name")
    return None, names


def _pair(item: str) -> tuple[str, str]:
    name, _, level = item.partition(":")
    if not name.strip() or not level.strip():
        raise LoggingError("empty logger name or empty logger level")
    return name, level


def _level(value: str) -> str:
    if value not in ENVOY_LEVELS:
        raise LoggingError("unknown logger level")
    return value


def ours_from(levels: Mapping[str, str]) -> list[tuple[str, str]]:
    """Our loggers' levels that Envoy's levels make (the most verbose of those reaching each)."""
    return list(logger_levels(((n, lv) for n, lv in levels.items() if n in ENVOY_COMPONENTS), LOG_LEVELS))


def listing(levels: Mapping[str, str], ours: Mapping[str, str]) -> str:
    """Envoy's list (its loggers in its order), then ours, and the blank line Envoy ends with."""
    lines = [f"  {name}: {level}\n" for name, level in levels.items()]
    lines += [f"  {name}: {level}\n" for name, level in sorted(ours.items())]
    return "active loggers:\n" + "".join(lines) + "\n"
