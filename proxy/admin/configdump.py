"""`/config_dump` as Envoy 1.40 writes it: an `envoy.admin.v3.ConfigDump`. Pure.

The dump is built from Envoy's own messages (xds-protos) and written with
protobuf's JSON printer, so a ConfigDump decoder (istioctl proxy-config's)
reads it as it reads Envoy's. Its sections, in Envoy's order (its config
tracker's keys, sorted):

    BootstrapConfigDump   the bootstrap as read (the file with --config-yaml merged; our YAML:
                          asbootstrap.py), its node as the proxy runs it (identity.py)
    ClustersConfigDump    static_clusters, sorted by name as Envoy sorts them
    EndpointsConfigDump   with ?include_eds: each cluster's endpoints as Envoy's EDS dump shows
                          static ones (healthy, weight 1, overprovisioning factor 140)
    ListenersConfigDump   static_listeners, in the bootstrap's order
    SecretsConfigDump     empty (no TLS, so no secrets)

Envoy's query parameters (source/server/admin/config_dump_handler.cc):

    ?resource=F    the elements of the repeated field F of whichever section has it, each
                   packed on its own (bootstrap: 400, not repeated; unknown: 404)
    ?mask=PATHS    a FieldMask (fieldmask.py): on every section it is valid for (sections it
                   is not valid for are left out; none at all: 400), or with ?resource= on
                   each element, through its Any (`cluster.name`)
    ?name_regex=R  only clusters, listeners and endpoints whose whole name R (RE2) matches
    ?include_eds   the endpoints section, whatever its value
An empty resource, mask or name_regex is as if it were not given.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import re2

from . import asbootstrap, fieldmask

ADMIN = "envoy.admin.v3."
OVERPROVISIONING_FACTOR = 140  # Envoy's default, which its EDS dump of a static cluster shows

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


class Reply(NamedTuple):
    status: int
    content_type: str
    body: str


def text(status: int, body: str) -> Reply:
    """Envoy's error replies from /config_dump: text/plain, without a charset."""
    return Reply(status, "text/plain", body)


def bootstrap_data(config: Any, node: Mapping[str, Any]) -> dict[str, Any]:
    """The bootstrap to dump: as read, or as the model says it (our YAML); with the running node."""
    data = dict(config.bootstrap) if config.bootstrap is not None else asbootstrap.bootstrap(config)
    data["node"] = dict(node)
    return data


def name_matcher(pattern: str | None) -> Callable[[str], bool] | Reply:
    """?name_regex= as Envoy compiles it (RE2, matching whole names), or the 400 reply."""
    if not pattern:
        return lambda name: True
    try:
        regex = re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        return text(400, f"INVALID_ARGUMENT: Error while parsing name_regex from {pattern}: {reason}")
    return lambda name: regex.fullmatch(name) is not None


def _message(name: str) -> Any:
    from ..config.envoy import schema  # xds-protos load with the first dump, not at start-up
    return schema.message_class(name)


def _timestamp(seconds: float) -> Any:
    stamp = _message("google.protobuf.Timestamp")()
    stamp.FromMilliseconds(int(seconds * 1000))
    return stamp


def _load_types(data: Any) -> None:
    """Import the message of every type URL in plain data, so protobuf can read its Anys."""
    from ..config.envoy import schema
    for url in set(schema.type_urls(data)):
        with contextlib.suppress(LookupError):  # json_format names the type it cannot find
            schema.message_class(url.rpartition("/")[2])


def _parse(name: str, data: Mapping[str, Any]) -> Any:
    from google.protobuf import json_format
    _load_types(data)
    return json_format.ParseDict(dict(data), _message(name)())


def sections(bootstrap: Mapping[str, Any], updated: float, include_eds: bool,
             keep: Callable[[str], bool]) -> list[Any]:
    """The dump's sections as messages, in Envoy's order, names filtered by `keep`."""
    static = bootstrap.get("static_resources", {})
    when = _timestamp(updated)
    boot = _message(ADMIN + "BootstrapConfigDump")(bootstrap=_parse("envoy.config.bootstrap.v3.Bootstrap",
                                                                    bootstrap), last_updated=when)
    clusters_dump = _message(ADMIN + "ClustersConfigDump")()
    clusters = sorted(static.get("clusters", []), key=lambda c: c.get("name", ""))
    for data in clusters:
        if keep(data.get("name", "")):
            item = clusters_dump.static_clusters.add(last_updated=when)
            item.cluster.Pack(_parse("envoy.config.cluster.v3.Cluster", data))
    listeners_dump = _message(ADMIN + "ListenersConfigDump")()
    for data in static.get("listeners", []):
        if keep(data.get("name", "")):
            item = listeners_dump.static_listeners.add(last_updated=when)
            item.listener.Pack(_parse("envoy.config.listener.v3.Listener", data))
    out = [boot, clusters_dump]
    if include_eds and clusters:  # Envoy adds the section only when it has clusters
        endpoints_dump = _message(ADMIN + "EndpointsConfigDump")()
        for data in clusters:
            assignment = load_assignment(data)
            if keep(assignment["cluster_name"]):
                item = endpoints_dump.static_endpoint_configs.add()
                item.endpoint_config.Pack(_parse("envoy.config.endpoint.v3.ClusterLoadAssignment", assignment))
        out.append(endpoints_dump)
    out += [listeners_dump, _message(ADMIN + "SecretsConfigDump")()]
    return out


def load_assignment(cluster: Mapping[str, Any]) -> dict[str, Any]:
    """A static cluster's endpoints as Envoy's EDS dump shows them: one locality, each host healthy."""
    name = cluster.get("name", "")
    lb_endpoints = []
    for locality in cluster.get("load_assignment", {}).get("endpoints", []):
        for lb_endpoint in locality.get("lb_endpoints", []):
            address = lb_endpoint.get("endpoint", {}).get("address", {})
            lb_endpoints.append({"endpoint": {"address": address, "health_check_config": {}},
                                 "health_status": "HEALTHY", "load_balancing_weight": 1})
    out: dict[str, Any] = {"cluster_name": name}
    if lb_endpoints:
        out["endpoints"] = [{"locality": {}, "lb_endpoints": lb_endpoints, "load_balancing_weight": 0}]
    out["policy"] = {"overprovisioning_factor": OVERPROVISIONING_FACTOR}
    return out


def render(bootstrap: Mapping[str, Any], updated: float, query: Mapping[str, str]) -> Reply:
    """The reply to /config_dump with these query parameters (Envoy's first value of each)."""
    keep = name_matcher(query.get("name_regex"))
    if isinstance(keep, Reply):
        return keep
    resource, mask = query.get("resource") or None, query.get("mask") or None
    parts = sections(bootstrap, updated, "include_eds" in query, keep)
    dump = _message(ADMIN + "ConfigDump")()
    paths = fieldmask.paths(mask) if mask is not None else None
    if resource is not None:
        for section in parts:
            field = section.DESCRIPTOR.fields_by_name.get(resource)
            if field is None:
                continue
            if not field.is_repeated:
                return text(400, f"{resource} is not a repeated field. Use ?mask={resource} to get only this field")
            for element in getattr(section, resource):
                if paths is not None and not fieldmask.trim_resource(element, paths):
                    shown = "".join(f'paths: "{p}"\n' for p in paths)
                    return text(400, f"FieldMask {shown} could not be successfully used.")
                dump.configs.add().Pack(element)
            return Reply(200, "application/json", to_json(dump))
        return text(404, f"{resource} not found in config dump")
    for section in parts:
        if paths is not None and not fieldmask.trim(section, paths):
            continue  # Envoy: a mask fits some sections and not others
        dump.configs.add().Pack(section)
    if not dump.configs and mask is not None:
        return text(400, f"FieldMask {mask} could not be successfully applied to any configs.")
    return Reply(200, "application/json", to_json(dump))


def plain(name: str, data: Mapping[str, Any], always_print: bool = False) -> dict[str, Any]:
    """Plain data through the message `name`, as Envoy prints it (always_print: with the fields
    at their defaults, as /server_info prints its node)."""
    return json.loads(to_json(_parse(name, data), always_print))


def to_json(msg: Any, always_print: bool = False) -> str:
    """Envoy's pretty JSON: proto field names, one-space indents, fields in field-number order,
    a whole number as a whole number (protobuf's C++ printer writes a Struct's 80.0 as 80)."""
    from google.protobuf import json_format
    data = json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=always_print)
    return json.dumps(_whole_numbers(data), indent=1, ensure_ascii=False)


def _whole_numbers(data: Any) -> Any:
    if isinstance(data, float) and data.is_integer() and abs(data) < 2 ** 53:
        return int(data)
    if isinstance(data, dict):
        return {key: _whole_numbers(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_whole_numbers(value) for value in data]
    return data


def decode(body: str) -> Any:
    """A dump read back as an admin.v3.ConfigDump (what a client of Envoy's dump does)."""
    from google.protobuf import json_format
    _load_types(json.loads(body))
    return json_format.Parse(body, _message(ADMIN + "ConfigDump")())

