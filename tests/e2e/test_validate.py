"""iptables/validate.sh and `sidecar-proxy validate`, against real rules.

Each test builds a pod and a remote namespace, installs the rules with
redirect.sh (or does not, or breaks them as a failure would), and runs both
validators in the pod: the shell one under BusyBox alone (what the init image
has, with iptables and nft), the Python one from the installed package.
They pass on correct rules, for every method and both kinds of backend, and
fail with exit 126 and one line naming the cause on each of: no rules, the
bypass rule missing (the proxy would loop), the IPv6 rules missing, and the
owner match unavailable (xt_owner; a PATH shim in front of the iptables
programs answers as iptables does on a kernel without it).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import PYTHON, init_image_bin
from test_methods import Method, method, native

from proxy.demo.netns import PodWorld, run

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
IPTABLES = REPO / "iptables"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
APPLETS = ("sh", "sed", "grep", "tr", "id", "cat", "env", "mount", "umount", "chown", "chmod", "mkdir", "rmdir",
           "sort", "cut", "diff", "mktemp", "rm", "nc", "nsenter", "timeout", "sleep", "ip", "head")


@pytest.fixture(scope="module")
def busybox() -> Iterator[str]:
    """A PATH of BusyBox applets, the iptables programs and nft: the init
    image. The proxy's UID runs nc from it, so it is not under pytest's
    private temporary directory."""
    directory = Path(tempfile.mkdtemp(prefix="scp-val-bin-"))
    try:
        directory.chmod(0o755)
        yield init_image_bin(directory, APPLETS)
    finally:
        shutil.rmtree(directory)


@pytest.fixture
def world(netns_prerequisites) -> Iterator[PodWorld]:
    w = PodWorld()
    try:
        yield w
    finally:
        w.close()


def redirect(world: PodWorld, m: Method, *args: str, path: str = PATH) -> subprocess.CompletedProcess[str]:
    cmd = ["env", "-i", f"PATH={path}", "sh", str(IPTABLES / "redirect.sh"), *m.args, *args]
    return run([*m.script_prefix, *world.pod.nsenter_argv(*cmd)], check=False)


def validate(world: PodWorld, impl: str, m: Method, *args: str, path: str) -> subprocess.CompletedProcess[str]:
    """One validator in the pod, with the method's (and so redirect.sh's) options."""
    if impl == "sh":
        cmd = ["env", "-i", f"PATH={path}", "sh", str(IPTABLES / "validate.sh"), *m.args, *args]
    else:  # the installed package, as the init container would run it (cwd=/: not this checkout)
        cmd = ["env", "-i", f"PATH={path}", PYTHON, "-m", "proxy", "validate", *m.args, *args]
    return subprocess.run([*m.script_prefix, *world.pod.nsenter_argv(*cmd)], capture_output=True, text=True,
                          timeout=180, cwd="/")


def assert_passed(proc: subprocess.CompletedProcess[str], impl: str, families: int = 2) -> list[str]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    prog = "validate.sh" if impl == "sh" else "sidecar-proxy validate"
    lines = proc.stdout.splitlines()
    assert all(line.startswith((f"{prog}: ok: ", f"{prog}: skip: ")) for line in lines[:-1]), lines
    assert lines[-1].startswith(f"{prog}: passed: the redirect works")
    return lines


def assert_invalid(proc: subprocess.CompletedProcess[str], impl: str, *fragments: str) -> str:
    """Exit 126, and the first failure as one line on stderr with every fragment."""
    assert proc.returncode == 126, proc.stdout + proc.stderr
    prog = "validate.sh" if impl == "sh" else "sidecar-proxy validate"
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"{prog}: FAIL: "), repr(proc.stderr)
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)
    return proc.stderr


IMPLS = ["sh", "python"]
# every method on iptables-nft (auto) and nft-native; uid on legacy too
PASSING = [("uid", ""), ("uid", "legacy"), ("uid", "nft-native"), ("mark", ""), ("mark", "nft-native"),
           ("cgroup-net_cls", ""), ("cgroup-net_cls", "nft-native"), ("cgroup-v2", ""), ("cgroup-v2", "nft-native"),
           ("explicit", ""), ("explicit", "nft-native")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("method_name", "backend"), PASSING, ids=[f"{m}-{b or 'auto'}" for m, b in PASSING])
def test_validate_passes_on_correct_rules(world, busybox, tmp_path, impl, method_name, backend):
    with method(method_name, tmp_path) as m:
        if backend == "nft-native":
            m = native(m)
        elif backend:
            m = Method(m.name, [*m.args, "--backend", backend], m.proxy, m.nsenter)
        proc = redirect(world, m)
        assert proc.returncode == 0, proc.stderr
        lines = assert_passed(validate(world, impl, m, path=busybox if impl == "sh" else PATH), impl)
        text = "\n".join(lines)
        if m.captures_all:
            assert "ok: IPv4 outbound: 203.0.113.250:15002 from UID 0 reached the proxy port 5001" in text
            assert "ok: IPv6 inbound: the pod's own [2001:db8:1::1]:15002 from UID 0 reached" in text
            assert "ok: IPv6 bypass: [2001:db8:ffff::250]:15002 as the proxy (" in text
            assert text.count("went out directly") == 2
        else:  # explicit: the first listed service of each family
            assert "ok: IPv4 outbound: 198.51.100.100:80 from UID 0 reached the proxy port 5001" in text
            assert "skip: IPv4 bypass: --method explicit has none" in text
        if impl == "python":
            assert "original destination 203.0.113.250:15002" in text or \
                "original destination 198.51.100.100:80" in text
        assert redirect_cleanup(world, m) == 0


def redirect_cleanup(world: PodWorld, m: Method) -> int:
    cmd = ["sh", str(IPTABLES / "cleanup.sh"), *m.args]
    return run([*m.script_prefix, *world.pod.nsenter_argv(*cmd)], check=False).returncode


UID = Method("uid", ["--method", "uid"])


@pytest.mark.parametrize("impl", IMPLS)
def test_no_rules(world, busybox, impl):
    path = busybox if impl == "sh" else PATH
    assert_invalid(validate(world, impl, UID, path=path), impl,
                   "IPv4 outbound: 203.0.113.250:15002 from UID 0 did not reach the proxy port 5001",
                   "no rules: nothing of sidecar-proxy is installed (backend nft, IPv4)")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backend", ["nft", "nft-native"])
def test_the_bypass_rule_missing(world, busybox, impl, backend):
    m = Method("uid", ["--method", "uid", "--backend", backend])
    assert redirect(world, m).returncode == 0
    if backend == "nft-native":
        listing = world.pod.exec("nft", "-a", "list", "chain", "inet", "sidecar_proxy", "SIDECAR_OUTPUT").stdout
        handle = next(line.rsplit(" ", 1)[1] for line in listing.splitlines() if "meta skuid 1337" in line)
        world.pod.exec("nft", "delete", "rule", "inet", "sidecar_proxy", "SIDECAR_OUTPUT", "handle", handle)
        missing = 'meta skuid 1337 counter return comment "sidecar-proxy: proxy own traffic, uid 1337"'
    else:
        world.pod.exec("iptables", "-t", "nat", "-D", "SIDECAR_OUTPUT", "1")
        missing = '-A SIDECAR_OUTPUT -m owner --uid-owner 1337 -m comment --comment "sidecar-proxy: proxy own'
    proc = validate(world, impl, m, path=busybox if impl == "sh" else PATH)
    assert_invalid(proc, impl, "IPv4 bypass: 203.0.113.250:15002 as the proxy (UID 1337) came back to the proxy port",
                   "the proxy would loop", f"a rule is missing (backend {backend}, IPv4): {missing}")
    assert "ok: IPv4 outbound" in proc.stdout, "capture itself works: the checks before passed"


@pytest.mark.parametrize("impl", IMPLS)
def test_the_ipv6_rules_missing(world, busybox, impl):
    assert redirect(world, UID, "--ipv6", "off").returncode == 0
    proc = validate(world, impl, UID, path=busybox if impl == "sh" else PATH)
    assert_invalid(proc, impl, "IPv6 outbound: [2001:db8:ffff::250]:15002 from UID 0 did not reach the proxy port",
                   "no rules: nothing of sidecar-proxy is installed (backend nft, IPv6)")
    assert proc.stdout.count("ok: IPv4 ") == 3, "IPv4 passed"


OWNER_REFUSED = r"""#!/bin/sh
# iptables as it answers on a kernel without xt_owner
real={real}
for arg in "$@"; do
    if [ "$arg" = owner ]; then
        echo "iptables v1.8.9 (legacy): Couldn't load match \`owner':No such file or directory" >&2
        exit 2
    fi
done
case "$0" in
*restore)
    input=$(cat)
    if printf '%s\n' "$input" | grep -q -- '-m owner'; then
        echo "iptables-restore v1.8.9 (legacy): Couldn't load match \`owner':No such file or directory" >&2
        exit 2
    fi
    printf '%s\n' "$input" | exec "$real" "$@" ;;
esac
exec "$real" "$@"
"""


@pytest.mark.parametrize("impl", IMPLS)
def test_the_owner_module_blocked(world, busybox, impl, tmp_path):
    """The legacy backend on a kernel whose owner match cannot be loaded:
    redirect.sh cannot install (and rolls back), and the validator names the
    module, for the backend and the family."""
    for tool in ("iptables-legacy", "ip6tables-legacy", "iptables-legacy-restore", "ip6tables-legacy-restore"):
        real = shutil.which(tool)
        assert real
        shim = tmp_path / tool
        shim.write_text(OWNER_REFUSED.replace("{real}", real))
        shim.chmod(0o755)
    m = Method("uid", ["--method", "uid", "--backend", "legacy"])
    proc = redirect(world, m, path=f"{tmp_path}:{PATH}")
    assert proc.returncode == 1 and "Couldn't load match `owner'" in proc.stderr, proc.stderr
    path = f"{tmp_path}:{busybox}" if impl == "sh" else f"{tmp_path}:{PATH}"
    assert_invalid(validate(world, impl, m, path=path), impl,
                   "IPv4 outbound: 203.0.113.250:15002 from UID 0 did not reach the proxy port 5001",
                   "xt_owner", "Couldn't load match `owner'", "is absent (backend legacy, IPv4)")


@pytest.mark.parametrize("impl", IMPLS)
def test_timeout_and_probes_are_options_and_bad_ones_are_refused(world, busybox, impl, tmp_path):
    path = busybox if impl == "sh" else PATH
    assert redirect(world, UID).returncode == 0
    proc = validate(world, impl, UID, "--timeout", "1", "--probe-v4", "198.51.100.77", "--probe-port", "8443",
                    path=path)
    assert "ok: IPv4 outbound: 198.51.100.77:8443 from UID 0 reached the proxy port 5001" in proc.stdout
    assert_passed(proc, impl)
    plan = run(world.pod.argv("env", "-i", f"PATH={PATH}", "SIDECAR_VALIDATE_TIMEOUT=3", "sh",
                              str(IPTABLES / "validate.sh"), "--plan"))
    assert "timeout\t3\n" in plan.stdout, "the environment sets the timeout"
    prog = "validate.sh" if impl == "sh" else "sidecar-proxy validate"
    for args, culprit in ((["--timeout", "0"], "--timeout: 0"), (["--timeout", "soon"], "--timeout: soon"),
                          (["--probe-v4", "2001:db8::1"], "--probe-v4: 2001:db8::1 is not an IPv4 address"),
                          (["--probe-v6", "2001:db8::/64"], "--probe-v6: 2001:db8::/64 is a network"),
                          (["--method", "bogus"], "--method: bogus")):
        proc = validate(world, impl, UID, *args, path=path)
        assert proc.returncode == 2 and proc.stdout == "", (args, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"{prog}: ") and culprit in proc.stderr, \
            (args, proc.stderr)


def test_validate_sh_with_debians_busybox_package(world):
    """An init image on a Debian base: busybox is a program, its applets
    are not on PATH (and ip may be missing); validate.sh calls busybox nc and
    busybox ip."""
    directory = Path(tempfile.mkdtemp(prefix="scp-val-deb-"))
    try:
        directory.chmod(0o755)
        (directory / "busybox").symlink_to(shutil.which("busybox") or "/bin/busybox")
        assert redirect(world, UID).returncode == 0
        assert_passed(validate(world, "sh", UID, path=f"{directory}:{PATH}"), "sh")
    finally:
        shutil.rmtree(directory)



@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backend", ["nft", "nft-native"])
@pytest.mark.parametrize("rule_gone", [False, True], ids=["in-place", "ip-rule-gone"])
def test_tproxy_needs_its_policy_routing(world, busybox, impl, backend, rule_gone):
    """--inbound-mode tproxy: the checks pass with the rules in place, and fail naming the
    ip rule when it is gone (no probe from inside the pod can reach TPROXY)."""
    m = Method("uid", ["--method", "uid", "--inbound-mode", "tproxy", "--backend", backend])
    assert redirect(world, m).returncode == 0
    path = busybox if impl == "sh" else PATH
    if rule_gone:
        world.pod.ip("-6", "rule", "del", "fwmark", "0x539", "lookup", "133")
        assert_invalid(validate(world, impl, m, path=path), impl, "IPv6 tproxy: ",
                       "ip -6 rule fwmark 0x539 lookup 133 is missing")
    else:
        text = "\n".join(assert_passed(validate(world, impl, m, path=path), impl))
        assert "ok: IPv6 tproxy: ip rule fwmark 0x539 lookup 133, local default dev lo in table 133: present" in text
    assert redirect_cleanup(world, m) == 0
