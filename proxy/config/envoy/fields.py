"""What every part of the bootstrap front end shares: which fields of a message
are built, ignored or refused (`Fields`), the names the model can take, and
the small readings of Envoy's common messages (an address, a transport socket).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from ..model import Endpoint
from ..values import NAME, ConfigError

RAW_BUFFER = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"

WHY = {
    "transport_socket": "TLS is not supported",
    "transport_socket_matches": "TLS is not supported",
    "transport_socket_matcher": "TLS is not supported",
    "health_checks": "health checks are not supported",
    "outlier_detection": "outlier detection is not supported",
    "server_names": "needs a TLS inspector, which the proxy does not have",
    "application_protocols": "needs a TLS or HTTP inspector, which the proxy does not have",
    "filter_chain_matcher": "the matcher API is not supported (filter_chain_match is)",
    "dynamic_resources": "xDS is not supported: write the resources under static_resources",
    "hds_config": "xDS is not supported",
    "eds_cluster_config": "xDS is not supported",
    "fcds_config": "xDS is not supported",
    "config_discovery": "xDS is not supported",
    "on_demand": "xDS is not supported",
    "tunneling_config": "tunneling over HTTP is not supported",
    "api_listener": "HTTP is not supported",
    "udp_listener_config": "UDP is not supported",
}


class Fields:
    """Which fields of each message the proxy builds, ignores or refuses (see the module docstring)."""

    def __init__(self) -> None:
        self.ignored: list[str] = []

    def only(self, msg: Any, where: str, built: Iterable[str] = (), ignored: Iterable[str] = (),
             why: str | None = None) -> None:
        """Every field set in `msg` must be built or ignored; the ignored are noted."""
        built, ignored = set(built), set(ignored)
        for field, _ in msg.ListFields():
            if field.name in built:
                continue
            path = join(where, field.name)
            if field.name in ignored:
                self.ignored.append(path)
            else:
                raise ConfigError(path, f"not supported ({WHY.get(field.name, why or _default_why(msg))})")

    def note(self, path: str, reason: str) -> None:
        self.ignored.append(f"{path} ({reason})")


def _default_why(msg: Any) -> str:
    return f"the proxy builds the transparent-TCP subset of {msg.DESCRIPTOR.full_name}; see README"


def join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def seconds(duration: Any) -> float:
    return int(duration.seconds) + int(duration.nanos) / 1e9


def type_name(packed: Any) -> str:
    return str(packed.type_url).rpartition("/")[2]


def enum_name(msg: Any, field: str) -> str:
    """The name of an enum field's value (STATIC, ROUND_ROBIN, ...)."""
    return str(msg.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[getattr(msg, field)].name)


def model_name(name: str) -> str:
    """An Envoy name as a model name: characters other than letters, digits, _ . - | become _."""
    return "".join(c if NAME.fullmatch(c) else "_" for c in name)



def socket_address(address: Any, where: str, fields: Fields, allow_zero: bool = False) -> tuple[Endpoint, bool]:
    """A socket address (IP and port) and its ipv4_compat."""
    fields.only(address, where, built=("socket_address",),
                why="only socket addresses (IP and port) are supported, not pipes or internal addresses")
    if not address.HasField("socket_address"):
        raise ConfigError(where, "address is necessary (a socket_address)")
    sock = address.socket_address
    at = f"{where}.socket_address"
    fields.only(sock, at, built=("address", "port_value", "ipv4_compat", "protocol"),
                why="named ports, resolvers and network namespaces are not supported")
    if sock.protocol != 0:
        raise ConfigError(f"{at}.protocol", "not supported (UDP is not supported)")
    try:
        host = str(ipaddress.ip_address(sock.address))
    except ValueError:
        raise ConfigError(f"{at}.address", f"malformed IP address: {sock.address}") from None
    port = int(sock.port_value)
    if port == 0 and not allow_zero:
        raise ConfigError(f"{at}.port_value", "0 is not supported here (a port the kernel picks; see README)")
    return Endpoint(host, port), bool(sock.ipv4_compat)



def raw_buffer(socket: Any, where: str, fields: Fields) -> None:
    """A transport socket is fine if it is the plain one (raw_buffer); TLS is not supported."""
    fields.only(socket, where, built=("name", "typed_config"))
    if not socket.HasField("typed_config") or type_name(socket.typed_config) != RAW_BUFFER:
        raise ConfigError(where, f"not supported ({WHY['transport_socket']}; only raw_buffer)")

