"""Envoy's v3 bootstrap as a second front end of the one model (Config).

    schema.py    Envoy's schema (xds-protos): plain data -> a Bootstrap message, unknown fields refused
    validate.py  the protoc-gen-validate rules the messages carry, which protobuf does not check
    build.py     the Bootstrap -> the model: the transparent-TCP subset, every other field refused
                 or (if only operational) named as ignored; its top level and the admin address
    clusters.py  STATIC and ORIGINAL_DST clusters
    listeners.py listeners, filter chains and their matches
    tcp_proxy.py what a chain does: tcp_proxy and its access logs
    fields.py    what those share: built / ignored / refused, names, addresses
    formats.py   Envoy's access-log format strings, checked as Envoy checks them

`load_bootstrap` reads a bootstrap as `envoy -c FILE [--config-yaml YAML]`
does: the file by its extension (.yaml/.yml YAML, .pb binary, .pb_text text
format, anything else JSON), the inline YAML merged over it with protobuf's
MergeFrom (a scalar replaces, a list appends, a message merges: checked
against Envoy 1.40's /config_dump). `from_bootstrap` takes data already read
(`sidecar-proxy check --config envoy.yaml`, which tells a bootstrap from our
YAML by its top-level keys: `is_bootstrap`).

This module imports nothing heavy: the generated protobuf modules load only
when a bootstrap is read.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import yaml

from ..document import Limits, decode, read_bytes
from ..model import DEFAULT_TPROXY_MARK, Config
from ..source import line_for, read_yaml
from ..values import ConfigError

# Bootstrap's top-level fields (envoy.config.bootstrap.v3.Bootstrap), by proto name.
BOOTSTRAP_KEYS = frozenset((
    "node", "node_context_params", "static_resources", "dynamic_resources", "cluster_manager", "hds_config",
    "flags_path", "stats_sinks", "deferred_stat_options", "stats_config", "stats_flush_interval",
    "stats_flush_on_admin", "stats_eviction_interval", "watchdog", "watchdogs", "tracing", "layered_runtime", "admin",
    "overload_manager", "enable_dispatcher_stats", "header_prefix", "stats_server_version_override",
    "use_tcp_for_dns_lookups", "dns_resolution_config", "typed_dns_resolver_config", "bootstrap_extensions",
    "fatal_actions", "config_sources", "default_config_source", "default_socket_interface",
    "certificate_provider_instances", "inline_headers", "perf_tracing_file_path", "default_regex_engine",
    "xds_delegate_extension", "xds_config_tracker_extension", "listener_manager", "application_log_config",
    "grpc_async_client_manager_config", "memory_allocator_manager",
))

ENVOY_VERSION = "1.40.0"  # the Envoy whose bootstrap and command line this follows


def snake(name: str) -> str:
    """A JSON name (staticResources) as its proto name (static_resources)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def is_bootstrap(data: Any) -> bool:
    """Whether plain data is an Envoy bootstrap rather than our YAML: a top-level key of Bootstrap's."""
    return isinstance(data, dict) and any(isinstance(k, str) and snake(k) in BOOTSTRAP_KEYS for k in data)


@dataclasses.dataclass(frozen=True)
class Options:
    """What Envoy's command line says about the bootstrap."""

    config_path: str = ""
    config_yaml: str = ""
    allow_unknown: bool = False  # --allow-unknown-static-fields
    service_cluster: str = ""
    service_node: str = ""
    service_zone: str = ""


def load_bootstrap(options: Options) -> Config:
    """A Config from Envoy's -c file and --config-yaml, as Envoy reads them."""
    if not options.config_path and not options.config_yaml:
        raise ConfigError("", "At least one of --config-path or --config-yaml or Options::configProto() should be "
                              "non-empty")
    from . import schema
    lines: dict[str, int] = {}
    source = options.config_path or "--config-yaml"
    try:
        bootstrap = schema.bootstrap_class()()
        if options.config_path:
            bootstrap, lines = _read(options.config_path, options.allow_unknown)
        if options.config_yaml:
            data, _ = _yaml(options.config_yaml, "--config-yaml")
            bootstrap.MergeFrom(schema.parse(data, options.allow_unknown))
            lines = {}  # a field's line in the file no longer says where its value came from
        return _config(bootstrap, options)
    except ConfigError as exc:
        if exc.source is not None:
            raise
        raise ConfigError(exc.where, exc.message, source=source, line=line_for(exc.where, lines)) from None


def from_bootstrap(data: Any, lines: Mapping[str, int] | None = None, source: str | None = None,
                   options: Options | None = None) -> Config:
    """A Config from a bootstrap already read as plain data."""
    from . import schema
    try:
        return _config(schema.parse(data, options.allow_unknown if options else False), options or Options())
    except ConfigError as exc:
        if exc.source is not None or source is None:
            raise
        raise ConfigError(exc.where, exc.message, source=source,
                          line=line_for(exc.where, _snake_lines(lines or {}))) from None


def _config(bootstrap: Any, options: Options) -> Config:
    from . import build, schema, validate
    validate.check(bootstrap)
    built = build.build(bootstrap)
    data = schema.to_data(bootstrap)
    admin_address, admin_port = built.admin if built.admin is not None else ("127.0.0.1", None)
    return Config(
        listeners=built.listeners, clusters=built.clusters,
        access_log="off",  # Envoy writes only the access logs a tcp_proxy configures
        admin_address=admin_address, admin_port=admin_port,
        admin_allow_remote=True,  # Envoy serves its admin API where the bootstrap says
        bootstrap=data,
        envoy_node=build.node_with(data.get("node", {}), options.service_cluster, options.service_node,
                             options.service_zone),
        ignored=built.ignored,
        inbound_mode=built.inbound_mode,
        tproxy_mark=built.tproxy_mark if built.tproxy_mark is not None else DEFAULT_TPROXY_MARK,
    )


# A bootstrap may be larger than our own config: a whole mesh's static clusters.
BOOTSTRAP_LIMITS = Limits(max_bytes=16 << 20, max_depth=100, max_values=1_000_000)


def _read(path: str, allow_unknown: bool) -> tuple[Any, dict[str, int]]:
    """The -c file by its extension, as Envoy's MessageUtil::loadFromFile reads it."""
    from . import schema
    raw = read_bytes(path, BOOTSTRAP_LIMITS, what="a bootstrap")
    if path.endswith(".pb"):
        return schema.read_binary(raw, allow_unknown), {}
    text = decode(raw, path)
    if path.endswith(".pb_text"):
        return schema.read_text(text), {}
    if path.endswith((".yaml", ".yml")):
        data, lines = _yaml(text, path)
        lines = _snake_lines(lines)
        try:
            return schema.parse(data, allow_unknown), lines
        except ConfigError as exc:
            raise ConfigError(exc.where, exc.message, source=path, line=line_for(exc.where, lines)) from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError("", f"Unable to parse JSON as proto ({exc})", source=path) from None
    except RecursionError:
        raise ConfigError("", "Unable to parse JSON as proto (nested too deep)", source=path) from None
    return schema.parse(data, allow_unknown), {}


def _yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """YAML as Envoy reads it: an empty document is an error, a repeated key keeps its last value."""
    data, lines = read_yaml(text, source, BOOTSTRAP_LIMITS, loader=EnvoyYamlLoader, duplicates=True)
    if data is None:
        raise ConfigError("", "Unable to convert YAML as JSON: an empty document", source=source)
    return data, lines


class EnvoyYamlLoader(yaml.SafeLoader):
    """YAML's plain scalars read as Envoy's YAML reader (yaml-cpp) reads them, checked with
    Envoy 1.40: y/Y/n/N are booleans too; 1_000, .inf and 2026-01-01 are strings;
    0x10 is a number. PyYAML (YAML 1.1) would read the first three as numbers and a date."""

    bool_values: ClassVar[dict[str, bool]] = {**yaml.SafeLoader.bool_values, "y": True, "n": False}


_PLAIN = (
    ("tag:yaml.org,2002:bool",
     r"^(?:y|Y|n|N|yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$", "yYnNtTfFoO"),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?(?:0|[1-9][0-9]*)|0x[0-9a-fA-F]+|0o?[0-7]+)$", "-+0123456789"),
    ("tag:yaml.org,2002:float", r"^[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*|[0-9]+)(?:[eE][-+]?[0-9]+)?$", "-+.0123456789"),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
)
EnvoyYamlLoader.yaml_implicit_resolvers = {}
for _tag, _regexp, _first in _PLAIN:
    EnvoyYamlLoader.add_implicit_resolver(_tag, re.compile(_regexp), list(_first))


def _snake_lines(lines: Mapping[str, int]) -> dict[str, int]:
    """Lines by field path, also under proto names when the file used JSON names."""
    out = dict(lines)
    for where, line in lines.items():
        out.setdefault(re.sub(r"[A-Za-z0-9]+", lambda m: snake(m.group(0)), where), line)
    return out
