"""The listening sockets (proxy/control/sockets.py), on real sockets on loopback."""

from __future__ import annotations

import socket

import pytest

from proxy.config import Config, Endpoint, Listener
from proxy.control.lifecycle import StartupError
from proxy.control.sockets import check_ports_free, open_listen_sockets


def free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


def config_on(*addresses: tuple[str, int]) -> Config:
    listener = Listener(name="out", addresses=tuple(Endpoint(h, p) for h, p in addresses))
    return Config(listeners=(listener,))


def test_a_listener_on_the_wildcard_and_a_specific_address_of_one_port_binds_both():
    # Envoy binds both (its listeners take SO_REUSEPORT); a bootstrap of the corpus does this
    port = free_port()
    config = config_on(("::", port), ("::1", port))
    check_ports_free(config)
    sockets = open_listen_sockets(config)
    try:
        assert [b.sock.getsockname()[:2] for b in sockets] == [("::", port), ("::1", port)]
        with socket.create_connection(("::1", port), timeout=2):
            pass
    finally:
        for bound in sockets:
            bound.sock.close()


def test_a_port_another_socket_holds_is_one_line_naming_listener_and_address():
    port = free_port()
    with socket.socket(socket.AF_INET6) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # even one that would share it
        other.bind(("::1", port))
        other.listen()
        with pytest.raises(StartupError) as caught:
            check_ports_free(config_on(("::1", port)))
    assert str(caught.value) == f"listener out: cannot bind [::1]:{port}: Address already in use"
