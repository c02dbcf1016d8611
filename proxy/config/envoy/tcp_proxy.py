"""tcp_proxy -> what a filter chain does: its cluster (or weighted clusters),
stat prefix, idle timeout, connect attempts and access logs (Envoy's file,
stdout and stderr loggers, with a text format checked as Envoy checks it).
"""

from __future__ import annotations

import os
from typing import Any

from ..logformat import compile_format
from ..model import AccessLog, Chain, Cluster, Match, WeightedCluster
from ..values import ConfigError
from . import schema
from .fields import Fields, model_name, seconds, type_name
from .formats import check_format

ENVOY_IDLE_TIMEOUT = 3600.0  # TcpProxy.idle_timeout's default
FILE_LOG = "envoy.extensions.access_loggers.file.v3.FileAccessLog"
STREAM_LOGS = {"envoy.extensions.access_loggers.stream.v3.StdoutAccessLog": "/dev/stdout",
               "envoy.extensions.access_loggers.stream.v3.StderrAccessLog": "/dev/stderr"}

TCP_PROXY_BUILT = ("stat_prefix", "cluster", "weighted_clusters", "idle_timeout", "access_log",
                   "max_connect_attempts", "upstream_connect_mode")
TCP_PROXY_IGNORED = ("backoff_options", "hash_policy", "access_log_flush_interval", "flush_access_log_on_connected",
                     "access_log_options")


def tcp_proxy(tcp: Any, where: str, name: str, match: Match, clusters: dict[str, Cluster], fields: Fields) -> Chain:
    fields.only(tcp, where, built=TCP_PROXY_BUILT, ignored=TCP_PROXY_IGNORED)
    if tcp.upstream_connect_mode != 0:
        raise ConfigError(f"{where}.upstream_connect_mode", "not supported (only IMMEDIATE)")
    weighted: tuple[WeightedCluster, ...] = ()
    if tcp.HasField("weighted_clusters"):
        picks = []
        for i, pick in enumerate(tcp.weighted_clusters.clusters):
            at = f"{where}.weighted_clusters.clusters[{i}]"
            fields.only(pick, at, built=("name", "weight"), why="metadata_match needs subsets, which are not "
                                                                "supported")
            picks.append(WeightedCluster(model_name(pick.name), int(pick.weight)))
        weighted = tuple(picks)
        wanted = [(f"{where}.weighted_clusters.clusters[{i}].name", p.name) for i, p in enumerate(weighted)]
    else:
        wanted = [(f"{where}.cluster", model_name(tcp.cluster))]
    missing = [(path, cluster) for path, cluster in wanted if cluster not in clusters]
    common = dict(name=name, match=match, stat_prefix=tcp.stat_prefix,
                  idle_timeout=_idle(tcp), max_connect_attempts=int(tcp.max_connect_attempts.value)
                  if tcp.HasField("max_connect_attempts") else 1,
                  access_logs=tuple(_access_log(log, f"{where}.access_log[{i}]", fields)
                                    for i, log in enumerate(tcp.access_log)))
    if missing:  # Envoy takes it, and closes each connection for want of a cluster
        for path, cluster in missing:
            fields.note(path, f"no cluster is named {cluster!r}: the chain's connections are closed, as Envoy's")
        return Chain(action="close", **common)
    first = weighted[0].name if weighted else model_name(tcp.cluster)
    return Chain(action="cluster", cluster=first, weighted=weighted, **common)


def _idle(tcp: Any) -> float:
    """Envoy's default when unset; 0 (disabled, Envoy's 0s) is the model's "never" too."""
    return seconds(tcp.idle_timeout) if tcp.HasField("idle_timeout") else ENVOY_IDLE_TIMEOUT


def _access_log(log: Any, where: str, fields: Fields) -> AccessLog:
    """tcp_proxy's access_log: Envoy's file logger (or stdout/stderr) with a text format."""
    fields.only(log, where, built=("name", "typed_config"), ignored=("filter",))
    if not log.HasField("typed_config"):
        raise ConfigError(where, f"Didn't find a registered implementation for '{log.name}' with type URL: ''")
    at = f"{where}.typed_config"
    kind = type_name(log.typed_config)
    config = schema.unpack(log.typed_config, at)
    if kind in STREAM_LOGS:
        fields.only(config, at, built=("log_format",))
        path = STREAM_LOGS[kind]
    elif kind == FILE_LOG:
        fields.only(config, at, built=("path", "format", "log_format"), ignored=("json_format", "typed_json_format"))
        path = config.path
    else:
        raise ConfigError(at, f"not supported (access logger {kind}: the file, stdout and stderr ones are)")
    fmt = None
    if kind == FILE_LOG and config.format:
        fmt = config.format
    if config.HasField("log_format"):
        fmt = _format_string(config.log_format, f"{at}.log_format", fields)
    if fmt is not None:
        check_format(fmt, at)  # Envoy's verdict first, then whether the data path can write it
        try:
            compile_format(fmt)
        except ValueError as exc:
            raise ConfigError(at, f"not supported ({exc})") from None
    return AccessLog(path=path, format=fmt)


def _format_string(sfs: Any, where: str, fields: Fields) -> str | None:
    """A SubstitutionFormatString's text (None: JSON, which is not built; Envoy's default format then)."""
    fields.only(sfs, where, built=("text_format", "text_format_source"),
                ignored=("json_format", "omit_empty_values", "content_type", "formatters", "json_format_options"))
    if sfs.WhichOneof("format") == "text_format":
        return str(sfs.text_format)
    if sfs.WhichOneof("format") == "text_format_source":
        return _data_source(sfs.text_format_source, f"{where}.text_format_source", fields)
    return None


def _data_source(source: Any, where: str, fields: Fields) -> str:
    fields.only(source, where, built=("filename", "inline_bytes", "inline_string", "environment_variable"),
                ignored=("watched_directory",))
    which = source.WhichOneof("specifier")
    if which == "inline_string":
        return str(source.inline_string)
    if which == "inline_bytes":
        return bytes(source.inline_bytes).decode("utf-8", "replace")
    if which == "environment_variable":
        value = os.environ.get(source.environment_variable)
        if value is None:
            raise ConfigError(f"{where}.environment_variable", f"environment variable {source.environment_variable!r}"
                                                               " does not exist")
        return value
    if which == "filename":
        try:
            with open(source.filename, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise ConfigError(f"{where}.filename", f"cannot read {source.filename}: {exc.strerror}") from None
    return ""
