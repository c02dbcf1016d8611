"""`sidecar-envoy`: the proxy behind Envoy's own command line.

A harness that runs `envoy ARGS` runs `sidecar-envoy ARGS` unchanged: the
flags are Envoy 1.40's, parsed as Envoy's parser (TCLAP) parses them (a flag
and its value are two words; `--flag=value` is no flag; a flag given twice
is an error; `--` ends the flags), with Envoy's exit statuses: 0, or 1 for
anything wrong (a flag, a value, the configuration), always with one line
on stderr that names it.

    --mode serve      the proxy, from the bootstrap (-c and --config-yaml), until stopped
    --mode validate   prints "configuration '<file>' OK" and exits 0, or exits 1
    --mode init_only  loads the configuration and exits 0

Every flag of Envoy's is accepted. Those that mean something here are
built: the bootstrap, --concurrency, the log flags, --admin-address-path,
--drain-time-s and --drain-strategy (the drain of /drain_listeners and SIGTERM),
--service-{cluster,node,zone} (the node). The rest belong to things the
proxy does not have (hot restart, Envoy's extensions, mutex tracing, ...):
they are parsed and checked as Envoy checks them, shown in /server_info's
command line, and listed in the README as having no meaning here.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from . import config as cfg
from .config.envoy import ENVOY_VERSION, Options, load_bootstrap
from .config.model import MAX_CONCURRENCY
from .control.envoylog import ENVOY_DEFAULT_PATTERN, ENVOY_LOGGERS, logger_levels
from .exitcodes import EXIT_FAILURE, EXIT_OK

PROG = "sidecar-envoy"
ENVOY_LEVELS = {"trace": "trace", "debug": "debug", "info": "info", "warning": "warning", "warn": "warning",
                "error": "error", "critical": "critical", "off": "off"}
MODES = {"serve": "Serve", "validate": "Validate", "init_only": "InitOnly"}
UINT32 = 0xFFFFFFFF


class BadFlag(Exception):
    """A command line Envoy would refuse; str() is the one line."""


@dataclasses.dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]  # the long name first
    value: str | None  # what the value is ("string", "uint32_t"); None: a switch
    help: str
    meaning: bool = True  # False: accepted and checked, without meaning for this proxy (README)
    repeat: bool = False  # may be given more than once (--stats-tag)

    @property
    def key(self) -> str:
        return self.names[0].lstrip("-").replace("-", "_")


FLAGS = (
    Flag(("--config-path", "-c"), "string", "Path to configuration file"),
    Flag(("--config-yaml",), "string", "Inline YAML configuration, merges with the contents of --config-path"),
    Flag(("--mode",), "string", "One of 'serve' (default; validate configs and then serve traffic normally), "
                                "'validate' (validate configs and exit) or 'init_only'"),
    Flag(("--concurrency",), "uint32_t", "# of worker processes to run (default: the machine's CPUs)"),
    Flag(("--log-level", "-l"), "string", "Log levels: [trace][debug][info][warning|warn][error][critical][off]"),
    Flag(("--component-log-level",), "string", "Comma-separated list of component log levels, e.g. "
                                               "upstream:debug,config:trace"),
    Flag(("--log-format",), "string", f"Log message format in spdlog syntax (default \"{ENVOY_DEFAULT_PATTERN}\")"),
    Flag(("--log-format-escaped",), None, "Escape c-style escape sequences in the application logs"),
    Flag(("--log-path",), "string", "Path to logfile"),
    Flag(("--admin-address-path",), "string", "Admin address path"),
    Flag(("--drain-time-s",), "uint32_t", "Hot restart and LDS removal drain time in seconds"),
    Flag(("--drain-strategy",), "string", "Drain sequence behaviour, one of 'gradual' (default) or 'immediate'"),
    Flag(("--service-cluster",), "string", "Cluster name"),
    Flag(("--service-node",), "string", "Node name"),
    Flag(("--service-zone",), "string", "Zone name"),
    Flag(("--allow-unknown-static-fields",), None, "Allow unknown fields in static configuration"),
    Flag(("--allow-unknown-fields",), None, "Allow unknown fields in static configuration (DEPRECATED)"),
    Flag(("--cpuset-threads",), None, "Get the default # of workers from the cpuset size"),
    Flag(("--parent-shutdown-time-s",), "uint32_t", "Hot restart parent shutdown time in seconds", False),
    Flag(("--base-id",), "uint32_t", "Base ID so that multiple envoys can run on the same host", False),
    Flag(("--use-dynamic-base-id",), None, "The server chooses a base ID dynamically", False),
    Flag(("--base-id-path",), "string", "Path to which the base ID is written", False),
    Flag(("--restart-epoch",), "uint32_t", "Hot restart epoch #", False),
    Flag(("--disable-hot-restart",), None, "Disable hot restart functionality", False),
    Flag(("--hot-restart-version",), None, "Hot restart compatibility version", False),
    Flag(("--skip-hot-restart-on-no-parent",), None, "Continue a hot restart without a parent", False),
    Flag(("--skip-hot-restart-parent-stats",), None, "Do not copy the hot restart parent's stats", False),
    Flag(("--socket-path",), "string", "Path to hot restart socket file", False),
    Flag(("--socket-mode",), "string", "Socket file permission", False),
    Flag(("--local-address-ip-version",), "string", "The local IP address version (v4 or v6)", False),
    Flag(("--file-flush-interval-msec",), "uint32_t", "Interval for log flushing in msec", False),
    Flag(("--file-flush-min-size-kb",), "uint32_t", "Minimum size in KB for log flushing", False),
    Flag(("--enable-fine-grain-logging",), None, "Logger mode: enable file level log control", False),
    Flag(("--log-stacktrace-single-entry",), None, "Emit the entire stack trace in a single log entry", False),
    Flag(("--skip-deprecated-logs",), None, "Skips the logging of deprecated field warnings", False),
    Flag(("--ignore-unknown-dynamic-fields",), None, "Ignore unknown fields in dynamic configuration", False),
    Flag(("--reject-unknown-dynamic-fields",), None, "Reject unknown fields in dynamic configuration", False),
    Flag(("--disable-extensions",), "string", "Comma-separated list of extensions to disable", False),
    Flag(("--stats-tag",), "string", "A universal tag for all stats (tag:value)", False, repeat=True),
    Flag(("--enable-mutex-tracing",), None, "Enable mutex contention tracing functionality", False),
    Flag(("--enable-core-dump",), None, "Enable core dumps", False),
    Flag(("--version",), None, "Displays version information and exits."),
    Flag(("--help", "-h"), None, "Displays usage information and exits."),
)
BY_NAME = {name: flag for flag in FLAGS for name in flag.names}


def parse(argv: Sequence[str]) -> dict[str, Any]:
    """Envoy's command line -> {key: value}: a switch is True, a repeated flag a list."""
    values: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        word = args[i]
        if word in ("--", "--ignore_rest"):  # TCLAP: the rest is not read
            break
        flag = BY_NAME.get(word)
        if flag is None:
            raise BadFlag(f"{word} -- Couldn't find match for argument")
        label = " (".join(reversed(flag.names)) + ")" if len(flag.names) > 1 else f"({flag.names[0]})"
        if flag.key in values and not flag.repeat:
            raise BadFlag(f"{label} -- Argument already set!")
        if flag.value is None:
            values[flag.key] = True
            i += 1
            continue
        if i + 1 >= len(args):
            raise BadFlag(f"{label} -- Missing a value for this argument!")
        value: Any = args[i + 1]
        if flag.value == "uint32_t":
            if not (value.isascii() and value.isdigit() and int(value) <= UINT32):
                raise BadFlag(f"{label} -- Couldn't read argument value from string '{value}'")
            value = int(value)
        if flag.repeat:
            values.setdefault(flag.key, []).append(value)
        else:
            values[flag.key] = value
        i += 2
    return values


def component_levels(spec: str) -> list[tuple[str, str]]:
    """--component-log-level upstream:debug,config:trace, checked as Envoy checks it."""
    pairs = []
    for item in spec.split(","):
        name, colon, level = item.partition(":")
        if not colon or ":" in level:
            raise BadFlag(f"error: component log level not correctly specified '{item}'")
        if level not in ENVOY_LEVELS:
            raise BadFlag(f"error: invalid log level specified '{level}'")
        if name not in ENVOY_LOGGERS:
            raise BadFlag(f"error: invalid component specified '{name}'")
        pairs.append((name, ENVOY_LEVELS[level]))
    return pairs


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def command_line_options(values: dict[str, Any], concurrency: int) -> dict[str, Any]:
    """The options as Envoy's /server_info shows them (admin.v3.CommandLineOptions, Envoy's JSON)."""
    get = values.get
    return {
        "base_id": str(get("base_id", 0)),
        "concurrency": concurrency,
        "config_path": get("config_path", ""),
        "config_yaml": get("config_yaml", ""),
        "allow_unknown_static_fields": bool(get("allow_unknown_static_fields") or get("allow_unknown_fields")),
        "admin_address_path": get("admin_address_path", ""),
        "local_address_ip_version": get("local_address_ip_version", "v4"),
        "log_level": ENVOY_LEVELS[get("log_level", "info")],
        "component_log_level": get("component_log_level", ""),
        "log_format": get("log_format", ENVOY_DEFAULT_PATTERN),
        "log_path": get("log_path", ""),
        "service_cluster": get("service_cluster", ""),
        "service_node": get("service_node", ""),
        "service_zone": get("service_zone", ""),
        "file_flush_interval": _duration(get("file_flush_interval_msec", 10000) / 1000),
        "drain_time": _duration(get("drain_time_s", 600)),
        "parent_shutdown_time": _duration(get("parent_shutdown_time_s", 900)),
        "mode": MODES[get("mode", "serve")],
        "disable_hot_restart": bool(get("disable_hot_restart")),
        "enable_mutex_tracing": bool(get("enable_mutex_tracing")),
        "restart_epoch": get("restart_epoch", 0),
        "cpuset_threads": bool(get("cpuset_threads")),
        "reject_unknown_dynamic_fields": bool(get("reject_unknown_dynamic_fields")),
        "log_format_escaped": bool(get("log_format_escaped")),
        "disabled_extensions": [e for e in get("disable_extensions", "").split(",") if e],
        "ignore_unknown_dynamic_fields": bool(get("ignore_unknown_dynamic_fields")),
        "use_dynamic_base_id": bool(get("use_dynamic_base_id")),
        "base_id_path": get("base_id_path", ""),
        "drain_strategy": get("drain_strategy", "gradual").capitalize(),
        "enable_fine_grain_logging": bool(get("enable_fine_grain_logging")),
        "socket_path": get("socket_path", "@envoy_domain_socket"),
        "socket_mode": int(get("socket_mode", "0"), 8) if str(get("socket_mode", "0")).isdigit() else 0,
        "enable_core_dump": bool(get("enable_core_dump")),
        "stats_tag": list(get("stats_tag", [])),
        "skip_hot_restart_on_no_parent": bool(get("skip_hot_restart_on_no_parent")),
        "skip_hot_restart_parent_stats": bool(get("skip_hot_restart_parent_stats")),
        "skip_deprecated_logs": bool(get("skip_deprecated_logs")),
        "file_flush_min_size": get("file_flush_min_size_kb", 0) * 1024,
        "log_stacktrace_single_entry": bool(get("log_stacktrace_single_entry")),
    }


def check_values(values: dict[str, Any]) -> None:
    """The values Envoy checks before it reads any configuration."""
    level = values.get("log_level", "info")
    if level not in ENVOY_LEVELS:
        raise BadFlag(f"error: invalid log level specified '{level}'")
    if "component_log_level" in values:
        component_levels(values["component_log_level"])
    if values.get("mode", "serve") not in MODES:
        raise BadFlag(f"error: unknown mode '{values['mode']}'")
    if values.get("drain_strategy", "gradual") not in ("gradual", "immediate"):
        raise BadFlag(f"error: unknown drain-strategy '{values['drain_strategy']}'")
    if values.get("local_address_ip_version", "v4") not in ("v4", "v6"):
        raise BadFlag(f"error: unknown IP address version '{values['local_address_ip_version']}'")
    if values.get("use_dynamic_base_id") and values.get("restart_epoch", 0) > 0:
        raise BadFlag(f"error: cannot use --restart-epoch={values['restart_epoch']} with --use-dynamic-base-id")
    for tag in values.get("stats_tag", []):
        name, colon, value = tag.partition(":")
        if not colon or not name.isalnum() or "." in value:
            raise BadFlag(f"error: misformatted stats-tag '{tag}'")


def default_concurrency(cpuset: bool) -> int:
    """Envoy's default: a worker per hardware thread (per CPU of the cpuset with --cpuset-threads)."""
    count = len(os.sched_getaffinity(0)) if cpuset else os.cpu_count() or 1
    return max(count, 1)


def configure(values: dict[str, Any]) -> cfg.Config:
    """The Config of an Envoy command line: the bootstrap, then what the flags say."""
    options = Options(
        config_path=values.get("config_path", ""), config_yaml=values.get("config_yaml", ""),
        allow_unknown=bool(values.get("allow_unknown_static_fields") or values.get("allow_unknown_fields")),
        service_cluster=values.get("service_cluster", ""), service_node=values.get("service_node", ""),
        service_zone=values.get("service_zone", ""),
    )
    config = load_bootstrap(options)
    loop = os.environ.get(cfg.LOOP_ENV) or config.loop
    wanted = values.get("concurrency")
    workers = default_concurrency(bool(values.get("cpuset_threads"))) if wanted is None else wanted
    concurrency = min(max(workers, 1), MAX_CONCURRENCY)
    pattern = values.get("log_format", ENVOY_DEFAULT_PATTERN)
    if values.get("log_format_escaped"):
        pattern = pattern.replace("%v", "%_")
    components = component_levels(values["component_log_level"]) if "component_log_level" in values else []
    return dataclasses.replace(
        config, loop=cfg.SETTINGS["loop"](loop, cfg.LOOP_ENV), concurrency=concurrency,
        log_level=ENVOY_LEVELS[values.get("log_level", "info")],
        log_pattern=pattern, logger_levels=logger_levels(components, cfg.LOG_LEVELS),
        admin_address_path=values.get("admin_address_path") or None,
        drain_time=float(values.get("drain_time_s", 600)), drain_strategy=values.get("drain_strategy", "gradual"),
        command_line=command_line_options(values, concurrency),
    )


def usage() -> str:
    lines = [f"USAGE: {PROG} [OPTIONS]  (Envoy {ENVOY_VERSION}'s command line)", ""]
    for flag in FLAGS:
        spec = ", ".join(flag.names) + (f" <{flag.value}>" if flag.value else "")
        note = "" if flag.meaning else "  [accepted; no meaning for this proxy]"
        lines.append(f"   {spec}\n     {flag.help}{note}\n")
    return "\n".join(lines)


def version_line() -> str:
    """Envoy's --version line: revision/version/status/build/TLS; the version is the Envoy this follows."""
    return f"\n{PROG}  version: sidecar-proxy-{__version__}/{ENVOY_VERSION}/Clean/RELEASE/none\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        values = parse(argv)
        if values.get("help"):
            print(usage())
            return EXIT_OK
        if values.get("version"):
            print(version_line())
            return EXIT_OK
        if values.get("hot_restart_version"):
            print("disabled", end="")  # there is no hot restart here (Envoy says this with --disable-hot-restart)
            return EXIT_OK
        check_values(values)
    except BadFlag as exc:
        print(f"{PROG}: {exc} (see {PROG} --help)", file=sys.stderr)
        return EXIT_FAILURE
    mode = values.get("mode", "serve")
    try:
        config = configure(values)
    except cfg.ConfigError as exc:
        print(f"{PROG}: error initializing configuration: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if mode == "validate":
        print(f"configuration '{values.get('config_path', '')}' OK")
        return EXIT_OK
    if mode == "init_only":
        return EXIT_OK
    if "log_path" in values:
        try:
            _log_to(values["log_path"])
        except OSError as exc:
            print(f"{PROG}: --log-path {values['log_path']}: {exc.strerror}", file=sys.stderr)
            return EXIT_FAILURE
    from .cli import serve  # the runner `sidecar-proxy run` uses
    try:
        return serve(config, [sys.argv[0] if sys.argv else PROG, *argv])
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _log_to(path: str) -> None:
    """Envoy's --log-path: every log line of this process and its workers goes to `path` (appended)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        sys.stderr.flush()
        os.dup2(fd, 2)
    finally:
        os.close(fd)
