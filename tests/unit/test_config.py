"""Config loading: defaults, precedence, and one clear line for every bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


def port(c: cfg.Config) -> int:
    return c.redirect.addresses[0].port


def test_defaults_without_a_file():
    c = cfg.load(None, env={})
    assert (c.redirect.addresses, c.mark, c.loop, c.log_format) == ((cfg.Endpoint("::", 5001),), None, "uvloop", "text")
    assert c.redirect.v4_on_v6  # "::" alone takes IPv4 too
    assert c.idle_timeout == 3600 and c.connect_timeout == 5 and c.redirect.default_chain == cfg.PASSTHROUGH
    assert c.redirect.chains == () and c.clusters == () and len(c.listeners) == 1


def test_a_full_file(tmp_path):
    c = cfg.load(write(tmp_path, GOOD), env={})
    assert port(c) == 15001 and c.mark == 2 and c.idle_timeout == 1800
    web = c.cluster("web")
    assert [str(e) for e in web.endpoints] == ["198.51.100.20:8080", "[2001:db8:2::20]:8080"]
    assert web.connect_timeout == 0.25
    assert c.redirect.chains[0].action == "cluster" and c.redirect.chains[1].action == "reject"
    plain = c.listeners[1]
    assert plain.name == "local-web" and plain.addresses == (cfg.Endpoint("127.0.0.1", 15080),)
    assert not plain.original_dst and plain.default_chain.cluster == "web"


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    path = write(tmp_path, "port: 6000\nmark: 0x3\n")
    assert port(cfg.load(None, env={})) == 5001
    assert port(cfg.load(path, env={})) == 6000
    assert port(cfg.load(path, env={"ISTIO_PROXY_PORT": "7000"})) == 7000
    assert port(cfg.load(path, env={"ISTIO_PROXY_PORT": "7000"}, flags={"port": "8000"})) == 8000
    assert cfg.load(path, env={"ISTIO_SO_MARK": "0x10"}).mark == 0x10
    assert cfg.load(path, env={"ISTIO_SO_MARK": ""}).mark == 3  # empty means unset
    assert cfg.load(path, env={"SIDECAR_PROXY_LOOP": "asyncio"}).loop == "asyncio"
    assert cfg.load(path, env={"SIDECAR_PROXY_LOOP": "asyncio"}, flags={"loop": "uvloop"}).loop == "uvloop"


def test_the_loop_from_the_environment_for_sidecar_envoy(monkeypatch, capsys):
    """Envoy's command line has no flag for it: SIDECAR_PROXY_LOOP, checked like a flag."""
    from proxy import envoy_cli
    bootstrap = str(Path(__file__).parents[1] / "envoy" / "bootstraps" / "valid" / "istio-sidecar.yaml")
    assert envoy_cli.configure(envoy_cli.parse(["-c", bootstrap])).loop == "uvloop"
    monkeypatch.setenv("SIDECAR_PROXY_LOOP", "asyncio")
    assert envoy_cli.configure(envoy_cli.parse(["-c", bootstrap])).loop == "asyncio"
    monkeypatch.setenv("SIDECAR_PROXY_LOOP", "trio")
    assert envoy_cli.main(["--mode", "validate", "-c", bootstrap]) == 1
    err = capsys.readouterr().err
    assert err == ("sidecar-envoy: error initializing configuration: SIDECAR_PROXY_LOOP: 'trio' is not one of "
                   "uvloop, asyncio\n")


def test_check_prints_the_effective_config(tmp_path):
    path = write(tmp_path, GOOD)
    out = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", path, "--port", "9000"],
                         capture_output=True, text=True, check=True).stdout
    assert "'[::]:9000'" in out and "idle_timeout: 1800.0" in out and "198.51.100.20:8080" in out
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
    ("clusters:\n  - name: p\n    kind: original_dst\n    cleanup_interval: 0s\n",
     r"proxy.yaml:4: clusters\[0\].cleanup_interval: '0s' must be positive"),
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
    ("clusters:\n  - name: c\n", r"proxy.yaml:2: clusters\[0\].endpoints: is required \(an empty list: every connection is reset\)"),
    ("clusters:\n  - name: original_dst\n    endpoints: []\n", r"clusters\[0\].name: 'original_dst' is the name of one of the proxy's own"),
    ("chains:\n  - name: passthrough\n", r"chains\[0\].name: 'passthrough' is the name of one of the proxy's own"),
    ("clusters:\n  - name: c\n    kind: original_dst\n    endpoints: ['198.51.100.1:80']\n", r"clusters\[0\].endpoints: a cluster of kind original_dst has no endpoints"),
    ("clusters:\n  - name: c\n    endpoints: []\n    lb_policy: maglev\n", r"clusters\[0\].lb_policy: 'maglev' is not one of round_robin, random, least_request"),
    ("chains:\n  - name: a\n    weighted: [{name: nope, weight: 1}]\n", r"chains\[0\].weighted\[0\].name: unknown cluster 'nope'"),
    ("clusters:\n  - name: c\n    endpoints: []\nchains:\n  - name: a\n    weighted: [{name: c, weight: 0}]\n", r"chains\[0\].weighted\[0\].weight: 0 is not a positive whole number"),
    ("chains:\n  - name: a\n    max_connect_attempts: -1\n", r"chains\[0\].max_connect_attempts: -1 is not a positive"),
    ("port: 5001\nlisteners: []\n", r"proxy.yaml:1: port: belongs to the short form; with `listeners`, write it in its listener"),
    ("listeners:\n  - name: a\n    addresses: ['127.0.0.1:80']\n  - name: b\n    addresses: ['127.0.0.1:80']\n", r"proxy.yaml:5: listeners\[1\].addresses: 127.0.0.1:80 is bound by listeners\[0\] \('a'\) too"),
    ("listeners:\n  - name: a\n    addresses: ['127.0.0.1:80']\n    default_chain: {name: d, match: {ports: [80]}}\n", r"listeners\[0\].default_chain.match: a default chain takes what no chain matched"),
    ("listeners:\n  - name: a\n    addresses: []\n", r"listeners\[0\].addresses: needs at least one address"),
    ("chains:\n  - name: a\n    match: {source_type: remote}\n", r"chains\[0\].match.source_type: 'remote' is not one of any, local, external"),
    ("clusters:\n  - name: c\n    endpoints: ['2001:db8::1:80']\n", r"write an IPv6 endpoint as \[ADDRESS\]:PORT"),
    ("clusters:\n  - name: c\n    endpoints: ['web.example:80']\n", r"clusters\[0\].endpoints\[0\]: 'web.example' is not an IP address"),
    ("clusters:\n  - name: c\n    endpoints: ['198.51.100.1:80']\n  - name: c\n    endpoints: ['198.51.100.1:81']\n",
     r"clusters\[1\].name: cluster 'c' is already defined"),
    ("plain_listeners:\n  - name: p\n    port: 1500\n    cluster: none\n", r"plain_listeners\[0\].cluster: unknown cluster"),
    ("addresses: []\n", r"addresses: needs at least one address"),
    ("addresses: ['::', 'eth0']\n", r"addresses\[1\]: 'eth0' is not an IP address"),
    ("idle_timeout: .nan\n", r"idle_timeout: nan is not a duration of at most 365 days"),
    ("connect_timeout: .inf\n", r"connect_timeout: inf is not a duration"),
    ("drain_timeout: " + "9" * 400 + "\n", r"drain_timeout: 9999.*\.\.\.9* is not a duration"),
    ("port: '\u00b2'\n", r"port: '\u00b2' is not a port"),
    ("port: '" + "1" * 5000 + "'\n", r"port: '1111.* is not a port"),
    ("chains: &x [*x]\n", r"proxy.yaml:1: not valid YAML: a YAML alias that refers to itself"),
    ("chains:\n  - name: a\n    match: []\n", r"chains\[0\].match: expected a mapping, got list"),
    ("chains:\n  - name: a\n    cluster: [web]\n", r"chains\[0\].cluster: \['web'\] is not a cluster name"),
    ("plain_listeners:\n  - name: p\n    port: 1500\n    cluster: {a: 1}\n", r"plain_listeners\[0\].cluster: unknown cluster"),
    ("? [a, b]\n: 1\n", r"proxy.yaml:1: not valid YAML: while constructing a mapping, found unhashable key"),
    ("concurrency: 0\n", r"proxy.yaml:1: concurrency: 0 is not a number of workers \(1-64, or auto\)"),
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
    (["run", "--concurrency", "100"], "sidecar-proxy: --concurrency: 100 is not a number of workers (1-64, or auto)"),
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


def test_concurrency_auto_is_a_worker_per_cpu_this_process_may_run_on(tmp_path):
    """From the file or a flag; the number is what the effective config says. With the
    affinity narrowed to one CPU (as a cpuset would), auto is one worker."""
    path = write(tmp_path, "concurrency: auto\n")
    cpus = min(len(os.sched_getaffinity(0)), 64)
    assert cfg.load(path, env={}).concurrency == cpus
    assert cfg.load(None, env={}, flags={"concurrency": "auto"}).concurrency == cpus
    assert cfg.from_data(cfg.load(path, env={}).to_dict()).concurrency == cpus
    code = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from proxy import config; print(config.load(sys.argv[1], env={}).concurrency)")
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["1"], out.stderr
    with pytest.raises(cfg.ConfigError, match=r"concurrency: 'Auto' is not a number of workers \(1-64, or auto\)"):
        cfg.load(write(tmp_path, "concurrency: Auto\n"), env={})


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


LONG = """\
clusters:
  - name: web
    endpoints: ["198.51.100.20:8080", "198.51.100.21:8080"]
    lb_policy: least_request
    source_address: 192.0.2.1
    max_connections: 100
  - name: canary
    endpoints: ["198.51.100.30:8080"]
  - name: passthrough-cluster
    kind: original_dst
    cleanup_interval: 30s
  - name: black-hole
    endpoints: []
listeners:
  - name: outbound
    addresses: ["0.0.0.0:15001"]
    original_dst: true
    hand_off: true
    direction: outbound
    chains:
      - name: split
        match: {ports: [80], source_ports: [40000], source_type: local, transport_protocol: raw_buffer}
        weighted: [{name: web, weight: 9}, {name: canary, weight: 1}]
        stat_prefix: split
        idle_timeout: 10s
        max_connect_attempts: 3
        access_logs: [{path: /dev/null, format: "%START_TIME% %UPSTREAM_HOST%\\n"}]
      - name: nowhere
        match: {ports: [25]}
        cluster: black-hole
    default_chain: {name: out-default, cluster: passthrough-cluster}
  - name: svc-8080
    addresses: ["0.0.0.0:8080"]
    bind: false
    chains:
      - name: svc
        cluster: web
"""


def test_the_long_form_says_what_an_envoy_bootstrap_can_and_reads_back(tmp_path):
    c = cfg.load(write(tmp_path, LONG), env={})
    out, svc = c.listeners
    assert out.hand_off and out.original_dst and out.direction == "outbound" and not svc.bind
    split = out.chains[0]
    assert [w.name for w in split.weighted] == ["web", "canary"] and split.cluster == "web"
    assert split.max_connect_attempts == 3 and split.idle_timeout == 10 and split.stat_prefix == "split"
    assert split.match.source_type == "local" and split.match.source_ports == (40000,)
    assert c.cluster("web").lb_policy == "least_request" and c.cluster("web").max_connections == 100
    assert c.cluster("black-hole").endpoints == () and c.cluster("passthrough-cluster").kind == "original_dst"
    assert c.cluster("passthrough-cluster").cleanup_interval == 30 and c.cluster("web").cleanup_interval == 5
    assert cfg.from_data(c.to_dict()) == c  # a worker gets exactly this


def test_the_short_form_port_cannot_move_a_long_form_listener(tmp_path):
    with pytest.raises(cfg.ConfigError, match=r"^ISTIO_PROXY_PORT: ISTIO_PROXY_PORT sets the short form's port, but"):
        cfg.load(write(tmp_path, LONG), env={"ISTIO_PROXY_PORT": "5001"})
