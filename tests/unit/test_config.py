"""Config loading: defaults, precedence, and one clear line for every bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from proxy import config as cfg
from proxy.kube.services import render


def write(tmp_path, text: str, name: str = "proxy.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


GOOD = """\
port: 15001
mark: 0x2
idle_timeout: 30m
clusters:
  - name: web
    endpoints: ["198.51.100.20:8080", "[2001:db8:2::20]:8080"]
    connect_timeout: 250ms
chains:
  - name: http
    match: {ports: [80], destinations: ["198.51.100.0/24"]}
    cluster: web
  - name: smtp
    match: {ports: [25]}
    action: reject
plain_listeners:
  - name: local-web
    port: 15080
    cluster: web
"""


def test_defaults_without_a_file():
    c = cfg.load(None, env={})
    assert (c.port, c.addresses, c.mark, c.loop, c.log_format) == (5001, ("::",), None, "uvloop", "text")
    assert c.idle_timeout == 3600 and c.connect_timeout == 5 and c.default_action == "original"
    assert c.chains == () and c.clusters == ()


def test_a_full_file(tmp_path):
    c = cfg.load(write(tmp_path, GOOD), env={})
    assert c.port == 15001 and c.mark == 2 and c.idle_timeout == 1800
    web = c.cluster("web")
    assert [str(e) for e in web.endpoints] == ["198.51.100.20:8080", "[2001:db8:2::20]:8080"]
    assert web.connect_timeout == 0.25
    assert c.chains[0].action == "cluster" and c.chains[1].action == "reject"
    assert c.plain_listeners[0].address == "127.0.0.1"


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    path = write(tmp_path, "port: 6000\nmark: 0x3\n")
    assert cfg.load(None, env={}).port == 5001
    assert cfg.load(path, env={}).port == 6000
    assert cfg.load(path, env={"ISTIO_PROXY_PORT": "7000"}).port == 7000
    assert cfg.load(path, env={"ISTIO_PROXY_PORT": "7000"}, flags={"port": "8000"}).port == 8000
    assert cfg.load(path, env={"ISTIO_SO_MARK": "0x10"}).mark == 0x10
    assert cfg.load(path, env={"ISTIO_SO_MARK": ""}).mark == 3  # empty means unset


def test_check_prints_the_effective_config(tmp_path):
    path = write(tmp_path, GOOD)
    out = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", path, "--port", "9000"],
                         capture_output=True, text=True, check=True).stdout
    assert "port: 9000" in out and "idle_timeout: 1800.0" in out and "198.51.100.20:8080" in out
    # what check prints is itself a valid config, equal to the effective one
    again = cfg.load(write(tmp_path, out, "effective.yaml"), env={})
    assert again == cfg.load(path, env={}, flags={"port": 9000})


def test_services_file_from_chains(tmp_path):
    text = render(cfg.load(write(tmp_path, GOOD), env={}))
    assert "198.51.100.0/24:80" in text.splitlines()
    assert "# chain smtp: skipped" in text  # no destinations: said, not dropped


def test_services_file_leaves_out_chains_that_would_loop(tmp_path):
    path = write(tmp_path, """\
        chains:
          - name: passthrough-web
            match: {ports: [80], destinations: ["198.51.100.10/32", "2001:db8:2::/64"]}
            action: original
        """)
    text = render(cfg.load(path, env={}))
    assert "198.51.100.10:80" not in text.splitlines()
    assert "# chain passthrough-web: skipped (action original would loop" in text


BAD = [
    ("port: 70000\n", r"proxy.yaml:1: port: 70000 is not a port \(1-65535\)"),
    ("port: http\n", r"proxy.yaml:1: port: 'http' is not a port"),
    ("prot: 5001\n", r"proxy.yaml:1: prot: unknown key"),
    ("port: [5001\n", r"proxy.yaml:2: not valid YAML"),
    ("- 1\n- 2\n", r"proxy.yaml: expected a mapping, got list"),
    ("mark: banana\n", r"proxy.yaml:1: mark: 'banana' is not a mark"),
    ("mark: 0\n", r"proxy.yaml:1: mark: 0 is not a mark"),
    ("idle_timeout: soon\n", r"idle_timeout: 'soon' is not a duration"),
    ("idle_timeout: -1\n", r"idle_timeout: -1 must be positive"),
    ("loop: trio\n", r"loop: 'trio' is not one of uvloop, asyncio"),
    ("port: 1\nport: 2\n", r"proxy.yaml:2: port: duplicate key"),
    ("chains:\n  - name: a\n    match: {ports: [80]}\n  - name: b\n    match: {ports: [1, 70000]}\n",
     r"proxy.yaml:5: chains\[1\].match.ports\[1\]: 70000 is not a port"),
    ("chains:\n  - name: a\n    match: {destinations: ['198.51.100.1/24']}\n",
     r"chains\[0\].match.destinations\[0\]: '198.51.100.1/24' is not a CIDR"),
    ("chains:\n  - name: a\n    cluster: nowhere\n", r"proxy.yaml:3: chains\[0\].cluster: unknown cluster 'nowhere'"),
    ("chains:\n  - name: a\n    action: cluster\n", r"chains\[0\].cluster: is required when action is cluster"),
    ("chains:\n  - name: a\n    action: reject\n    cluster: x\n", r"chains\[0\].cluster: is only allowed with action cluster"),
    ("chains:\n  - name: a\n    match: {ports: [80]}\n  - name: b\n    match: {ports: [80]}\n",
     r"proxy.yaml:5: chains\[1\].match: matches the same connections as chains\[0\]"),
    ("chains:\n  - name: a\n  - name: a\n    match: {ports: [80]}\n", r"chains\[1\].name: chain 'a' is already defined"),
    ("chains:\n  - match: {ports: [80]}\n", r"chains\[0\].name: is required"),
    ("chains:\n  - name: a\n    match: {direction: sideways}\n", r"chains\[0\].match.direction: 'sideways' is not one of"),
    ("chains:\n  - name: a\n    match: {port: [80]}\n", r"chains\[0\].match.port: unknown key"),
    ("chains:\n  - name: a\n    match: {ports: 80}\n", r"chains\[0\].match.ports: expected a list, got int"),
    ("clusters:\n  - name: c\n    endpoints: []\n", r"clusters\[0\].endpoints: needs at least one endpoint"),
    ("clusters:\n  - name: c\n    endpoints: ['2001:db8::1:80']\n", r"write an IPv6 endpoint as \[ADDRESS\]:PORT"),
    ("clusters:\n  - name: c\n    endpoints: ['web.example:80']\n", r"clusters\[0\].endpoints\[0\]: 'web.example' is not an IP address"),
    ("clusters:\n  - name: c\n    endpoints: ['198.51.100.1:80']\n  - name: c\n    endpoints: ['198.51.100.1:81']\n",
     r"clusters\[1\].name: cluster 'c' is already defined"),
    ("plain_listeners:\n  - name: p\n    port: 1500\n    cluster: none\n", r"plain_listeners\[0\].cluster: unknown cluster"),
    ("addresses: []\n", r"addresses: needs at least one address"),
    ("addresses: ['::', 'eth0']\n", r"addresses\[1\]: 'eth0' is not an IP address"),
    ("idle_timeout: .nan\n", r"idle_timeout: nan is not a duration of at most 365 days"),
    ("connect_timeout: .inf\n", r"connect_timeout: inf is not a duration"),
    ("drain_timeout: " + "9" * 400 + "\n", r"drain_timeout: 9999.*\.\.\. is not a duration"),
    ("port: '\u00b2'\n", r"port: '\u00b2' is not a port"),
    ("port: '" + "1" * 5000 + "'\n", r"port: '1111.* is not a port"),
    ("chains: &x [*x]\n", r"chains\[0\]: a YAML alias that refers to itself"),
    ("chains:\n  - name: a\n    match: []\n", r"chains\[0\].match: expected a mapping, got list"),
    ("chains:\n  - name: a\n    cluster: [web]\n", r"chains\[0\].cluster: \['web'\] is not a cluster name"),
    ("plain_listeners:\n  - name: p\n    port: 1500\n    cluster: {a: 1}\n", r"plain_listeners\[0\].cluster: unknown cluster"),
    ("? [a, b]\n: 1\n", r"proxy.yaml:1: not valid YAML: while constructing a mapping, found unhashable key"),
    ("concurrency: 0\n", r"proxy.yaml:1: concurrency: 0 is not a number of workers \(1-64\)"),
    ("concurrency: true\n", r"concurrency: True is not a number of workers"),
    ("concurrency: 2.5\n", r"concurrency: 2.5 is not a number of workers"),
    ("splice: always\n", r"splice: 'always' is not one of auto, off"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_config_names_file_line_and_field(tmp_path, text, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.load(write(tmp_path, text), env={})


@pytest.mark.parametrize("env, message", [
    ({"ISTIO_PROXY_PORT": "abc"}, r"^ISTIO_PROXY_PORT: 'abc' is not a port"),
    ({"ISTIO_SO_MARK": "0xZZ"}, r"^ISTIO_SO_MARK: '0xZZ' is not a mark"),
])
def test_bad_environment_names_the_variable(env, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.load(None, env=env)


@pytest.mark.parametrize("argv, message", [
    (["run", "--port", "0"], "sidecar-proxy: --port: 0 is not a port (1-65535)"),
    (["run", "--mark", "x"], "sidecar-proxy: --mark: 'x' is not a mark (an integer such as 0x1)"),
    (["run", "--idle-timeout", "forever"], "sidecar-proxy: --idle-timeout: 'forever' is not a duration"),
    (["check", "--config", "/nonexistent/proxy.yaml"],
     "sidecar-proxy: /nonexistent/proxy.yaml: cannot read config: No such file or directory"),
    (["run", "--concurrency", "100"], "sidecar-proxy: --concurrency: 100 is not a number of workers (1-64)"),
    (["worker", "--control", "99"], "sidecar-proxy worker: --control 99: Bad file descriptor (workers are started"),
])
def test_cli_errors_are_one_line_without_traceback(argv, message):
    proc = subprocess.run([sys.executable, "-m", "proxy", *argv], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_unreadable_file_is_a_clear_error(tmp_path):
    with pytest.raises(cfg.ConfigError, match=r": cannot read config: Is a directory$"):
        cfg.load(str(tmp_path), env={})


def test_the_effective_config_is_data_that_loads_back(tmp_path):
    """What `check` prints (and a worker is handed, see workers.py) is the same config again."""
    c = cfg.load(write(tmp_path, GOOD + "concurrency: 3\nsplice: off\naddresses: ['0.0.0.0', '::']\n"), env={})
    assert cfg.from_data(c.to_dict()) == c
    assert c.concurrency == 3 and c.splice == "off"


def test_yaml_off_means_off(tmp_path):
    """YAML 1.1 reads a bare `off` as false: for the settings that take "off" it still means off."""
    c = cfg.load(write(tmp_path, "access_log: off\nsplice: off\n"), env={})
    assert c.access_log == "off" and c.splice == "off"


@pytest.mark.parametrize("message, reason", [
    (b"not json\n", "Expecting value"),
    (b'{"op": "start"}\n', "'config'"),
    (b"", "the control channel closed before the start message"),
])
def test_a_worker_without_a_proper_start_message_says_so_in_one_line(message, reason):
    """`proxy worker` is started by the proxy itself; anything else gets one line and exit 2."""
    import socket
    ours, theirs = socket.socketpair()
    fd = theirs.fileno()
    with ours, theirs:
        ours.sendall(message)
        ours.shutdown(socket.SHUT_WR)
        proc = subprocess.run([sys.executable, "-m", "proxy", "worker", "--control", str(fd)],
                              pass_fds=[fd], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"sidecar-proxy worker: --control {fd}: not a start message")
    assert reason in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
