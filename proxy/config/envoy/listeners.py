"""Envoy's listeners -> the model's: addresses, the original_dst listener
filter and use_original_dst, direction, bind_to_port, and the filter chains
with their matches (tcp_proxy.py builds what a chain does).

TPROXY (`inbound_mode`): a listener with `transparent: true` and the
`envoy.filters.listener.original_src` listener filter (Istio's TPROXY
interception mode) makes the proxy's inbound mode tproxy, with the filter's
mark; one without the other is refused, since the proxy has only the two
together (iptables/README.md, "Inbound by TPROXY").
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from typing import Any

from ..load import check_ambiguous
from ..model import RESERVED_NAMES, Chain, Cluster, Endpoint, IPNetwork, Listener, Match
from ..values import ConfigError
from . import schema
from .fields import Fields, model_name, raw_buffer, socket_address, type_name
from .tcp_proxy import tcp_proxy

ORIGINAL_DST_FILTER = "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
ORIGINAL_SRC_FILTER = "envoy.extensions.filters.listener.original_src.v3.OriginalSrc"
TCP_PROXY = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
DIRECTIONS = {0: "any", 1: "inbound", 2: "outbound"}  # TrafficDirection
SOURCE_TYPES = {0: "any", 1: "local", 2: "external"}  # FilterChainMatch.ConnectionSourceType

LISTENER_BUILT = ("name", "address", "additional_addresses", "stat_prefix", "filter_chains", "use_original_dst",
                  "default_filter_chain", "listener_filters", "traffic_direction", "bind_to_port", "transparent",
                  "freebind")
LISTENER_IGNORED = (
    "per_connection_buffer_limit_bytes", "metadata", "drain_type", "listener_filters_timeout",
    "continue_on_listener_filters_timeout", "tcp_fast_open_queue_length", "connection_balance_config", "reuse_port",
    "enable_reuse_port", "access_log", "tcp_backlog_size", "max_connections_to_accept_per_socket_event",
    "ignore_global_conn_limit", "bypass_overload_manager",
)


class _Names:
    """Chain names, unique across listeners (see the module docstring)."""

    def __init__(self) -> None:
        self.taken: set[str] = set(RESERVED_NAMES)

    def chain(self, listener: str, name: str, fallback: str) -> str:
        if not name:
            candidate = f"{listener}-{fallback}"
        else:
            candidate = model_name(name)
            if candidate in self.taken:
                candidate = f"{listener}.{candidate}"
        if candidate in self.taken:
            candidate = f"{candidate}-{fallback}"
        self.taken.add(candidate)
        return candidate


def listeners(listeners: Sequence[Any], where: str, clusters: dict[str, Cluster],
               fields: Fields) -> tuple[Listener, ...]:
    out: list[Listener] = []
    names: dict[str, int] = {}
    addresses: dict[Endpoint, str] = {}
    chain_names = _Names()
    for i, msg in enumerate(listeners):
        at = f"{where}[{i}]"
        if msg.name and msg.name in names:
            fields.note(at, f"a second listener named {msg.name!r}: Envoy keeps the first, "
                            f"{where}[{names[msg.name]}]")
            continue
        listener = _listener(msg, at, clusters, fields, chain_names)
        for address in listener.addresses:
            if address in addresses and addresses[address] != listener.name:
                raise ConfigError(f"{at}.address", f"error adding listener: '{listener.name}' has duplicate address "
                                                   f"'{address}' as existing listener")
            addresses[address] = listener.name
        if msg.name:
            names[msg.name] = i
        out.append(listener)
    return tuple(out)


def _listener(msg: Any, where: str, clusters: dict[str, Cluster], fields: Fields, names: _Names) -> Listener:
    fields.only(msg, where, built=LISTENER_BUILT, ignored=LISTENER_IGNORED)
    if msg.HasField("freebind") and msg.freebind.value:
        raise ConfigError(f"{where}.freebind", "not supported (the proxy binds only its own addresses)")
    if not msg.HasField("address"):
        raise ConfigError(f"{where}.address", f"error adding listener named '{msg.name}': address is necessary")
    first, compat = socket_address(msg.address, f"{where}.address", fields)
    endpoints, v4_on_v6 = [first], compat and first.host == "::"
    for i, extra in enumerate(msg.additional_addresses):
        at = f"{where}.additional_addresses[{i}]"
        fields.only(extra, at, built=("address",), why="socket options are not supported")
        endpoint, compat = socket_address(extra.address, f"{at}.address", fields)
        endpoints.append(endpoint)
        v4_on_v6 = v4_on_v6 or (compat and endpoint.host == "::")
    name = model_name(msg.name) if msg.name else model_name(str(first))
    original_dst = _listener_filters(msg.listener_filters, f"{where}.listener_filters", fields)
    if not msg.filter_chains and not msg.HasField("default_filter_chain"):
        raise ConfigError(f"{where}.filter_chains", f"error adding listener '{first}': no filter chains specified")
    chains = tuple(_chain(fc, f"{where}.filter_chains[{i}]", name, names.chain(name, fc.name, str(i)), clusters,
                          fields) for i, fc in enumerate(msg.filter_chains))
    _check_duplicates(msg.filter_chains, f"{where}.filter_chains")
    check_ambiguous(chains, f"{where}.filter_chains")
    default = None
    if msg.HasField("default_filter_chain"):
        fc = msg.default_filter_chain
        default = _chain(fc, f"{where}.default_filter_chain", name, names.chain(name, fc.name, "default"), clusters,
                         fields)
    return Listener(
        name=name, addresses=tuple(endpoints), chains=chains, default_chain=default, original_dst=original_dst,
        hand_off=bool(msg.use_original_dst.value), bind=msg.bind_to_port.value if msg.HasField("bind_to_port")
        else True, direction=DIRECTIONS[msg.traffic_direction], v4_on_v6=v4_on_v6,
        stat_prefix=msg.stat_prefix or None,
    )


def _filter_type(filter_msg: Any, at: str, fields: Fields) -> str:
    """The type URL of a listener or network filter's typed_config, as Envoy requires one."""
    fields.only(filter_msg, at, built=("name", "typed_config"))
    if not filter_msg.HasField("typed_config"):
        raise ConfigError(at, f"Didn't find a registered implementation for '{filter_msg.name}' with type URL: ''")
    return type_name(filter_msg.typed_config)


def _listener_filters(filters: Sequence[Any], where: str, fields: Fields) -> bool:
    """Whether the original_dst listener filter is there (the only one supported besides
    original_src, which `inbound_mode` reads)."""
    original_dst = False
    for i, listener_filter in enumerate(filters):
        at = f"{where}[{i}]"
        kind = _filter_type(listener_filter, at, fields)
        if kind not in (ORIGINAL_DST_FILTER, ORIGINAL_SRC_FILTER):
            raise ConfigError(at, f"not supported (listener filter {listener_filter.name!r}: of the listener "
                                  "filters, only envoy.filters.listener.original_dst and original_src)")
        built = ("mark",) if kind == ORIGINAL_SRC_FILTER else ()
        fields.only(schema.unpack(listener_filter.typed_config, f"{at}.typed_config"), f"{at}.typed_config",
                    built=built)
        original_dst = original_dst or kind == ORIGINAL_DST_FILTER
    return original_dst


def inbound_mode(listeners: Sequence[Any], where: str) -> tuple[str, int | None]:
    """("tproxy", the original_src mark) if a listener is transparent with the original_src
    filter; ("redirect", None) if none is; a ConfigError for one without the other."""
    mode, mark = "redirect", None
    for i, msg in enumerate(listeners):
        at = f"{where}[{i}]"
        transparent = msg.HasField("transparent") and msg.transparent.value
        sources = [(j, f) for j, f in enumerate(msg.listener_filters)
                   if f.HasField("typed_config") and type_name(f.typed_config) == ORIGINAL_SRC_FILTER]
        if not transparent and not sources:
            continue
        if not sources:
            raise ConfigError(f"{at}.transparent", "not supported without the envoy.filters.listener.original_src "
                                                   "listener filter (the proxy's tproxy mode has both)")
        j, source = sources[0]
        if not transparent:
            raise ConfigError(f"{at}.listener_filters[{j}]", "original_src needs the listener's transparent: true "
                                                             "(the proxy's tproxy mode has both)")
        own = schema.unpack(source.typed_config, f"{at}.listener_filters[{j}].typed_config").mark
        if not own:
            raise ConfigError(f"{at}.listener_filters[{j}].typed_config.mark",
                              "0: the app's replies to the client's address need the mark to come back to the proxy "
                              "(iptables/redirect.sh --tproxy-mark, 0x539)")
        if mark is not None and own != mark:
            raise ConfigError(f"{at}.listener_filters[{j}].typed_config.mark",
                              f"{own:#x}: another listener's original_src has {mark:#x}; the proxy has one tproxy mark")
        mode, mark = "tproxy", own
    return mode, mark


def _check_duplicates(chains: Sequence[Any], where: str) -> None:
    """A value listed twice in one chain's match is overlapping rules to Envoy."""
    for i, fc in enumerate(chains):
        m = fc.filter_chain_match
        lists = {"prefix_ranges": [_cidr(c, "") for c in m.prefix_ranges],
                 "source_prefix_ranges": [_cidr(c, "") for c in m.source_prefix_ranges],
                 "direct_source_prefix_ranges": [_cidr(c, "") for c in m.direct_source_prefix_ranges],
                 "source_ports": list(m.source_ports)}
        for key, values in lists.items():
            if len(set(values)) != len(values):
                raise ConfigError(f"{where}[{i}].filter_chain_match.{key}",
                                  "multiple filter chains with overlapping matching rules are defined")


def _cidr(cidr: Any, where: str) -> IPNetwork:
    """A CidrRange as Envoy reads it: host bits dropped, a length past the family's clamped."""
    try:
        address = ipaddress.ip_address(cidr.address_prefix)
    except ValueError:
        raise ConfigError(f"{where}.address_prefix", f"malformed IP address: {cidr.address_prefix}") from None
    length = min(int(cidr.prefix_len.value), address.max_prefixlen)
    return ipaddress.ip_network(f"{address}/{length}", strict=False)


def _match(m: Any, where: str, fields: Fields) -> Match:
    fields.only(m, where, built=("destination_port", "prefix_ranges", "direct_source_prefix_ranges", "source_type",
                                 "source_prefix_ranges", "source_ports", "transport_protocol"))
    if m.transport_protocol not in ("", "raw_buffer"):
        raise ConfigError(f"{where}.transport_protocol", f"{m.transport_protocol!r} is not supported (it needs a TLS "
                                                         "inspector, which the proxy does not have; raw_buffer is)")
    return Match(
        ports=(int(m.destination_port.value),) if m.HasField("destination_port") else (),
        destinations=tuple(_cidr(c, f"{where}.prefix_ranges[{i}]") for i, c in enumerate(m.prefix_ranges)),
        sources=tuple(_cidr(c, f"{where}.source_prefix_ranges[{i}]") for i, c in enumerate(m.source_prefix_ranges)),
        direct_sources=tuple(_cidr(c, f"{where}.direct_source_prefix_ranges[{i}]")
                             for i, c in enumerate(m.direct_source_prefix_ranges)),
        source_ports=tuple(sorted({int(p) for p in m.source_ports})),
        source_type=SOURCE_TYPES[m.source_type],
        transport_protocol=m.transport_protocol,
    )



def _chain(fc: Any, where: str, listener: str, name: str, clusters: dict[str, Cluster], fields: Fields) -> Chain:
    fields.only(fc, where, built=("filter_chain_match", "filters", "transport_socket", "name"),
                ignored=("metadata", "transport_socket_connect_timeout"))
    if fc.HasField("transport_socket"):
        raw_buffer(fc.transport_socket, f"{where}.transport_socket", fields)
    match = _match(fc.filter_chain_match, f"{where}.filter_chain_match", fields)
    if not fc.filters:  # Envoy closes a connection whose chain has no network filter
        return _logged_as(Chain(name=name, match=match, action="close"), fc.name)
    for i, network_filter in enumerate(fc.filters):
        at = f"{where}.filters[{i}]"
        kind = _filter_type(network_filter, at, fields)
        if kind != TCP_PROXY:
            what = "HTTP filters are not supported" if "http_connection_manager" in kind else \
                "of the network filters, only envoy.filters.network.tcp_proxy"
            raise ConfigError(at, f"not supported (network filter {network_filter.name!r}: {what})")
        if i != len(fc.filters) - 1:
            raise ConfigError(at, f"terminal filter named {network_filter.name} of type "
                                  "envoy.filters.network.tcp_proxy must be the last filter in a network filter chain")
    at = f"{where}.filters[0].typed_config"
    chain = tcp_proxy(schema.unpack(fc.filters[0].typed_config, at), at, name, match, clusters, fields)
    return _logged_as(chain, fc.name)


def _logged_as(chain: Chain, envoy_name: str) -> Chain:
    """The chain, with the name Envoy's %FILTER_CHAIN_NAME% prints if the model renamed it."""
    return chain if chain.name == envoy_name else dataclasses.replace(chain, log_name=envoy_name)
