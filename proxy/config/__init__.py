"""The proxy's configuration: one model of frozen dataclasses, validated once.

The rest of the proxy imports from here, never from the modules inside.
"""

from .load import (
    DIRECTIONS, LOG_FORMATS, LOG_LEVELS, LOOPS, SETTINGS, SPLICE_MODES, Chain, Cluster, Config, ConfigError,
    Endpoint, Match, PlainListener, check_ambiguous, from_data, load, parse_duration,
)

__all__ = [
    "DIRECTIONS", "LOG_FORMATS", "LOG_LEVELS", "LOOPS", "SETTINGS", "SPLICE_MODES", "Chain", "Cluster", "Config",
    "ConfigError", "Endpoint", "Match", "PlainListener", "check_ambiguous", "from_data", "load", "parse_duration",
]
