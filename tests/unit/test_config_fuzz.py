"""Hostile configuration: `check` and `run` answer every bad input with exit 2 and one line.

Each input runs as a user would run it (`sidecar-proxy check --config F`,
then `run` with the same file when check refused it), capped at 2 s of CPU
and 256 MB of address space (capped_cli.py): a traceback, a crash, a
MemoryError or a CPU overrun all fail the test. The seeds are the cases the
hardening issue reproduced (alias bomb, the ambiguity check's blow-up,
reserved names, a 5,000-digit integer, a file that is not UTF-8, nesting 500
deep, a NUL in a path, `--concurrency ²`); hypothesis adds its own, built
from the config's keys and from the seeds with bytes changed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from capped_cli import CappedCli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import SETTINGS

REPO = Path(__file__).resolve().parents[2]


def alias_bomb(levels: int = 9) -> str:
    """The 'billion laughs': each level nine aliases of the one before (9**9 strings)."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"[:levels - 1], strict=False):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def ambiguous_product(n: int = 100) -> str:
    """Two identical chains, each n ports x n destinations x n sources (about 20 KB)."""
    match = {"ports": list(range(1, n + 1)), "destinations": [f"198.51.100.{i}/32" for i in range(n)],
             "sources": [f"203.0.113.{i}/32" for i in range(n)]}
    return yaml.safe_dump({"chains": [{"name": "a", "match": match}, {"name": "b", "match": match}]})


def nested(depth: int, flow: str = "[]") -> str:
    return "chains: " + flow[0] * depth + flow[1] * depth + "\n"


# (name, file bytes or None for no file, extra flags): every one must be refused with exit 2 and one line
SEEDS: list[tuple[str, bytes | None, tuple[str, ...]]] = [
    ("alias bomb (item 7)", alias_bomb().encode(), ()),
    ("alias bomb in chains (item 7)", (alias_bomb() + "chains: *i\n").encode(), ()),
    ("alias that refers to itself", b"chains: &x [*x]\n", ()),
    ("ports x destinations x sources (item 8)", ambiguous_product().encode(), ()),
    ("a reject chain named passthrough (item 9)", b"chains: [{name: passthrough, action: reject}]\n", ()),
    ("a chain named blackhole (item 9)", b"chains: [{name: blackhole, match: {ports: [25]}}]\n", ()),
    ("a cluster named original_dst (item 9)",
     b"clusters: [{name: original_dst, endpoints: ['198.51.100.1:80'], connect_timeout: 1s, mark: 0x2}]\n", ()),
    ("a cluster named passthrough (item 9)", b"clusters: [{name: passthrough, endpoints: ['198.51.100.1:80']}]\n", ()),
    ("--concurrency superscript two (item 11)", None, ("--concurrency", "\u00b2")),
    ("--port of 5,000 digits (item 11)", None, ("--port", "7" * 5000)),
    ("port: 5,000 digits (item 11)", b"port: " + b"9" * 5000 + b"\n", ()),
    ("mark: 5,000 digits (item 11)", b"mark: " + b"1" * 5000 + b"\n", ()),
    ("mark: 5,000 hex digits (item 11)", b"mark: 0x" + b"f" * 5000 + b"\n", ()),
    ("a file that is not UTF-8 (item 11)", b"port: 5001\n# caf\xe9\n", ()),
    ("UTF-16 (item 11)", "port: 5001\n".encode("utf-16"), ()),
    ("lists nested 500 deep (item 11)", nested(500).encode(), ()),
    ("mappings nested 500 deep (item 11)", ("chains: " + "{a: " * 500 + "1" + "}" * 500 + "\n").encode(), ()),
    ("block mappings nested 500 deep (item 11)",
     "".join(" " * i + f"k{i}:\n" for i in range(500)).encode(), ()),
    ("an access_log path with a NUL byte (item 11)", b'access_log: "/tmp/access\\0.log"\n', ()),
    ("a cgroup path with a NUL byte", b'cgroup: "/sys/fs/cgroup\\0"\n', ()),
    ("a chain's access log path with a NUL byte",
     b'chains: [{name: web, match: {ports: [80]}, access_logs: [{path: "/tmp/a\\0"}]}]\n', ()),
    ("a date with a 13th month", b"port: 2001-13-45\n", ()),
    ("a key null (found by this test: check looped for good)", b"null: 1\n", ()),
    ("a key true", b"true: 1\n", ()),
    ("2 MiB of config", b"# " + b"x" * (2 << 20) + b"\n", ()),
    ("a million flow items", b"chains: [" + b"1," * (500_000) + b"]\n", ()),
]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    helper = CappedCli(str(REPO), str(tmp_path_factory.mktemp("cwd")))
    yield helper
    helper.close()


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "proxy.yaml"


def refused_in_one_line(cli: CappedCli, path: Path, data: bytes | None, flags: tuple[str, ...]) -> str:
    """check and run both exit 2 with the same single line; that line."""
    argv = [*flags]
    if data is not None:
        path.write_bytes(data)
        argv += ["--config", str(path)]
    lines = []
    for command in ("check", "run"):
        status, out, err = cli.run(command, *argv)
        assert status == 2, f"{command}: exit {status}\n{err[-2000:]}"
        assert out == "", f"{command} printed {out[:200]!r}"
        assert err.count("\n") == 1 and err.startswith("sidecar-proxy: "), f"{command}: {err[-2000:]}"
        lines.append(err)
    assert lines[0] == lines[1]
    return lines[0]


@pytest.mark.parametrize("name, data, flags", SEEDS, ids=[s[0] for s in SEEDS])
def test_hostile_input_is_refused_in_one_line(cli, config_path, name, data, flags):
    line = refused_in_one_line(cli, config_path, data, flags)
    assert len(line) < 400, line


def test_the_seeds_name_what_is_wrong(cli, config_path):
    said = {name: refused_in_one_line(cli, config_path, data, flags) for name, data, flags in SEEDS}
    assert "alias bomb" in said["alias bomb (item 7)"]
    assert "proxy.yaml:1: not valid YAML: a YAML alias that refers to itself" in said["alias that refers to itself"]
    assert "chains[1].match: matches the same connections as chains[0]" in said["ports x destinations x sources (item 8)"]
    assert "chains[0].name: 'passthrough' is the name of one of the proxy's own" in said["a reject chain named passthrough (item 9)"]
    assert "clusters[0].name: 'original_dst' is the name of one of the proxy's own" in said["a cluster named original_dst (item 9)"]
    assert "--concurrency: '\u00b2' is not a number of workers" in said["--concurrency superscript two (item 11)"]
    assert "--port: '777" in said["--port of 5,000 digits (item 11)"]
    assert "proxy.yaml:1: '99999999999999999'... (5000 characters) is too long for an integer" \
        in said["port: 5,000 digits (item 11)"]
    assert "proxy.yaml:2: not UTF-8 text (byte 0xe9 at offset 16)" in said["a file that is not UTF-8 (item 11)"]
    assert "proxy.yaml:1: nested deeper than 64 levels" in said["lists nested 500 deep (item 11)"]
    assert "proxy.yaml:64: nested deeper than 64 levels" in said["block mappings nested 500 deep (item 11)"]
    assert "access_log: '/tmp/access\\x00.log' holds a NUL byte" in said["an access_log path with a NUL byte (item 11)"]
    assert "larger than 1048576 bytes" in said["2 MiB of config"]
    assert "more than 50000 values" in said["a million flow items"]


# --- generated inputs ----------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**300, max_value=10**320),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["5001", "0x1", "5s", "::", "127.0.0.1", "198.51.100.1:80", "[2001:db8::1]:80", "reject",
                     "cluster", "original", "passthrough", "original_dst", "blackhole", "/tmp/x\0y", "\u00b2"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(["name", "match", "ports", "destinations", "sources",
                                                         "direction", "action", "cluster", "endpoints", "address",
                                                         "port", "mark", "connect_timeout", "x"]), inner, max_size=4),
                      max_leaves=20)
configs = st.dictionaries(st.sampled_from([*SETTINGS, "clusters", "chains", "plain_listeners", "other"]), values,
                          max_size=6)
MUTATION_BYTES = b"&*[]{}:-,\n\t \0\xff\"'!#%|>?@`\\0123456789abx"
seed_texts = [data for _, data, _ in SEEDS if data is not None and len(data) < 30_000] + [
    b"port: 5001\nchains:\n  - name: web\n    match: {ports: [80], destinations: ['198.51.100.0/24']}\n"
    b"    cluster: web\nclusters:\n  - name: web\n    endpoints: ['198.51.100.1:80']\n",
]


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(seed_texts)))
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "repeat"]))
        byte = draw(st.sampled_from(MUTATION_BYTES))
        if kind == "insert":
            data[at:at] = bytes([byte])
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 20))]
        elif kind == "replace" and at < len(data):
            data[at] = byte
        else:
            end = min(len(data), at + draw(st.integers(1, 40)))
            data[at:at] = data[at:end] * draw(st.integers(2, 50))
    return bytes(data)


def check_one(cli: CappedCli, path: Path, data: bytes) -> None:
    path.write_bytes(data)
    status, out, err = cli.run("check", "--config", str(path))
    assert status in (0, 2), f"check: exit {status}\n{err[-2000:]}"
    if status == 0:
        assert err == "" and yaml.safe_load(out) is not None
    else:
        refused_in_one_line(cli, path, data, ())


FUZZ = settings(max_examples=int(os.environ.get("SIDECAR_PROXY_FUZZ_EXAMPLES", "100")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(config=configs)
def test_generated_configs_pass_or_are_refused_in_one_line(cli, config_path, config):
    check_one(cli, config_path, yaml.safe_dump(config, allow_unicode=True).encode())


@FUZZ
@given(data=mutated())
def test_mutated_configs_pass_or_are_refused_in_one_line(cli, config_path, data):
    check_one(cli, config_path, data)
