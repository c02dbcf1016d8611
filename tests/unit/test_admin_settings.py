"""The admin API's settings: defaults, file, flags, and one clear line for bad values."""

from __future__ import annotations

import pytest

from proxy import config as cfg
from proxy.cli import build_parser, load_config


def test_defaults_are_istios_admin_port_on_loopback():
    config = cfg.load(env={})
    assert (config.admin_address, config.admin_port, config.admin_allow_remote) == ("127.0.0.1", 15000, False)


def test_file_and_flags(tmp_path):
    path = tmp_path / "proxy.yaml"
    path.write_text("admin_address: 192.0.2.1\nadmin_port: 9901\nadmin_allow_remote: true\n")
    config = cfg.load(str(path), env={})
    assert (config.admin_address, config.admin_port, config.admin_allow_remote) == ("192.0.2.1", 9901, True)
    args = build_parser().parse_args(["run", "--config", str(path), "--admin-port", "0", "--admin-address", "::1"])
    config = load_config(args)
    assert (config.admin_address, config.admin_port, config.admin_allow_remote) == ("::1", None, True)  # 0: off


def test_port_zero_is_off_and_ephemeral_is_the_kernels_choice(tmp_path):
    """Our YAML's 0 keeps its meaning (no admin API); Envoy's port 0 is `ephemeral`, and both round-trip."""
    path = tmp_path / "proxy.yaml"
    for text, port, written in (("admin_port: 0", None, 0), ("admin_port: ephemeral", 0, "ephemeral"),
                                ("admin_port: null", None, 0), ("admin_port: 9901", 9901, 9901)):
        path.write_text(text + "\n")
        config = cfg.load(str(path), env={})
        assert config.admin_port == port, text
        assert config.to_dict()["admin_port"] == written, text
        assert cfg.from_data(config.to_dict()).admin_port == port, text


def test_the_allow_remote_flag_is_a_switch():
    assert load_config(build_parser().parse_args(["run", "--admin-allow-remote"])).admin_allow_remote is True
    assert load_config(build_parser().parse_args(["run"])).admin_allow_remote is False


@pytest.mark.parametrize(("text", "message"), [
    ("admin_port: 70000", "proxy.yaml:1: admin_port: 70000 is not a port (0-65535)"),
    ("admin_address: localhost", "proxy.yaml:1: admin_address: 'localhost' is not an IP address"),
    ("admin_allow_remote: maybe", "proxy.yaml:1: admin_allow_remote: 'maybe' is not a boolean (true or false)"),
])
def test_bad_values_name_the_field(tmp_path, text, message):
    path = tmp_path / "proxy.yaml"
    path.write_text(text + "\n")
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(str(path), env={})
    assert str(err.value) == str(path) + message[len("proxy.yaml"):]


def test_config_dump_carries_the_admin_settings():
    assert {k: v for k, v in cfg.Config().to_dict().items() if k.startswith("admin_")} == {
        "admin_address": "127.0.0.1", "admin_port": 15000, "admin_allow_remote": False, "admin_hosts": [],
        "admin_address_path": None}
