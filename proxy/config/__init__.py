"""The proxy's configuration: one model of frozen dataclasses, validated once.

model.py   the dataclasses and the defaults (the design note's numbers)
values.py  one parser per kind of value; ConfigError names where a value came from
load.py    YAML (with line numbers), environment and flags -> one Config

The rest of the proxy imports from here, never from the modules inside.
"""

from .load import check_ambiguous, from_data, load
from .model import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_MARK,
    DEFAULT_PORT,
    DIRECTIONS,
    LOG_FORMATS,
    LOG_LEVELS,
    LOOPS,
    NET_CLS_ID,
    PROXY_UID,
    SPLICE_MODES,
    Chain,
    Cluster,
    Config,
    Endpoint,
    IPNetwork,
    Match,
    PlainListener,
    hostport,
)
from .values import SETTINGS, ConfigError, parse_duration

__all__ = [
    "DEFAULT_ADMIN_PORT", "DEFAULT_MARK", "DEFAULT_PORT", "DIRECTIONS", "LOG_FORMATS", "LOG_LEVELS", "LOOPS",
    "NET_CLS_ID", "PROXY_UID", "SETTINGS", "SPLICE_MODES", "Chain", "Cluster", "Config", "ConfigError", "Endpoint",
    "IPNetwork", "Match", "PlainListener", "check_ambiguous", "from_data", "hostport", "load", "parse_duration",
]
