"""The proxy's configuration: one model of frozen dataclasses, validated once.

model.py   the dataclasses and the defaults (the design note's numbers)
values.py  one parser per kind of value; ConfigError names where a value came from
document.py reading YAML or JSON within limits (size, encoding, depth, aliases)
source.py  reading a file: YAML with the line of every value, and checks of plain data
load.py    our YAML (short form or long), environment and flags -> one Config
methods.py the four bypass methods, for the tools

The rest of the proxy imports from here, never from the modules inside.
"""

from .document import Document, Limits, parse_json, parse_yaml, parse_yaml_stream
from .load import check_ambiguous, from_data, load
from .logformat import DEFAULT as ENVOY_LOG_FORMAT
from .logformat import compile_format
from .model import (
    BLACKHOLE,
    DEFAULT_ADMIN_PORT,
    DEFAULT_CLEANUP_INTERVAL,
    DEFAULT_MARK,
    DEFAULT_PORT,
    DIRECTIONS,
    DRAIN_STRATEGIES,
    INBOUND_PASSTHROUGH_V4,
    INBOUND_PASSTHROUGH_V6,
    LOG_FORMATS,
    LOG_LEVELS,
    LOOPS,
    NET_CLS_ID,
    ORIGINAL_DST,
    PASSTHROUGH,
    PROXY_UID,
    SPLICE_MODES,
    AccessLog,
    Chain,
    Cluster,
    Config,
    Endpoint,
    IPNetwork,
    Listener,
    Match,
    WeightedCluster,
    hostport,
    plain_listener,
    redirect_listener,
)
from .values import LOOP_ENV, SETTINGS, SHORT_FORM, ConfigError, parse_duration

__all__ = [
    "BLACKHOLE",
    "DEFAULT_ADMIN_PORT",
    "DEFAULT_CLEANUP_INTERVAL",
    "DEFAULT_MARK",
    "DEFAULT_PORT",
    "DIRECTIONS",
    "DRAIN_STRATEGIES",
    "ENVOY_LOG_FORMAT",
    "INBOUND_PASSTHROUGH_V4",
    "INBOUND_PASSTHROUGH_V6",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "LOOPS",
    "LOOP_ENV",
    "NET_CLS_ID",
    "ORIGINAL_DST",
    "PASSTHROUGH",
    "PROXY_UID",
    "SETTINGS",
    "SHORT_FORM",
    "SPLICE_MODES",
    "AccessLog",
    "Chain",
    "Cluster",
    "Config",
    "ConfigError",
    "Document",
    "Endpoint",
    "IPNetwork",
    "Limits",
    "Listener",
    "Match",
    "WeightedCluster",
    "check_ambiguous",
    "compile_format",
    "from_data",
    "hostport",
    "load",
    "parse_duration",
    "parse_json",
    "parse_yaml",
    "parse_yaml_stream",
    "plain_listener",
    "redirect_listener",
]
