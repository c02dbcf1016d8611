"""What Envoy 1.40's admin API says about the server itself, as the proxy says it. Pure but for /memory.

    identity          the version string and the node's user agent: the proxy names itself and the Envoy
                      it follows, as `sidecar-envoy --version` does (sidecar-proxy-0.1.0/1.40.0/...)
    /server_info      Envoy's keys; command_line_options from sidecar-envoy's command line, or (our
                      YAML) Envoy's defaults with the proxy's own concurrency, log level and drain time
    /runtime          the static layers of the bootstrap's layered_runtime, as Envoy flattens and prints
                      them; other layers are listed, without values (the proxy reads no disk layer)
    /memory           Envoy's tcmalloc figures, from glibc's malloc (mallinfo2) and the resident set
    /certs, /init_dump, /hot_restart_version  no TLS, nothing left to initialise, no hot restart
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from typing import Any

from .. import __version__
from ..config.envoy import ENVOY_VERSION

VERSION = f"sidecar-proxy-{__version__}/{ENVOY_VERSION}/Clean/RELEASE/none"
HOT_RESTART_VERSION = "disabled"  # there is no hot restart (Envoy's answer with --disable-hot-restart)
USER_AGENT = "sidecar-proxy"

# The Envoy extensions the proxy builds (README "Standing in for Envoy"), as Envoy lists its own.
EXTENSIONS = (
    ("envoy.filters.network.tcp_proxy", "envoy.filters.network",
     "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"),
    ("envoy.filters.listener.original_dst", "envoy.filters.listener",
     "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"),
    ("envoy.access_loggers.file", "envoy.access_loggers", "envoy.extensions.access_loggers.file.v3.FileAccessLog"),
    ("envoy.access_loggers.stdout", "envoy.access_loggers",
     "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"),
    ("envoy.access_loggers.stderr", "envoy.access_loggers",
     "envoy.extensions.access_loggers.stream.v3.StderrAccessLog"),
    ("envoy.cluster.static", "envoy.clusters", None),
    ("envoy.cluster.original_dst", "envoy.clusters", "envoy.extensions.clusters.original_dst.v3.OriginalDstCluster"),
    ("envoy.transport_sockets.raw_buffer", "envoy.transport_sockets.upstream",
     "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"),
    ("envoy.transport_sockets.raw_buffer", "envoy.transport_sockets.downstream",
     "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"),
)


def node(envoy_node: Mapping[str, Any] | None) -> dict[str, Any]:
    """The node as the running proxy reports it: the bootstrap's, and who runs it."""
    major, minor, patch = (int(part) for part in ENVOY_VERSION.split("."))
    return {
        **(envoy_node or {}),
        "user_agent_name": USER_AGENT,
        "user_agent_build_version": {
            "version": {"major_number": major, "minor_number": minor, "patch": patch},
            "metadata": {"revision.sha": f"sidecar-proxy-{__version__}", "revision.status": "Clean",
                         "build.type": "RELEASE", "ssl.version": "none"},
        },
        "extensions": [{"name": name, "category": category, "type_urls": [url] if url else []}
                       for name, category, url in EXTENSIONS],
    }


def command_line(config: Any) -> dict[str, Any]:
    """admin.v3.CommandLineOptions: sidecar-envoy's, or Envoy's defaults with what our YAML sets."""
    if config.command_line is not None:
        return dict(config.command_line)
    from ..envoy_cli import command_line_options  # Envoy's defaults, one place
    return command_line_options({"log_level": config.log_level, "drain_time_s": int(config.drain_time),
                                 "drain_strategy": config.drain_strategy}, config.concurrency)


def server_info(config: Any, state: str, uptime: int, node_json: Mapping[str, Any]) -> dict[str, Any]:
    """/server_info's body (admin.v3.ServerInfo, keys in Envoy's order)."""
    return {
        "version": VERSION,
        "state": state,
        "uptime_current_epoch": f"{uptime}s",
        "uptime_all_epochs": f"{uptime}s",
        "hot_restart_version": HOT_RESTART_VERSION,
        "command_line_options": command_line(config),
        "node": dict(node_json),
        "hot_restart_initializing": False,
    }


def runtime(bootstrap: Mapping[str, Any] | None) -> dict[str, Any]:
    """/runtime: every key of the static layers, its final value and its value in each layer."""
    layers = ((bootstrap or {}).get("layered_runtime") or {}).get("layers", [])
    values: list[dict[str, str]] = []
    for layer in layers:
        flat: dict[str, str] = {}
        if "static_layer" in layer:
            _flatten(layer["static_layer"], "", flat)
        values.append(flat)
    entries: dict[str, Any] = {}
    for key in sorted({key for flat in values for key in flat}):
        in_layers = [flat.get(key, "") for flat in values]
        final = next((v for v in reversed(in_layers) if v != ""), "")
        entries[key] = {"final_value": final, "layer_values": in_layers}
    return {"entries": entries, "layers": [layer.get("name", "") for layer in layers]}


def _flatten(value: Any, prefix: str, out: dict[str, str]) -> None:
    """A static layer's keys as Envoy reads them: nested objects joined with dots."""
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(inner, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = runtime_value(value)


def runtime_value(value: Any) -> str:
    """A value as Envoy's runtime prints it: numbers with six significant digits (C++'s %g)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return str(value)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def memory() -> dict[str, str]:
    """/memory for this process (admin.v3.Memory: uint64s, as strings)."""
    allocated = heap = free = 0
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
        mallinfo2.restype = _Mallinfo2
        info = mallinfo2()
        allocated, heap, free = info.uordblks + info.hblkhd, info.arena + info.hblkhd, info.fordblks
    except (AttributeError, OSError):  # not glibc 2.33 or later: the resident set alone
        pass
    try:
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        resident = 0
    return {"allocated": str(allocated), "heap_size": str(heap), "pageheap_unmapped": "0",
            "pageheap_free": str(free), "total_thread_cache": "0", "total_physical_bytes": str(resident)}
