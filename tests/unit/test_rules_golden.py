"""The rendered rules of iptables/redirect.sh, as golden files.

Every named case runs `sh iptables/redirect.sh ARGS --dry-run` and compares
the output with tests/unit/golden/<name>.rules (iptables-restore input) and,
with `--backend nft-native`, with tests/unit/golden/<name>.nft (nft input).
A dry run needs neither root nor iptables, so these tests run with a PATH
that has no sbin directory (no iptables, no nft): nothing here can touch the
host's rules.

After an intended change of the rules, rewrite the files and review the diff:

    UPDATE_GOLDEN=1 python -m pytest tests/unit/test_rules_golden.py

The same module checks bad input (exit 2, one line on stderr naming the
culprit), the shell's address canonicalisation against glibc's inet_ntop
(which iptables-save uses), and shellcheck on every script.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "iptables"
GOLDEN = Path(__file__).parent / "golden"
SERVICES = "tests/unit/golden/explicit.services"  # relative: the output names it
# /usr/sbin and /sbin hold iptables; without them a dry run must still work
PATH_WITHOUT_IPTABLES = "/usr/bin:/bin"

# name -> (arguments, environment). Every case but ipv6_off says `--ipv6 on`
# so that the output does not depend on the machine's IPv6.
CASES: dict[str, tuple[list[str], dict[str, str]]] = {
    "uid_default": (["--ipv6", "on"], {}),
    "uid_gid": (["--method", "uid", "--proxy-gid", "1337", "--ipv6", "on"], {}),
    "mark": (["--method", "mark", "--ipv6", "on"], {}),
    "env_vars": ([], {
        "SIDECAR_METHOD": "mark",
        "ISTIO_SO_MARK": "0x10",
        "ISTIO_PROXY_PORT": "15001",
        "SIDECAR_EXCLUDE_INBOUND_PORTS": "22",
        "SIDECAR_IPV6": "on",
    }),
    "cgroup_classid": (["--method", "cgroup", "--ipv6", "on"], {}),
    "cgroup_path": (["--method", "cgroup", "--cgroup-path", "/sidecar-proxy.slice", "--ipv6", "on"], {}),
    "explicit": (["--method", "explicit", "--services", SERVICES, "--ipv6", "on"], {}),
    "inbound_ports_split": (
        ["--inbound-ports", ",".join(str(p) for p in range(8000, 8020)), "--ipv6", "on"], {}),
    "exclusions": ([
        "--exclude-inbound-ports", "22,15020",
        "--exclude-outbound-ports", "25,3306",
        "--exclude-cidrs", "198.51.100.0/24,203.0.113.64/26,2001:db8:ffff::/48",
        "--ipv6", "on",
    ], {}),
    "include_cidrs": (["--include-cidrs", "203.0.113.0/24, 198.51.100.128/25, 2001:db8:2::/64", "--ipv6", "on"], {}),
    "include_cidrs_v4_only": (["--include-cidrs", "203.0.113.0/24", "--ipv6", "on"], {}),
    "no_inbound": (["--inbound-ports", "", "--ipv6", "on"], {}),
    "ipv6_off": (["--ipv6", "off"], {}),
    "drop_invalid": (["--drop-invalid", "--ipv6", "on"], {}),
    "tproxy": (["--inbound-mode", "tproxy", "--ipv6", "on"], {}),
    "tproxy_mark_method": (["--inbound-mode", "tproxy", "--method", "mark", "--tproxy-mark", "0x2a",
                            "--tproxy-table", "100", "--exclude-inbound-ports", "22", "--drop-invalid",
                            "--ipv6", "on"], {}),
    "tproxy_env": ([], {"INBOUND_INTERCEPTION_MODE": "tproxy", "INBOUND_TPROXY_MARK": "1337",
                        "SIDECAR_INBOUND_PORTS": "80,443"}),
    "inbound_source": (["--inbound-source", "127.0.0.6", "--method", "explicit", "--services", SERVICES,
                        "--ipv6", "on"], {}),
}


# The same cases for the nft-native backend.
NFT = ["--backend", "nft-native"]
GOLDEN_SUFFIX = {"": ".rules", "nft": ".nft"}


def case_args(name: str, backend: str = "") -> tuple[list[str], dict[str, str]]:
    args, env = CASES[name]
    return (args + NFT if backend == "nft" else args), env


def redirect(*args: str, env: dict[str, str] | None = None, shell: tuple[str, ...] = ("sh",),
             script: str = "redirect.sh") -> subprocess.CompletedProcess[str]:
    """Run a script of iptables/ with a clean environment and no iptables on PATH."""
    return subprocess.run(
        [*shell, f"iptables/{script}", *args],
        cwd=REPO,
        env={"PATH": PATH_WITHOUT_IPTABLES, "LC_ALL": "C", **(env or {})},
        capture_output=True, text=True, timeout=60,
    )


def dry_run(name: str, shell: tuple[str, ...] = ("sh",), backend: str = "") -> str:
    args, env = case_args(name, backend)
    proc = redirect(*args, "--dry-run", env=env, shell=shell)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout


def test_dry_run_runs_without_iptables_on_path():
    assert shutil.which("iptables-restore", path=PATH_WITHOUT_IPTABLES) is None
    assert shutil.which("iptables", path=PATH_WITHOUT_IPTABLES) is None
    assert shutil.which("nft", path=PATH_WITHOUT_IPTABLES) is None


BACKEND_IDS = {"": "iptables", "nft": "nft-native"}


@pytest.mark.parametrize("backend", ["", "nft"], ids=BACKEND_IDS.get)
@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name, backend):
    rendered = dry_run(name, backend=backend)
    path = GOLDEN / f"{name}{GOLDEN_SUFFIX[backend]}"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(rendered)
    assert path.exists(), f"no golden file {path.name}: run with UPDATE_GOLDEN=1 and review it"
    assert rendered == path.read_text(), f"{path.name} differs: run with UPDATE_GOLDEN=1 and review the diff"


def test_no_stale_golden_files():
    assert {p.stem for p in GOLDEN.glob("*.rules")} == set(CASES)
    assert {p.stem for p in GOLDEN.glob("*.nft")} == set(CASES)


@pytest.mark.parametrize("backend", ["", "nft"], ids=BACKEND_IDS.get)
@pytest.mark.parametrize("name", sorted(CASES))
def test_same_rules_from_another_posix_shell(name, backend):
    """dash is /bin/sh here; bash in POSIX mode must render the very same text."""
    assert dry_run(name, shell=("bash", "--posix"), backend=backend) == dry_run(name, backend=backend)


@pytest.fixture(scope="module")
def busybox_path(tmp_path_factory) -> str:
    """A PATH of BusyBox applets and nothing else: the init image is Alpine,
    whose sh, sed, grep and tr are BusyBox's."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox is not installed (apt-get install busybox)"
    directory = tmp_path_factory.mktemp("busybox")
    for applet in BUSYBOX_APPLETS:
        (directory / applet).symlink_to(busybox)
    return str(directory)


# what the scripts may use besides the shell's builtins, iptables and nft
BUSYBOX_APPLETS = ("sh", "sed", "grep", "tr", "id", "cat", "env", "mount", "umount", "chown", "mkdir", "rmdir",
                   "sort", "cut", "diff", "mktemp", "rm")


@pytest.mark.parametrize("backend", ["", "nft"], ids=BACKEND_IDS.get)
@pytest.mark.parametrize("name", sorted(CASES))
def test_same_rules_from_busybox(name, backend, busybox_path):
    args, env = case_args(name, backend)
    proc = subprocess.run([f"{busybox_path}/sh", "iptables/redirect.sh", *args, "--dry-run"], cwd=REPO,
                          env={"PATH": busybox_path, **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == dry_run(name, backend=backend)


def test_busybox_refuses_bad_input_alike(busybox_path, bad_services):
    for args, culprit in BAD_ARGUMENTS:
        args = [a.replace("{tmp}", str(bad_services)) for a in args]
        proc = subprocess.run([f"{busybox_path}/sh", "iptables/redirect.sh", "--dry-run", *args], cwd=REPO,
                              env={"PATH": busybox_path}, capture_output=True, text=True, timeout=60)
        assert_refused(proc, "redirect.sh", culprit)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_rule_has_intent_and_comment(name):
    lines = dry_run(name).splitlines()
    for i, line in enumerate(lines):
        if line.startswith("-A "):
            assert re.search(r' -m comment --comment "sidecar-proxy: [^"]+" -j \S+', line), line
            # a "# why" line above every rule or group of rules
            above = next(prev for prev in reversed(lines[:i]) if not prev.startswith("-A "))
            assert above.startswith("# "), line
            chain = line.split()[1]
            assert chain.startswith("SIDECAR_") or line.split(" -j ")[-1].startswith("SIDECAR_"), \
                f"a built-in chain gets only the jump: {line}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_nft_rule_has_intent_counter_and_comment(name):
    """One table, replaced whole; in it every rule counts and says what it is
    for, with a `# why` line above it or its group; base chains only hook
    our chains in."""
    text = dry_run(name, backend="nft")
    lines = text.splitlines()
    table = lines.index("table inet sidecar_proxy {")
    assert lines[table - 2:table] == ["table inet sidecar_proxy", "delete table inet sidecar_proxy"]
    assert lines[-1] == "}" and text.count("table inet sidecar_proxy {") == 1
    chain = None
    for i, line in enumerate(lines[table + 1:-1], start=table + 1):
        if line.startswith("\tchain "):
            chain = line.split()[1]
        elif line.startswith("\t\t") and not line.startswith(("\t\t#", "\t\ttype ", "\t\telements", "\t\t\t",
                                                               "\t\tflags")):
            assert re.search(r'(?:^\t\t| )counter (return|drop|jump SIDECAR_\w+|redirect to :\d+|ct original zone set \d+|ct mark set meta mark|meta mark set ct mark|meta mark set 0x[0-9a-f]{8} tproxy to :\d+ accept)'
                             r' comment "sidecar-proxy: [^"]+"$', line), line
            above = next(prev for prev in reversed(lines[:i]) if not prev.startswith("\t\t") or
                         prev.startswith("\t\t#"))
            assert above.startswith("\t\t# "), line
            if not chain.startswith("SIDECAR_"):
                assert " jump SIDECAR_" in line, f"a base chain only hooks ours in: {line}"


def test_each_family_section_is_headed_by_a_comment():
    text = dry_run("uid_default")
    headers = [line for line in text.splitlines() if line.startswith("# ====")]
    assert [("IPv4" in h, "IPv6" in h) for h in headers] == [(True, False), (False, True)]
    assert "IPv6 rules" not in dry_run("ipv6_off")


@pytest.mark.parametrize("name", sorted(CASES))
def test_chains_are_declared_from_the_rules(name):
    """Each table declares exactly the chains of ours that its rules are in
    or jump to, in the order the rules first name them (istio-iptables'
    builder derives them the same way), and declares them before any rule."""
    for section in re.split(r"^\*", dry_run(name), flags=re.M)[1:]:
        lines = section.split("\nCOMMIT\n")[0].splitlines()[1:]
        declared = [line[1:].split()[0] for line in lines if line.startswith(":")]
        assert all(line.startswith(":") for line in lines[:len(declared)]), "declarations come first"
        named: list[str] = []
        for line in lines:
            if line.startswith("-A "):
                for chain in (line.split()[1], line.split(" -j ")[-1].split()[0]):
                    if chain.startswith("SIDECAR_") and chain not in named:
                        named.append(chain)
        assert declared == named, section
        assert declared, "every table of ours has a chain of ours"


# ---------------------------------------------------------------- bad input --

BAD_SERVICES = {
    "bad_line.services": "198.51.100.1:80\nfoo\n",
    "bad_port.services": "# fine\n198.51.100.1:99999\n",
    "bare_v6.services": "198.51.100.1:80\n\n2001:db8::1:80\n",
    "host_bits.services": "[2001:db8::1/64]:80\n",
}

# (arguments, text the one line on stderr must contain)
BAD_ARGUMENTS = [
    (["--inbound-mode", "nat"], "--inbound-mode"),
    (["--inbound-mode", "tproxy", "--tproxy-mark", "0"], "--tproxy-mark"),
    (["--inbound-mode", "tproxy", "--tproxy-table", "254"], "--tproxy-table"),
    (["--inbound-mode", "tproxy", "--inbound-source", "127.0.0.6"], "--inbound-source"),
    (["--inbound-source", "127.0.0.1"], "--inbound-source"),
    (["--method", "bogus"], "--method: bogus"),
    (["--proxy-port", "70000"], "--proxy-port: 70000 is not a port (1-65535)"),
    (["--proxy-port", "0"], "--proxy-port: 0"),
    (["--proxy-port", "080"], "--proxy-port: 080"),
    (["--proxy-port", "http"], "--proxy-port: http"),
    (["--proxy-port", "1\n2"], "--proxy-port: 1 2"),
    (["--proxy-uid", "x"], "--proxy-uid: x"),
    (["--proxy-uid", "0"], "--proxy-uid: 0 is root"),
    (["--proxy-uid", "4294967295"], "--proxy-uid: 4294967295"),
    (["--proxy-gid", "-5"], "--proxy-gid: -5"),
    (["--method", "mark", "--mark", "0x1g"], "--mark: 0x1g"),
    (["--method", "mark", "--mark", "0"], "--mark: 0"),
    (["--method", "mark", "--mark", "0x100000000"], "--mark: 0x100000000"),
    (["--method", "cgroup", "--cgroup-classid", "zz"], "--cgroup-classid: zz"),
    (["--method", "cgroup", "--cgroup-classid", "0"], "--cgroup-classid: 0"),
    (["--method", "cgroup", "--cgroup-path", "a b"], "--cgroup-path: a b"),
    (["--method", "cgroup", "--cgroup-path", 'x"y'], "--cgroup-path"),
    (["--method", "cgroup", "--cgroup-dir", "relative/dir"], "--cgroup-dir: relative/dir"),
    (["--method", "cgroup", "--cgroup-dir", "/top"], "--cgroup-dir: /top"),
    (["--method", "cgroup", "--cgroup-dir", "/sys/fs/cgroup/../x"], "--cgroup-dir"),
    (["--inbound-ports", "80,,443"], "--inbound-ports"),
    (["--inbound-ports", "80,99999"], "--inbound-ports: 99999"),
    (["--exclude-inbound-ports", "ssh"], "--exclude-inbound-ports: ssh"),
    (["--exclude-outbound-ports", "*"], "--exclude-outbound-ports: *"),
    (["--include-cidrs", "198.51.100.7/24"], "--include-cidrs: 198.51.100.7/24 has host bits set (the network is 198.51.100.0/24)"),
    (["--exclude-cidrs", "300.1.1.1"], "--exclude-cidrs: 300.1.1.1"),
    (["--exclude-cidrs", "198.51.100.0/33"], "--exclude-cidrs: 198.51.100.0/33"),
    (["--exclude-cidrs", "198.51.100.0/"], "--exclude-cidrs: 198.51.100.0/"),
    (["--exclude-cidrs", "198.051.100.0"], "--exclude-cidrs: 198.051.100.0"),
    (["--exclude-cidrs", "2001:db8::/129"], "--exclude-cidrs: 2001:db8::/129"),
    (["--exclude-cidrs", "2001:db8:::1"], "--exclude-cidrs: 2001:db8:::1"),
    (["--exclude-cidrs", "2001:db8::1::2"], "--exclude-cidrs: 2001:db8::1::2"),
    (["--exclude-cidrs", "1:2:3:4:5:6:7:8:9"], "--exclude-cidrs: 1:2:3:4:5:6:7:8:9"),
    (["--exclude-cidrs", "2001:db8::1/64"], "--exclude-cidrs: 2001:db8::1/64 has host bits set (the network is 2001:db8::/64)"),
    (["--exclude-cidrs", "::ffff:192.0.2.1"], "--exclude-cidrs: ::ffff:192.0.2.1"),
    (["--exclude-cidrs", "::ffff:c000:201"], "--exclude-cidrs: ::ffff:c000:201"),
    (["--ipv6", "off", "--exclude-cidrs", "2001:db8::/32"], "--exclude-cidrs: 2001:db8::/32 is IPv6 but --ipv6 is off"),
    (["--ipv6", "maybe"], "--ipv6: maybe"),
    (["--backend", "iptables"], "--backend: iptables"),
    (["--drop-invalid=yes"], "--drop-invalid: takes no value"),
    (["--bogus"], "--bogus: unknown option"),
    (["--bogus", "value"], "--bogus: unknown option"),
    (["extra"], "unexpected argument: extra"),
    (["--method", "explicit"], "--services"),
    (["--method", "explicit", "--services", "/nonexistent/services"], "/nonexistent/services"),
    (["--method", "explicit", "--services", SERVICES, "--include-cidrs", "198.51.100.0/24"], "--include-cidrs"),
    (["--method", "explicit", "--services", "{tmp}/bad_line.services"], 'bad_line.services line 2: "foo"'),
    (["--method", "explicit", "--services", "{tmp}/bad_port.services"], "bad_port.services line 2: 99999 is not a port"),
    (["--method", "explicit", "--services", "{tmp}/bare_v6.services"], "bare_v6.services line 3"),
    (["--method", "explicit", "--services", "{tmp}/host_bits.services"], "host_bits.services line 1: 2001:db8::1/64 has host bits set"),
    (["--method", "explicit", "--ipv6", "off", "--services", SERVICES], "explicit.services line 6: 2001:db8::10 is IPv6 but --ipv6 is off"),
]


@pytest.fixture
def bad_services(tmp_path):
    for name, text in BAD_SERVICES.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def assert_refused(proc: subprocess.CompletedProcess[str], script: str, culprit: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, repr(proc.stderr)
    assert proc.stderr.startswith(f"{script}: ")
    assert culprit in proc.stderr


@pytest.mark.parametrize(("args", "culprit"), BAD_ARGUMENTS, ids=[" ".join(a)[:60] for a, _ in BAD_ARGUMENTS])
def test_bad_arguments(bad_services, args, culprit):
    args = [a.replace("{tmp}", str(bad_services)) for a in args]
    # --dry-run first: bad input is refused before the dry-run branch, and
    # should a check ever let it through, nothing is installed
    assert_refused(redirect("--dry-run", *args), "redirect.sh", culprit)


@pytest.mark.parametrize(("env", "culprit"), [
    ({"ISTIO_PROXY_PORT": "70000"}, "--proxy-port: 70000"),
    ({"ISTIO_PROXY_UID": "root"}, "--proxy-uid: root"),
    ({"SIDECAR_METHOD": "mark", "ISTIO_SO_MARK": "red"}, "--mark: red"),
    ({"SIDECAR_DROP_INVALID": "maybe"}, "--drop-invalid: maybe"),
    ({"SIDECAR_INCLUDE_CIDRS": "10.0.0.0/33"}, "--include-cidrs: 10.0.0.0/33"),
])
def test_bad_environment(env, culprit):
    assert_refused(redirect("--dry-run", env=env), "redirect.sh", culprit)


def test_option_needs_a_value():
    assert_refused(redirect("--dry-run", "--proxy-port"), "redirect.sh", "--proxy-port: needs a value")


@pytest.mark.parametrize(("args", "culprit"), [
    (["--backend", "foo"], "--backend: foo"),
    (["--cgroup-classid", "zz"], "--cgroup-classid: zz"),
    (["--cgroup-dir", "x"], "--cgroup-dir: x"),
    (["--no-such-option"], "--no-such-option"),
])
def test_cleanup_bad_arguments(args, culprit):
    assert_refused(redirect("--dry-run", *args, script="cleanup.sh"), "cleanup.sh", culprit)


def test_option_values_can_be_given_with_equals():
    assert redirect("--dry-run", "--ipv6=on", "--proxy-port=15001").stdout == \
        redirect("--dry-run", "--ipv6", "on", "--proxy-port", "15001").stdout


def test_command_line_beats_environment():
    proc = redirect("--dry-run", "--ipv6", "off", "--proxy-port", "15001", env={"ISTIO_PROXY_PORT": "7000"})
    assert "--to-ports 15001" in proc.stdout and "7000" not in proc.stdout


# ------------------------------------------------------- documented contract --

def _options_in(path: Path) -> set[str]:
    """The option names of option_set's case patterns (`--a | --b)`)."""
    patterns = re.findall(r"^\t(--[a-z0-9-]+(?: \| --[a-z0-9-]+)*)\)", path.read_text(), re.M)
    return {name for pattern in patterns for name in pattern.split(" | ")}


def test_help_and_readme_name_every_option():
    options = _options_in(SCRIPTS / "lib.sh") | {"--dry-run", "--check", "--reconcile", "--drop-invalid", "--help"}
    assert len(options) > 15
    usage = redirect("--help").stdout
    readme = (SCRIPTS / "README.md").read_text()
    for option in options:
        assert option in usage, f"--help does not mention {option}"
        assert f"`{option}" in readme, f"README.md does not document {option}"
    env_vars = set(re.findall(r"\$\{((?:ISTIO|SIDECAR)_[A-Z_]+)", (SCRIPTS / "lib.sh").read_text()))
    assert len(env_vars) >= 17
    for var in env_vars:
        assert var in usage and var in readme, var


def test_help_exits_zero():
    for script in ("redirect.sh", "cleanup.sh"):
        proc = redirect("--help", script=script)
        assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr


# ------------------------------------------- addresses as iptables-save writes --

def _run_cidr(cidr: str) -> subprocess.CompletedProcess[str]:
    return redirect("--dry-run", "--ipv6", "on", "--exclude-cidrs", cidr)


def _rendered_cidr(proc: subprocess.CompletedProcess[str]) -> str:
    match = re.search(r"excluded destination (\S+)\"", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


# Runs of zero groups are where "::" compression goes wrong: half of the
# addresses are built from groups that are 0 half of the time.
_groups = st.lists(st.one_of(st.just(0), st.integers(0, 0xFFFF)), min_size=8, max_size=8)
IPV6_ADDRESSES = st.one_of(
    st.integers(min_value=0, max_value=2**128 - 1),
    _groups.map(lambda groups: int("".join(f"{g:04x}" for g in groups), 16)),
)


@settings(max_examples=150, deadline=None)
@given(
    address=IPV6_ADDRESSES,
    prefix=st.integers(min_value=0, max_value=128),
    spelling=st.sampled_from(["compressed", "exploded", "upper"]),
)
def test_ipv6_networks_are_written_like_inet_ntop(address, prefix, spelling):
    """The shell's RFC 5952 formatter against glibc's inet_ntop, the one
    iptables-save prints with: any spelling in, canonical text out."""
    network = ipaddress.IPv6Network((address, prefix), strict=False)
    text = {"compressed": network.compressed, "exploded": network.exploded,
            "upper": network.exploded.upper()}[spelling]
    proc = _run_cidr(text)
    expected = socket.inet_ntop(socket.AF_INET6, network.network_address.packed)
    if "." in expected:  # IPv4-mapped/-compatible: inet_ntop writes a dotted tail
        assert proc.returncode == 2 and "IPv4-mapped" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    if prefix == 0:  # a match on every address: iptables-save omits it, so do we
        assert "excluded destination ::/0\" -j RETURN" in proc.stdout
        assert "-d ::/0" not in proc.stdout
    else:
        assert _rendered_cidr(proc) == f"{expected}/{prefix}"
        assert f"-d {expected}/{prefix} " in proc.stdout


@settings(max_examples=100, deadline=None)
@given(address=st.integers(min_value=0, max_value=2**32 - 1), prefix=st.integers(min_value=1, max_value=32))
def test_ipv4_networks_and_host_bits(address, prefix):
    given_net = ipaddress.IPv4Network((address, prefix), strict=False)
    proc = _run_cidr(f"{ipaddress.IPv4Address(address)}/{prefix}")
    if ipaddress.IPv4Address(address) == given_net.network_address:
        assert proc.returncode == 0, proc.stderr
        assert _rendered_cidr(proc) == str(given_net)
    else:
        assert proc.returncode == 2
        assert f"has host bits set (the network is {given_net})" in proc.stderr


def test_a_bare_address_is_a_host_route():
    assert _rendered_cidr(_run_cidr("198.51.100.7")) == "198.51.100.7/32"
    assert _rendered_cidr(_run_cidr("2001:DB8::7")) == "2001:db8::7/128"


# ---------------------------------------------------------------- shellcheck --

def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed (apt-get install shellcheck)"
    scripts = sorted(str(p) for p in SCRIPTS.rglob("*.sh"))
    assert len(scripts) >= 9
    # -x follows the sourced files, so the entry points are checked together
    # with lib.sh, rules.sh, apply.sh and a method file; -s sh: POSIX only
    proc = subprocess.run([shellcheck, "-x", "-s", "sh", *scripts], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_need_nothing_but_sh_and_iptables():
    """The init image is tiny: no bash, python, awk or perl in the scripts."""
    for path in SCRIPTS.rglob("*.sh"):
        text = path.read_text()
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        for tool in ("awk", "python", "perl", "bash", "[[ "):
            assert tool not in code, f"{path.name} uses {tool}"
        # the keyword, not `ip route add local ...`
        assert not re.search(r"^\s*local\s", code, re.M), f"{path.name} uses local"
        first = text.splitlines()[0]
        assert first in ("#!/bin/sh", "# shellcheck shell=sh"), f"{path.name}: {first}"
