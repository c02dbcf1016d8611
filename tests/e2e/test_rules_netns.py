"""iptables/redirect.sh and cleanup.sh against the kernel.

Every test gets a network namespace of its own (`ip netns add scp-rt-...`,
never linked to anything, deleted afterwards) and runs the scripts inside it
with `ip netns exec`, so the host's rules are never read or touched. Needs
root, iproute2, iptables (nft and legacy) and util-linux, like CI has: a
missing tool fails, nothing is skipped.

How "the dry run is what gets installed" is compared: the scripts render
every rule the way iptables-save prints it (option order, /32 masks, hex
marks, decimal classids, compressed IPv6), so the rules are compared as
text, verbatim, chain by chain and in order. The only things dropped are
what the kernel cannot keep (our `#` intent lines) and what it adds (the
packet counters and iptables-save's timestamp comments). Anything else that
differs is a real difference.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import init_image_bin

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
BACKENDS = ["nft", "legacy"]
BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
PROXY_UID = 1337
SERVICES = "tests/unit/golden/explicit.services"
PORTS_20 = ",".join(str(p) for p in range(9000, 9020))


def run(cmd: list[str], *, check: bool = True, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; with check, fail on a non-zero exit."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 100000}{secrets.token_hex(3)}"


class Netns:
    """A throwaway network namespace and the commands we run in it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def enter(self, *, mounts: bool) -> list[str]:
        # `ip netns exec` also gives the command a mount namespace of its own
        # (its mounts vanish when it exits); the net_cls cgroup tests need
        # their mount to outlive the command, so they only switch networks.
        if mounts:
            return ["nsenter", f"--net=/run/netns/{self.name}"]
        return ["ip", "netns", "exec", self.name]

    def run(self, *cmd: str, check: bool = True, mounts: bool = False,
            prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        return run([*prefix, *self.enter(mounts=mounts), *cmd], check=check, cwd=REPO)

    def script(self, script: str, *args: str, path: str = PATH, env: dict[str, str] | None = None,
               mounts: bool = False, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        """Run iptables/SCRIPT in the namespace, with a clean environment."""
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        return self.run("env", "-i", f"PATH={path}", "LC_ALL=C", *extra, "sh", f"iptables/{script}", *args,
                        check=False, mounts=mounts, prefix=prefix)

    def save(self, backend: str) -> dict[int, str]:
        """iptables-save of both families, without timestamps and counters."""
        out = {}
        for family, tool in ((4, "iptables"), (6, "ip6tables")):
            text = self.run(f"{tool}-{backend}-save").stdout
            lines = [re.sub(r"\[\d+:\d+\]$", "[0:0]", line) for line in text.splitlines() if not line.startswith("#")]
            out[family] = "\n".join(lines)
        return out

    def save_all(self) -> dict[str, dict[int, str]]:
        return {backend: self.save(backend) for backend in BACKENDS}

    def iptables(self, backend: str, family: int, *args: str) -> None:
        tool = "iptables" if family == 4 else "ip6tables"
        self.run(f"{tool}-{backend}", "-w", *args)

    def add_foreign_rules(self, backend: str, tag: str = "1") -> None:
        """Rules and chains of somebody else, in every table we touch."""
        for family, addr in ((4, "192.0.2.99"), (6, "2001:db8::99")):
            for table in ("nat", "mangle", "raw", "filter"):
                chain = f"FOREIGN{tag}"
                if tag == "1":
                    self.iptables(backend, family, "-t", table, "-N", chain)
                    self.iptables(backend, family, "-t", table, "-A", chain, "-d", addr, "-j", "RETURN")
                self.iptables(backend, family, "-t", table, "-A", "OUTPUT", "-p", "tcp", "-m", "comment",
                              "--comment", f"foreign {tag}", "-j", "FOREIGN1")


@pytest.fixture
def ns() -> Iterator[Netns]:
    name = unique("scp-rt-")
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield Netns(name)
    finally:
        run(["ip", "netns", "delete", name], check=False)


# ------------------------------------------------------------- comparisons --

def ours(text: str) -> dict[str, dict[str, list[str]]]:
    """Our part of restore input or iptables-save output: per table, our
    chains (empty ones too) with their rules in order, and in built-in
    chains only the jumps into ours. Comments and declarations' counters
    do not count."""
    tables: dict[str, dict[str, list[str]]] = {}
    chains: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            chains = tables.setdefault(line[1:], {})
        elif line.startswith(":SIDECAR_"):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            chain = line.split()[1]
            if chain.startswith("SIDECAR_") or (chain in BUILTIN and re.search(r" -j SIDECAR_\w+$", line)):
                chains.setdefault(chain, []).append(line)
    return {table: chains for table, chains in tables.items() if chains}


def others(text: str) -> str:
    """Everything in iptables-save output that is not ours."""
    keep = []
    for line in text.splitlines():
        if line.startswith((":SIDECAR_", "-A SIDECAR_")) or re.search(r" -j SIDECAR_\w+$", line):
            continue
        keep.append(line)
    return "\n".join(keep)


def table(text: str, name: str) -> list[str]:
    """The lines of one table in iptables-save output."""
    section = re.search(rf"^\*{name}$(.*?)^COMMIT$", text, flags=re.M | re.S)
    assert section, f"no table {name}"
    return section.group(1).strip().splitlines()


def families(dry_run: str) -> dict[int, str]:
    """The dry-run output split at its per-family header lines."""
    parts = re.split(r"^# ==== sidecar-proxy (IPv4|IPv6) rules.*$", dry_run, flags=re.M)
    assert parts[0].strip() == "", parts[0]
    return {4 if name == "IPv4" else 6: body for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), repr(proc.stderr)
    for fragment in fragments:
        assert fragment in proc.stderr


def assert_installed_as_dry_run(ns: Netns, backend: str, args: list[str], before: dict[int, str],
                                mounts: bool = False) -> None:
    dry = ns.script("redirect.sh", *args, "--dry-run", mounts=mounts)
    assert_ok(dry)
    expected = families(dry.stdout)
    after = ns.save(backend)
    for family in (4, 6):
        assert ours(after[family]) == ours(expected.get(family, "")), f"IPv{family}"
        assert others(after[family]) == others(before[family]), f"IPv{family}: somebody else's rules changed"


# ------------------------------------------------------------------ tests ---

CASES = {
    "uid": ["--method", "uid"],
    "uid_gid": ["--method", "uid", "--proxy-gid", "1337"],
    "mark": ["--method", "mark", "--mark", "0x20"],
    "explicit": ["--method", "explicit", "--services", SERVICES],
    "lists": ["--exclude-inbound-ports", "22,15020", "--exclude-outbound-ports", PORTS_20,
              "--include-cidrs", "203.0.113.0/24,2001:db8:2::/64",
              "--exclude-cidrs", "203.0.113.128/25,2001:db8:2:0:8000::/65", "--proxy-port", "15001"],
    "inbound_split": ["--inbound-ports", PORTS_20],
    "no_inbound": ["--inbound-ports", ""],
    "drop_invalid": ["--drop-invalid"],
    "ipv6_off": ["--ipv6", "off"],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_is_what_gets_installed(ns, backend, case):
    ns.add_foreign_rules(backend)
    before = ns.save(backend)
    proc = ns.script("redirect.sh", *CASES[case], "--backend", backend)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("redirect.sh: installed: ")
    assert_installed_as_dry_run(ns, backend, CASES[case], before)
    other = "legacy" if backend == "nft" else "nft"
    assert "SIDECAR" not in str(ns.save(other)), "the other backend must stay untouched"


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_input_is_the_dry_run_text(ns, backend, tmp_path):
    """On a fresh namespace the restore programs get exactly the dry-run
    text; on a re-run, our old jumps are deleted first and the new ones go
    where the old ones were. (A shim records the input, then runs the real
    program.)"""
    for tool in (f"iptables-{backend}-restore", f"ip6tables-{backend}-restore"):
        real = shutil.which(tool)
        assert real
        shim(tmp_path, tool, f'tee -a {tmp_path}/{tool}.input | {real} "$@"\n')
    args = ["--method", "mark", "--drop-invalid", "--backend", backend]
    dry = families(ns.script("redirect.sh", *args, "--dry-run").stdout)
    assert ns.script("redirect.sh", *args, path=f"{tmp_path}:{PATH}").returncode == 0
    assert (tmp_path / f"iptables-{backend}-restore.input").read_text() == dry[4].strip("\n") + "\n"
    assert (tmp_path / f"ip6tables-{backend}-restore.input").read_text() == dry[6].strip("\n") + "\n"

    (tmp_path / f"iptables-{backend}-restore.input").unlink()
    assert ns.script("redirect.sh", *args, path=f"{tmp_path}:{PATH}").returncode == 0
    rerun = (tmp_path / f"iptables-{backend}-restore.input").read_text().splitlines()
    assert rerun[:3] == [
        "*nat",
        '-D PREROUTING -p tcp -m comment --comment "sidecar-proxy: inbound capture" -j SIDECAR_INBOUND',
        '-D OUTPUT -p tcp -m comment --comment "sidecar-proxy: outbound capture" -j SIDECAR_OUTPUT',
    ]
    assert '-I OUTPUT 1 -p tcp -m comment --comment "sidecar-proxy: outbound capture" -j SIDECAR_OUTPUT' in rerun


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_twice_is_running_once(ns, backend):
    args = ["--method", "uid", "--proxy-gid", "1337", "--drop-invalid", "--backend", backend]
    ns.add_foreign_rules(backend)
    assert ns.script("redirect.sh", *args).returncode == 0
    once = ns.save_all()
    assert ns.script("redirect.sh", *args).returncode == 0
    assert ns.save_all() == once


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerun_replaces_our_rules_and_keeps_our_place(ns, backend):
    ns.add_foreign_rules(backend, "1")
    assert ns.script("redirect.sh", "--method", "uid", "--drop-invalid", "--backend", backend).returncode == 0
    ns.add_foreign_rules(backend, "2")  # appended after our jumps
    before = ns.save(backend)
    new = ["--method", "mark", "--inbound-ports", "80,443", "--backend", backend]
    assert ns.script("redirect.sh", *new).returncode == 0
    after = ns.save(backend)
    for family in (4, 6):
        assert "SIDECAR_DROP_INVALID" not in after[family], "a chain the new rules do not have must go"
        nat_output = [line for line in table(after[family], "nat") if line.startswith("-A OUTPUT")]
        assert [line.split(" -j ")[-1] for line in nat_output if "FOREIGN1" in line or "SIDECAR" in line] == \
            ["FOREIGN1", "SIDECAR_OUTPUT", "FOREIGN1"], "our jump must stay between the foreign rules"
    assert_installed_as_dry_run(ns, backend, new, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerun_with_less_removes_what_is_no_longer_asked_for(ns, backend):
    """From everything to no inbound capture and no IPv6: the inbound chains,
    their jump and all IPv6 rules go."""
    ns.add_foreign_rules(backend)
    before = ns.save(backend)
    assert ns.script("redirect.sh", "--drop-invalid", "--backend", backend).returncode == 0
    less = ["--inbound-ports", "", "--ipv6", "off", "--backend", backend]
    assert ns.script("redirect.sh", *less).returncode == 0
    assert_installed_as_dry_run(ns, backend, less, before)
    after = ns.save(backend)
    assert "SIDECAR_INBOUND" not in after[4] and "SIDECAR" not in after[6]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_restores_exactly_what_was_there(ns, backend):
    ns.add_foreign_rules(backend)
    before = ns.save_all()
    args = ["--method", "uid", "--proxy-gid", "1337", "--drop-invalid", "--inbound-ports", PORTS_20]
    assert ns.script("redirect.sh", *args, "--backend", backend).returncode == 0
    assert ns.save_all() != before
    dry = ns.script("cleanup.sh", *args, "--dry-run")
    assert_ok(dry)
    assert "-X SIDECAR_OUTPUT" in dry.stdout
    assert ns.save_all() != before, "cleanup --dry-run must remove nothing"
    for _ in range(2):  # and a second time: nothing left to do, still fine
        assert_ok(ns.script("cleanup.sh", *args))
        assert ns.save_all() == before
    assert ns.script("cleanup.sh", "--dry-run").stdout == ""


def nft_ruleset(ns: Netns) -> str:
    return ns.run("nft", "list", "ruleset").stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_on_a_fresh_namespace_leaves_no_empty_tables(ns, backend):
    """Nothing at all before: the tables our rules needed (nat, raw, mangle)
    are our residue. With the nft backend cleanup.sh deletes the ones it
    emptied, so iptables-save and `nft list ruleset` are as they were. With
    the legacy backend the kernel keeps a table for the life of the
    namespace once it was used, and iptables has no way to remove it: what
    stays is exactly the built-in chains of those tables, empty, policy
    ACCEPT (iptables/README.md, "Clean-up")."""
    before, before_nft = ns.save_all(), nft_ruleset(ns)
    assert before == {"nft": {4: "", 6: ""}, "legacy": {4: "", 6: ""}} and before_nft == ""
    args = ["--method", "mark", "--drop-invalid", "--backend", backend]
    assert_ok_installed(ns.script("redirect.sh", *args))
    assert_ok(ns.script("cleanup.sh", *args))
    after = ns.save_all()
    if backend == "nft":
        assert after == before
        assert nft_ruleset(ns) == before_nft
        return
    assert after["nft"] == before["nft"] and nft_ruleset(ns) == before_nft
    for family in (4, 6):
        assert set(re.findall(r"^\*(\w+)$", after["legacy"][family], re.M)) == {"nat", "raw", "mangle"}
        for name in ("nat", "raw", "mangle"):
            lines = table(after["legacy"][family], name)
            assert lines and all(re.fullmatch(r":[A-Z]+ ACCEPT \[0:0\]", line) for line in lines), lines


def assert_ok_installed(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("redirect.sh: installed: ")


def test_cleanup_removes_ours_from_both_backends(ns):
    for backend in BACKENDS:
        ns.add_foreign_rules(backend)
    before = ns.save_all()
    for backend in BACKENDS:
        assert ns.script("redirect.sh", "--backend", backend).returncode == 0
    assert_ok(ns.script("cleanup.sh"))
    assert ns.save_all() == before


@pytest.mark.parametrize(("args", "fragment"), [
    (["--method", "bogus"], "--method: bogus"),
    (["--proxy-port", "70000"], "--proxy-port: 70000 is not a port"),
    (["--exclude-cidrs", "198.51.100.7/24"], "host bits"),
    (["--method", "explicit", "--services", "/nonexistent"], "/nonexistent"),
    (["--ipv6", "off", "--include-cidrs", "2001:db8::/32"], "--ipv6 is off"),
])
def test_bad_arguments_touch_nothing(ns, args, fragment):
    for backend in BACKENDS:
        ns.add_foreign_rules(backend)
    assert ns.script("redirect.sh", "--method", "mark").returncode == 0
    before = ns.save_all()
    assert_one_line_error(ns.script("redirect.sh", *args), 2, fragment)
    assert ns.save_all() == before


def test_missing_iptables_touches_nothing(ns):
    ns.add_foreign_rules("nft")
    before = ns.save_all()
    for backend in ("auto", "nft", "legacy"):
        proc = ns.script("redirect.sh", "--backend", backend, path="/usr/bin:/bin")
        assert_one_line_error(proc, 2, "not found: install iptables")
    assert ns.save_all() == before


def test_not_root_touches_nothing(ns):
    """Run as UID 1337 for real (setpriv), from a copy of the scripts that
    UID can read."""
    ns.add_foreign_rules("nft")
    before = ns.save_all()
    copy = Path(tempfile.mkdtemp(prefix="scp-rt-"))
    try:
        shutil.copytree(REPO / "iptables", copy / "iptables")
        for path in [copy, *copy.rglob("*")]:
            path.chmod(0o755)
        proc = ns.run("setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
                      "env", "-i", f"PATH={PATH}", "sh", str(copy / "iptables" / "redirect.sh"), check=False)
        assert_one_line_error(proc, 2, "needs root")
        # a dry run needs no root
        proc = ns.run("setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
                      "env", "-i", f"PATH={PATH}", "sh", str(copy / "iptables" / "redirect.sh"), "--dry-run",
                      check=False)
        assert_ok(proc)
    finally:
        shutil.rmtree(copy)
    assert ns.save_all() == before


def shim(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("earlier", ["fresh", "installed before"])
def test_ipv6_failure_rolls_ipv4_back(ns, backend, earlier, tmp_path):
    """IPv4 is committed first; when ip6tables-restore then fails, IPv4 must
    go back to what it was: nothing, or the earlier install (in its place)."""
    ns.add_foreign_rules(backend)
    if earlier == "installed before":
        assert ns.script("redirect.sh", "--method", "uid", "--backend", backend).returncode == 0
        ns.add_foreign_rules(backend, "2")
    before = ns.save_all()
    shim(tmp_path, f"ip6tables-{backend}-restore", 'echo "shim: ip6tables-restore refuses" >&2\nexit 1\n')
    proc = ns.script("redirect.sh", "--method", "mark", "--drop-invalid", "--backend", backend,
                     path=f"{tmp_path}:{PATH}")
    assert_one_line_error(proc, 1, f"ip6tables-{backend}-restore failed", "shim: ip6tables-restore refuses",
                          "rolled back")
    assert ns.save_all() == before


def test_rollback_on_a_fresh_namespace_leaves_no_empty_tables(ns, tmp_path):
    """IPv4 goes in (creating its tables), IPv6 fails: the rollback also
    deletes the IPv4 tables that this run created."""
    before, before_nft = ns.save_all(), nft_ruleset(ns)
    shim(tmp_path, "ip6tables-nft-restore", 'echo "shim: ip6tables-restore refuses" >&2\nexit 1\n')
    proc = ns.script("redirect.sh", "--drop-invalid", "--backend", "nft", path=f"{tmp_path}:{PATH}")
    assert_one_line_error(proc, 1, "rolled back")
    assert ns.save_all() == before and nft_ruleset(ns) == before_nft


@pytest.mark.parametrize("backend", BACKENDS)
def test_failure_after_one_table_of_a_family_rolls_it_back(ns, backend, tmp_path):
    """iptables-restore commits table by table: here the nat table goes in
    for real and then the mangle table fails."""
    real = shutil.which(f"iptables-{backend}-restore")
    assert real
    # commits the first table for real; fails if there was more (so that the
    # rollback, one table, goes through)
    shim(tmp_path, f"iptables-{backend}-restore", f"""input=$(cat)
printf '%s\\n' "$input" | sed '/^COMMIT$/q' | {real} "$@" || exit 1
if [ "$(printf '%s\\n' "$input" | grep -c '^COMMIT$')" -gt 1 ]; then
    echo "shim: failed after the first table" >&2
    exit 1
fi
""")
    ns.add_foreign_rules(backend)
    before = ns.save_all()
    proc = ns.script("redirect.sh", "--drop-invalid", "--backend", backend, path=f"{tmp_path}:{PATH}")
    assert_one_line_error(proc, 1, "failed after the first table", "rolled back")
    assert ns.save_all() == before


def test_auto_backend_follows_the_rules_already_there(ns):
    # nothing anywhere: nft
    assert "backend nft" in ns.script("redirect.sh").stdout
    assert "SIDECAR" in str(ns.save("nft")) and "SIDECAR" not in str(ns.save("legacy"))
    assert_ok(ns.script("cleanup.sh"))
    # the platform uses legacy: so do we
    ns.add_foreign_rules("legacy")
    assert "backend legacy" in ns.script("redirect.sh").stdout
    assert "SIDECAR" in str(ns.save("legacy")) and "SIDECAR" not in str(ns.save("nft"))
    # a re-run stays where our rules are, even if nft now holds more rules
    ns.add_foreign_rules("nft")
    ns.add_foreign_rules("nft", "2")
    ns.add_foreign_rules("nft", "3")
    assert "backend legacy" in ns.script("redirect.sh").stdout
    assert "SIDECAR" not in str(ns.save("nft"))


@pytest.fixture
def busybox_only(tmp_path) -> str:
    """A PATH with BusyBox applets and the iptables programs, nothing else:
    what the init image (Alpine) has."""
    directory = tmp_path / "busybox"
    directory.mkdir()
    return init_image_bin(directory, ("sh", "sed", "grep", "tr", "id", "cat", "env", "mount", "umount", "chown",
                                      "mkdir", "rmdir", "sort", "cut", "diff", "mktemp", "rm"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_busybox_install_rerun_rollback_cleanup(ns, backend, busybox_only, tmp_path):
    args = ["--method", "uid", "--drop-invalid", "--inbound-ports", PORTS_20, "--backend", backend]
    ns.add_foreign_rules(backend)
    before = ns.save_all()
    proc = ns.script("redirect.sh", *args, path=busybox_only)
    assert proc.returncode == 0, proc.stderr
    assert_installed_as_dry_run(ns, backend, args, before[backend])
    installed = ns.save_all()
    assert ns.script("redirect.sh", *args, path=busybox_only).returncode == 0
    assert ns.save_all() == installed
    assert_ok(ns.script("redirect.sh", *args, "--check", path=busybox_only))
    tool = "iptables" if backend == "nft" else f"iptables-{backend}"
    ns.run(tool, "-w", "-t", "nat", "-D", "SIDECAR_OUTPUT", "1")
    proc = ns.script("redirect.sh", *args, "--check", path=busybox_only)
    assert proc.returncode == 1 and "\n+-A SIDECAR_OUTPUT -m owner --uid-owner 1337 " in proc.stdout, proc.stdout
    assert ns.script("redirect.sh", *args, "--reconcile", path=busybox_only).returncode == 0
    assert ns.save_all() == installed

    failing = tmp_path / "shim"
    failing.mkdir()
    shim(failing, f"ip6tables-{backend}-restore", 'echo "shim: refuses" >&2\nexit 1\n')
    proc = ns.script("redirect.sh", "--method", "mark", "--backend", backend, path=f"{failing}:{busybox_only}")
    assert_one_line_error(proc, 1, "rolled back")
    assert ns.save_all() == installed

    assert_ok(ns.script("cleanup.sh", path=busybox_only))
    assert ns.save_all() == before


# ------------------------------------------------------------ cgroup method --

def cgroup_mounts() -> list[tuple[str, str, str]]:
    with open("/proc/self/mounts") as f:
        return [(parts[1], parts[2], parts[3]) for parts in (line.split() for line in f)]


def is_net_cls_mount(path: Path) -> bool:
    return any(mnt == str(path) and fstype == "cgroup" and "net_cls" in opts.split(",")
               for mnt, fstype, opts in cgroup_mounts())


@pytest.fixture
def net_cls_dir() -> Iterator[Path]:
    """Where the net_cls cgroup goes: DIR/net_cls/scp-<run> under a fresh
    temporary directory. redirect.sh mounts the hierarchy on DIR/net_cls
    itself; the mount and the cgroup are removed afterwards whatever happens.
    net_cls is one hierarchy per machine, whatever directory it is mounted
    on: the cgroup's name is this run's, and only it is removed (the mount
    shows every other run's cgroups too)."""
    top = Path(tempfile.mkdtemp(prefix="scp-rt-cg-"))
    top.chmod(0o755)  # the proxy's UID must reach the cgroup's files
    root = top / "net_cls"
    ours = root / top.name
    try:
        yield ours
    finally:
        if is_net_cls_mount(root):
            if ours.is_dir():
                for cgroup in sorted((p for p in ours.rglob("*") if p.is_dir()), reverse=True):
                    cgroup.rmdir()
                ours.rmdir()
            run(["umount", str(root)])
        shutil.rmtree(top)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cgroup_classid(ns, backend, net_cls_dir):
    root = net_cls_dir.parent
    args = ["--method", "cgroup", "--cgroup-dir", str(net_cls_dir), "--backend", backend]
    ns.add_foreign_rules(backend)
    before = ns.save_all()

    proc = ns.script("redirect.sh", *args, mounts=True)
    assert proc.returncode == 0, proc.stderr
    assert_installed_as_dry_run(ns, backend, args, before[backend], mounts=True)
    assert is_net_cls_mount(root), "the net_cls hierarchy is mounted on the cgroup's parent"
    assert (net_cls_dir / "net_cls.classid").read_text().strip() == str(0x100001)
    for name in ("tasks", "cgroup.procs"):
        assert (net_cls_dir / name).stat().st_uid == PROXY_UID

    # what the proxy does when it starts: put itself in, unprivileged
    joined = run(["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
                  "sh", "-c", f'echo "$$" > {net_cls_dir}/cgroup.procs && cat /proc/self/cgroup'])
    assert re.search(rf"^\d+:net_cls:/{net_cls_dir.name}$", joined.stdout, re.M), joined.stdout

    state = ns.save_all()
    assert ns.script("redirect.sh", *args, mounts=True).returncode == 0, "a re-run"
    assert ns.save_all() == state

    for _ in range(2):
        assert_ok(ns.script("cleanup.sh", *args, mounts=True))
        assert ns.save_all() == before
        assert not net_cls_dir.exists(), "cleanup removes the cgroup it created"
        assert not is_net_cls_mount(root), "and unmounts the hierarchy redirect.sh mounted"
        assert not root.exists(), "and removes the directory redirect.sh made for it"


def test_cgroup_classid_in_a_mounted_hierarchy_and_busy_cleanup(ns, net_cls_dir):
    root = net_cls_dir.parent
    root.mkdir()
    run(["mount", "-t", "cgroup", "-o", "net_cls", "net_cls", str(root)])
    args = ["--method", "cgroup", "--cgroup-dir", str(net_cls_dir), "--cgroup-classid", "0x10002"]
    assert ns.script("redirect.sh", *args, mounts=True).returncode == 0
    assert (net_cls_dir / "net_cls.classid").read_text().strip() == str(0x10002)

    member = subprocess.Popen(["sh", "-c", f'echo "$$" > {net_cls_dir}/cgroup.procs && exec sleep 60'])
    try:
        for _ in range(100):  # until it is in
            if (net_cls_dir / "cgroup.procs").read_text().strip():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        proc = ns.script("cleanup.sh", *args, mounts=True)
        assert proc.returncode == 0, "a busy cgroup is not an error"
        assert "still in use" in proc.stderr
        assert net_cls_dir.exists()
        assert "SIDECAR" not in str(ns.save_all()), "the rules are gone all the same"
    finally:
        member.send_signal(signal.SIGKILL)
        member.wait()
    assert_ok(ns.script("cleanup.sh", *args, mounts=True))
    assert not net_cls_dir.exists()
    assert is_net_cls_mount(root), "a mount redirect.sh did not make stays"
    # a cgroup with another classid is not ours: it stays
    net_cls_dir.mkdir()
    (net_cls_dir / "net_cls.classid").write_text("42\n")
    proc = ns.script("cleanup.sh", *args, mounts=True)
    assert proc.returncode == 0 and "not ours" in proc.stderr
    assert net_cls_dir.exists()


def test_cgroup_set_up_is_undone_when_the_apply_fails(ns, net_cls_dir, tmp_path):
    shim(tmp_path, "ip6tables-nft-restore", 'echo "shim: refuses" >&2\nexit 1\n')
    # (tables with somebody's rules: an empty nat table that a failed apply
    # created would stay, see README.md "Clean-up")
    ns.add_foreign_rules("nft")
    before = ns.save_all()
    proc = ns.script("redirect.sh", "--method", "cgroup", "--cgroup-dir", str(net_cls_dir), "--backend", "nft",
                     path=f"{tmp_path}:{PATH}", mounts=True)
    assert_one_line_error(proc, 1, "rolled back")
    assert ns.save_all() == before
    assert not is_net_cls_mount(net_cls_dir.parent), "the mount this run made is undone"
    assert not net_cls_dir.parent.exists(), "and so is the directory it made for it"


def test_cgroup_mount_on_an_empty_directory_is_undone_by_cleanup(ns, net_cls_dir):
    """A directory that was there (empty) gets the mount and keeps existing
    after clean-up; only the mount goes."""
    root = net_cls_dir.parent
    root.mkdir()
    args = ["--method", "cgroup", "--cgroup-dir", str(net_cls_dir)]
    assert ns.script("redirect.sh", *args, mounts=True).returncode == 0
    assert is_net_cls_mount(root)
    dry = ns.script("cleanup.sh", *args, "--dry-run", mounts=True)
    assert f"# would unmount the net_cls hierarchy redirect.sh mounted on {root}" in dry.stdout
    assert is_net_cls_mount(root), "a dry run unmounts nothing"
    assert_ok(ns.script("cleanup.sh", *args, mounts=True))
    assert not is_net_cls_mount(root) and root.is_dir()


@pytest.mark.parametrize("where", ["not empty", "a mount point", "inside cgroup2"])
def test_cgroup_method_refuses_to_mount_where_it_would_hide_or_misplace(ns, net_cls_dir, where):
    """Issue 12: the net_cls hierarchy went over whatever directory was the
    parent of --cgroup-dir, hiding its contents. Now: exit 2, one line,
    nothing mounted, nothing created, no rules."""
    root = net_cls_dir.parent
    cgroup2 = None
    if where == "not empty":
        root.mkdir()
        (root / "precious").write_text("still here\n")
    elif where == "a mount point":
        root.mkdir()
        run(["mount", "-t", "tmpfs", "-o", "size=64k", "scp-rt-tmpfs", str(root)])
    else:
        mounts = [mnt for mnt, fstype, _ in cgroup_mounts() if fstype == "cgroup2"]
        assert mounts, "no cgroup2 file system is mounted"
        cgroup2 = Path(mounts[0]) / unique("scp-rt-")
        cgroup2.mkdir()  # a cgroup of ours; --cgroup-dir wants to mount inside it
        net_cls_dir = cgroup2 / "net_cls" / "sidecar-proxy"
    try:
        before = ns.save_all()
        proc = ns.script("redirect.sh", "--method", "cgroup", "--cgroup-dir", str(net_cls_dir), mounts=True)
        fragment = {"not empty": "is not empty", "a mount point": "is a mount point (tmpfs)",
                    "inside cgroup2": "is inside a cgroup2 file system"}[where]
        assert_one_line_error(proc, 2, "--cgroup-dir", fragment)
        assert not is_net_cls_mount(net_cls_dir.parent)
        assert not net_cls_dir.exists()
        assert ns.save_all() == before
        if where == "not empty":
            assert (root / "precious").read_text() == "still here\n"
        if cgroup2 is not None:
            assert not net_cls_dir.parent.exists(), "no cgroup was created in the cgroup2 hierarchy"
    finally:  # also what a script that failed to refuse would have left
        unmount_all(net_cls_dir.parent)
        if cgroup2 is not None:
            for path in (net_cls_dir, net_cls_dir.parent, cgroup2):
                if path.exists():
                    path.rmdir()


def unmount_all(path: Path) -> None:
    """Unmount whatever is mounted on path, stacked mounts too."""
    for _ in range(5):
        if not any(mnt == str(path) for mnt, _, _ in cgroup_mounts()):
            return
        run(["umount", str(path)])
    raise AssertionError(f"{path} is still mounted")


@pytest.fixture
def cgroup2_path() -> Iterator[str]:
    """A fresh cgroup v2 directory; its path as `-m cgroup --path` takes it."""
    mounts = [mnt for mnt, fstype, _ in cgroup_mounts() if fstype == "cgroup2"]
    assert mounts, "no cgroup2 file system is mounted"
    name = unique("scp-rt-")
    directory = Path(mounts[0]) / name
    directory.mkdir()
    try:
        yield f"/{name}"
    finally:
        directory.rmdir()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cgroup_v2_path(ns, backend, cgroup2_path):
    args = ["--method", "cgroup", "--cgroup-path", cgroup2_path, "--backend", backend]
    ns.add_foreign_rules(backend)
    before = ns.save_all()
    assert ns.script("redirect.sh", *args).returncode == 0
    assert_installed_as_dry_run(ns, backend, args, before[backend])
    assert_ok(ns.script("cleanup.sh"))
    assert ns.save_all() == before


def test_cgroup_v2_path_that_does_not_exist_fails_cleanly(ns):
    """A real failure, no shim: the kernel refuses a --path it cannot find
    when the rule goes in."""
    ns.add_foreign_rules("nft")
    before = ns.save_all()
    proc = ns.script("redirect.sh", "--method", "cgroup", "--cgroup-path", f"/{unique('scp-rt-missing-')}")
    assert_one_line_error(proc, 1, "iptables-nft-restore failed", "rolled back")
    assert ns.save_all() == before


# --------------------------------------------------------------- nft-native --
#
# One table, `inet sidecar_proxy`, replaced whole by one `nft -f`. The dry run
# is written the way `nft list table` prints the table, so the installed
# table is compared with it as text; dropped are only the `#` lines (the
# kernel keeps no comments but the rules' own) and the counters' figures.

NATIVE = ["--backend", "nft-native"]


def nft_table_of(text: str) -> str:
    """The table block of a dry run, or of `nft list`, without `#` lines and
    with `counter packets N bytes M` written as `counter`."""
    start = text.index("table inet sidecar_proxy {")
    lines = [re.sub(r"counter packets \d+ bytes \d+", "counter", line)
             for line in text[start:].splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines)


def nft_listing(ns: Netns, mounts: bool = False) -> str:
    return ns.run("nft", "list", "table", "inet", "sidecar_proxy", mounts=mounts).stdout


def add_foreign_nft(ns: Netns) -> None:
    """A table of somebody else's, with base chains on our hooks."""
    script = ("table inet foreign {\n"
              " chain out {\n  type nat hook output priority -100; policy accept;\n"
              "  ip daddr 192.0.2.99 tcp dport 80 counter dnat ip to 192.0.2.98\n }\n"
              " chain pre {\n  type filter hook prerouting priority 0; policy accept;\n  counter\n }\n"
              "}\n")
    run([*ns.enter(mounts=False), "nft", "-f", "-"], input=script)


@pytest.mark.parametrize("case", sorted(CASES))
def test_nft_native_dry_run_is_what_gets_installed(ns, case):
    for backend in BACKENDS:
        ns.add_foreign_rules(backend)
    add_foreign_nft(ns)
    before, foreign = ns.save_all(), ns.run("nft", "list", "table", "inet", "foreign").stdout
    proc = ns.script("redirect.sh", *CASES[case], *NATIVE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("redirect.sh: installed: ") and "backend nft-native" in proc.stdout
    dry = ns.script("redirect.sh", *CASES[case], *NATIVE, "--dry-run")
    assert_ok(dry)
    assert nft_table_of(nft_listing(ns)) == nft_table_of(dry.stdout)
    assert ns.save_all() == before, "iptables rules of both backends stay as they were"
    assert ns.run("nft", "list", "table", "inet", "foreign").stdout == foreign


def test_nft_native_input_is_the_dry_run_text(ns, tmp_path):
    """What nft -f gets is exactly the dry-run text, first install and re-run
    alike (the table is replaced whole each time)."""
    real = shutil.which("nft")
    assert real
    shim(tmp_path, "nft", f'if [ "$1" = -f ]; then tee -a {tmp_path}/nft.input | {real} "$@"; else exec {real} "$@"; fi\n')
    args = ["--method", "mark", "--drop-invalid", *NATIVE]
    dry = ns.script("redirect.sh", *args, "--dry-run").stdout
    for _ in range(2):
        assert ns.script("redirect.sh", *args, path=f"{tmp_path}:{PATH}").returncode == 0
        assert (tmp_path / "nft.input").read_text() == dry
        (tmp_path / "nft.input").unlink()


def test_nft_native_under_busybox(ns, busybox_only):
    """The init image's tools: install, check, drift, reconcile, clean-up."""
    args = ["--method", "explicit", "--services", SERVICES, "--drop-invalid", *NATIVE]
    before = nft_ruleset(ns)
    proc = ns.script("redirect.sh", *args, path=busybox_only)
    assert proc.returncode == 0, proc.stderr
    assert nft_table_of(nft_listing(ns)) == nft_table_of(ns.script("redirect.sh", *args, "--dry-run").stdout)
    assert_ok(ns.script("redirect.sh", *args, "--check", path=busybox_only))
    ns.run("nft", "add", "element", "inet", "sidecar_proxy", "SIDECAR_SERVICES_V4", "{ 192.0.2.77 . 443 }")
    proc = ns.script("redirect.sh", *args, "--check", path=busybox_only)
    assert proc.returncode == 1 and "\n-\telement 192.0.2.77 . 443\n" in proc.stdout, proc.stdout
    assert ns.script("redirect.sh", *args, "--reconcile", path=busybox_only).returncode == 0
    assert_ok(ns.script("redirect.sh", *args, "--check", path=busybox_only))
    assert_ok(ns.script("cleanup.sh", *args, path=busybox_only))
    assert nft_ruleset(ns) == before


def test_nft_native_twice_is_once_and_replaces_what_changed(ns):
    args = ["--method", "uid", "--proxy-gid", "1337", "--drop-invalid", *NATIVE]
    assert ns.script("redirect.sh", *args).returncode == 0
    once = nft_listing(ns)
    assert ns.script("redirect.sh", *args).returncode == 0
    assert nft_listing(ns) == once
    less = ["--inbound-ports", "", "--ipv6", "off", *NATIVE]
    assert ns.script("redirect.sh", *less).returncode == 0
    assert nft_table_of(nft_listing(ns)) == nft_table_of(ns.script("redirect.sh", *less, "--dry-run").stdout)
    assert "ip6 " not in nft_listing(ns) and "SIDECAR_INBOUND" not in nft_listing(ns)


@pytest.mark.parametrize("others", ["fresh namespace", "with other people's rules"])
def test_nft_native_cleanup_gives_back_the_ruleset_byte_for_byte(ns, others):
    if others != "fresh namespace":
        for backend in BACKENDS:
            ns.add_foreign_rules(backend)
        add_foreign_nft(ns)
    before, before_nft = ns.save_all(), nft_ruleset(ns)
    args = ["--method", "mark", "--drop-invalid", *NATIVE]
    assert ns.script("redirect.sh", *args).returncode == 0
    assert nft_ruleset(ns) != before_nft
    dry = ns.script("cleanup.sh", *args, "--dry-run")
    assert_ok(dry)
    assert dry.stdout == "# ==== sidecar-proxy removal, backend nft-native ====\ndelete table inet sidecar_proxy\n"
    for script_args in (args, []):  # the same invocation, then auto: nothing left to do
        assert_ok(ns.script("cleanup.sh", *script_args))
        assert nft_ruleset(ns) == before_nft
        assert ns.save_all() == before


@pytest.mark.parametrize("earlier", ["fresh", "installed before"])
def test_nft_native_failure_half_way_changes_nothing(ns, earlier, tmp_path):
    """A rule that fails half-way through the input: nft applies the
    transaction whole or not at all, so the ruleset is exactly as before
    (nothing, or the earlier table with its counters)."""
    add_foreign_nft(ns)
    if earlier == "installed before":
        assert ns.script("redirect.sh", "--method", "uid", *NATIVE).returncode == 0
    before_nft = nft_ruleset(ns)
    real = shutil.which("nft")
    # after the first half of the lines, a rule that jumps to a chain nobody has
    shim(tmp_path, "nft", f"""if [ "$1" != -f ]; then exec {real} "$@"; fi
input=$(cat)
half=$(( $(printf '%s\\n' "$input" | grep -c '') / 2 ))
printf '%s\\n' "$input" | sed "${{half}}a\\\\
add rule inet sidecar_proxy SIDECAR_OUTPUT counter jump SIDECAR_NOWHERE" | {real} "$@"
""")
    proc = ns.script("redirect.sh", "--method", "mark", "--drop-invalid", *NATIVE, path=f"{tmp_path}:{PATH}")
    assert_one_line_error(proc, 1, "nft -f failed", "rolled back")
    assert nft_ruleset(ns) == before_nft


def cgroup_layout(layout: str) -> tuple[str, ...]:
    """An argv prefix: a private mount namespace whose /sys/fs/cgroup is the
    cgroup2 file system ("v2", as on current hosts) or a tmpfs ("hybrid",
    cgroup v1 controllers with cgroup2 elsewhere, as on this project's test
    machines). nft looks --cgroup-path up below /sys/fs/cgroup."""
    if layout == "v2":
        roots = [mnt for mnt, fstype, _ in cgroup_mounts() if fstype == "cgroup2"]
        assert roots, "no cgroup2 file system is mounted"
        setup = f"mount --bind {roots[0]} /sys/fs/cgroup"
    else:
        setup = "mount -t tmpfs -o size=64k scp-rt-tmpfs /sys/fs/cgroup"
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", f'{setup} && exec "$@"', "sh")


def test_nft_native_cgroup_v2_path(ns, cgroup2_path):
    """Installed as the dry run says, on a host whose /sys/fs/cgroup is
    cgroup2; a path that does not exist is a real failure (nft's, no shim)
    that changes nothing; on the hybrid layout, a one-line refusal."""
    v2 = cgroup_layout("v2")
    args = ["--method", "cgroup", "--cgroup-path", cgroup2_path, *NATIVE]
    assert ns.script("redirect.sh", *args, mounts=True, prefix=v2).returncode == 0
    listing = ns.run("nft", "list", "table", "inet", "sidecar_proxy", mounts=True, prefix=v2).stdout
    assert nft_table_of(listing) == nft_table_of(ns.script("redirect.sh", *args, "--dry-run").stdout)
    assert f'socket cgroupv2 level 1 "{cgroup2_path[1:]}"' in listing
    before = nft_ruleset(ns)
    proc = ns.script("redirect.sh", "--method", "cgroup", "--cgroup-path", f"/{unique('scp-rt-missing-')}",
                     *NATIVE, mounts=True, prefix=v2)
    assert_one_line_error(proc, 1, "nft -f failed", "cgroupv2 path fails", "rolled back")
    assert nft_ruleset(ns) == before
    proc = ns.script("redirect.sh", *args, mounts=True, prefix=cgroup_layout("hybrid"))
    assert_one_line_error(proc, 2, "--cgroup-path: nft looks the path up below /sys/fs/cgroup",
                          "not the cgroup2 file system here (tmpfs")
    assert nft_ruleset(ns) == before


def test_auto_backend_follows_our_nft_table_and_takes_nft_when_there_is_no_iptables(ns, tmp_path):
    assert "backend nft-native" in ns.script("redirect.sh", *NATIVE).stdout
    assert "backend nft-native" in ns.script("redirect.sh").stdout, "a re-run stays where our rules are"
    assert "SIDECAR" not in str(ns.save_all())
    assert_ok(ns.script("cleanup.sh"))
    assert nft_ruleset(ns) == ""
    # a host without iptables, only nft (RHEL 10, EKS on 1.33 have no legacy iptables)
    nft_only = tmp_path / "bin"
    nft_only.mkdir()
    (nft_only / "nft").symlink_to(shutil.which("nft") or "/usr/sbin/nft")
    proc = ns.script("redirect.sh", path=f"{nft_only}:/usr/bin:/bin")
    assert proc.returncode == 0, proc.stderr
    assert "backend nft-native" in proc.stdout
    assert_ok(ns.script("cleanup.sh", path=f"{nft_only}:/usr/bin:/bin"))
    assert nft_ruleset(ns) == ""
