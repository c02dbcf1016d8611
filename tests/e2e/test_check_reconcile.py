"""redirect.sh --check and --reconcile, on all three backends.

Each test builds a pod and a remote namespace (proxy.demo.netns.PodWorld),
installs the rules with redirect.sh, changes them by hand as drift would
(a rule of ours deleted, a rule added in our chain), and asks the script:
--check exits 1 with a unified diff (installed -> desired) and touches
nothing; --reconcile puts the desired rules back, atomically, and does
nothing at all when nothing drifted. The swap is watched by traffic: an app
opening connections in a loop while the rules are replaced again and again
must see every one of them captured.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.demo.netns import PodWorld, run

pytestmark = pytest.mark.netns

IPTABLES = Path(__file__).resolve().parents[2] / "iptables"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
BACKENDS = ["nft", "legacy", "nft-native"]
ARGS = ["--method", "uid", "--drop-invalid", "--exclude-outbound-ports", "25"]
FROM_LOOPBACK = "sidecar-proxy: from loopback"


@dataclass
class Pod:
    world: PodWorld
    backend: str

    def script(self, *args: str, path: str = PATH) -> tuple[int, str, str]:
        """redirect.sh in the pod with the test's arguments: (status, stdout, stderr)."""
        proc = run(self.world.pod.argv("env", "-i", f"PATH={path}", "sh", str(IPTABLES / "redirect.sh"), *ARGS,
                                       "--backend", self.backend, *args), check=False)
        return proc.returncode, proc.stdout, proc.stderr

    def rules(self) -> str:
        """Everything installed, counters left out."""
        if self.backend == "nft-native":
            text = self.world.pod.exec("nft", "list", "ruleset").stdout
            return re.sub(r"counter packets \d+ bytes \d+", "counter", text)
        return "".join(_without_stamps(self.world.pod.exec(f"{tool}-{self.backend}-save").stdout)
                       for tool in ("iptables", "ip6tables"))

    def delete_from_loopback_v4(self) -> None:
        """Drift: our IPv4 "from loopback" rule deleted by hand."""
        if self.backend == "nft-native":
            listing = self.world.pod.exec("nft", "-a", "list", "chain", "inet", "sidecar_proxy",
                                          "SIDECAR_OUTPUT").stdout
            handle = re.search(rf'ip saddr 127\.0\.0\.1 .*"{FROM_LOOPBACK}" # handle (\d+)', listing)
            assert handle, listing
            self.world.pod.exec("nft", "delete", "rule", "inet", "sidecar_proxy", "SIDECAR_OUTPUT", "handle",
                                handle.group(1))
        else:
            self.world.pod.exec(f"iptables-{self.backend}", "-w", "-t", "nat", "-D", "SIDECAR_OUTPUT",
                                "-s", "127.0.0.1/32", "-m", "comment", "--comment", FROM_LOOPBACK, "-j", "RETURN")

    def add_stray_v6(self) -> None:
        """Drift: a rule added by hand in our IPv6 outbound chain (to an
        address the connection loop below never dials: the drift itself lets
        nothing of the loop's escape)."""
        if self.backend == "nft-native":
            self.world.pod.exec("nft", "add", "rule", "inet", "sidecar_proxy", "SIDECAR_OUTPUT",
                                "ip6", "daddr", "2001:db8:2::99", "tcp", "dport", "80", "return")
        else:
            self.world.pod.exec(f"ip6tables-{self.backend}", "-w", "-t", "nat", "-I", "SIDECAR_OUTPUT", "1",
                                "-d", "2001:db8:2::99/128", "-p", "tcp", "--dport", "80", "-j", "RETURN")


def _without_stamps(save: str) -> str:
    """iptables-save output without its timestamp comments and packet counters."""
    return "\n".join(re.sub(r"\[\d+:\d+\]$", "[0:0]", line) for line in save.splitlines()
                     if not line.startswith("#")) + "\n"


@pytest.fixture(params=BACKENDS)
def pod(request, netns_prerequisites) -> Iterator[Pod]:
    world = PodWorld()
    try:
        yield Pod(world, request.param)
    finally:
        world.close()


def test_check_passes_right_after_install_and_touches_nothing(pod):
    status, _, err = pod.script("--check")
    assert status == 1 and err.endswith("--reconcile replaces them)\n"), "nothing installed yet: drifted"
    assert pod.script()[0] == 0
    status, out, err = pod.script("--check")
    assert (status, err) == (0, ""), err
    assert out == (f"redirect.sh: in place: the installed rules are the desired ones (method uid, IPv4 and IPv6, "
                   f"backend {pod.backend})\n")


def test_a_rule_deleted_by_hand_is_found_and_put_back(pod):
    assert pod.script()[0] == 0
    installed = pod.rules()
    pod.delete_from_loopback_v4()
    drifted = pod.rules()
    status, out, err = pod.script("--check")
    assert status == 1
    assert err.count("\n") == 1 and "drifted" in err
    added = [line for line in out.splitlines() if line.startswith("+") and not line.startswith("+++")]
    removed = [line for line in out.splitlines() if line.startswith("-") and not line.startswith("---")]
    assert len(added) == 1 and FROM_LOOPBACK in added[0] and "127.0.0.1" in added[0], out
    assert removed == [], out
    assert out.startswith("--- installed (") and "+++ desired (" in out
    assert pod.rules() == drifted, "--check changes nothing"
    status, out, _ = pod.script("--reconcile")
    assert status == 0 and "reconciled" in out and FROM_LOOPBACK in out
    assert pod.rules() == installed
    assert pod.script("--check")[0] == 0


def test_a_rule_added_by_hand_in_our_chain_is_found_and_removed(pod):
    assert pod.script()[0] == 0
    installed = pod.rules()
    pod.add_stray_v6()
    status, out, _ = pod.script("--check")
    assert status == 1
    removed = [line for line in out.splitlines() if line.startswith("-") and not line.startswith("---")]
    assert len(removed) == 1 and "2001:db8:2::99" in removed[0] and "80" in removed[0], out
    assert pod.script("--reconcile")[0] == 0
    assert pod.rules() == installed


def test_reconcile_does_nothing_when_nothing_drifted(pod, tmp_path):
    """Not even a restore: a shim in front of the programs that write rules
    records every call, and the counters keep counting."""
    assert pod.script()[0] == 0
    for tool in ("nft", f"iptables-{pod.backend}-restore", f"ip6tables-{pod.backend}-restore"):
        real = shutil.which(tool)
        if real is None or (pod.backend == "nft-native") != (tool == "nft"):
            continue
        shim = tmp_path / tool
        shim.write_text(f'#!/bin/sh\ncase "$*" in *-f*|*noflush*) echo "$0" >> {tmp_path}/calls ;; esac\n'
                        f'exec {real} "$@"\n')
        shim.chmod(0o755)
    status, out, err = pod.script("--reconcile", path=f"{tmp_path}:{PATH}")
    assert (status, err) == (0, "")
    assert out.startswith("redirect.sh: in place: nothing to do")
    assert not (tmp_path / "calls").exists(), (tmp_path / "calls").read_text()
    pod.delete_from_loopback_v4()
    assert pod.script("--reconcile", path=f"{tmp_path}:{PATH}")[0] == 0
    assert (tmp_path / "calls").exists(), "the shim does see a real reconcile"


def test_check_and_reconcile_refuse_bad_input_and_each_other(pod):
    for args, culprit in ((["--check", "--dry-run"], "one at a time"),
                          (["--check", "--reconcile"], "one at a time"),
                          (["--check=yes"], "--check: takes no value"),
                          (["--reconcile", "--proxy-port", "0"], "--proxy-port: 0")):
        status, out, err = pod.script(*args)
        assert status == 2 and out == "" and err.count("\n") == 1 and culprit in err, (args, err)


# ------------------------------------------------------- traffic during a swap --

SINK_PORT = 5001  # where every captured connection arrives: a listener stands in for the proxy
LOOP_SECONDS = 20.0  # the loop's upper bound, whatever happens
RECONCILES = 8


class ConnectionLoop:
    """The app: connects to the remote's web address again and again, both
    families in turn, until stopped, and counts where each connection
    arrived: at the stand-in proxy in the pod, or at the remote directly."""

    def __init__(self, world: PodWorld) -> None:
        self.world = world
        self.sinks = [world.pod.listen(("0.0.0.0", SINK_PORT)), world.pod.listen(("::", SINK_PORT))]
        self.remote = [world.remote.listen(("198.51.100.10", 80)), world.remote.listen(("2001:db8:2::10", 80))]
        for sock in self.sinks + self.remote:
            sock.setblocking(False)
        self.made = self.captured = self.escaped = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ConnectionLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=LOOP_SECONDS + 5)
        for sock in self.sinks + self.remote:
            sock.close()

    def _run(self) -> None:
        deadline = time.monotonic() + LOOP_SECONDS
        targets = [("198.51.100.10", 80), ("2001:db8:2::10", 80)]
        while not self._stop.is_set() and time.monotonic() < deadline:
            target = targets[self.made % 2]
            try:
                self.world.pod.connect(target, timeout=2).close()
            except OSError as exc:
                self.failed.append(f"{target}: {exc}")
            self.made += 1
            self._drain()
        time.sleep(0.1)  # the last handshakes
        self._drain()

    def _drain(self) -> None:
        self.captured += _accept_all(self.sinks)
        self.escaped += _accept_all(self.remote)


def _accept_all(socks) -> int:
    n = 0
    for sock in socks:
        while True:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                break
            conn.close()
            n += 1
    return n


def test_every_connection_is_captured_while_reconcile_swaps_the_rules(pod):
    """Drift, reconcile, drift, reconcile... while the app connects in a
    loop: the replaced chains are swapped in one commit per table
    (iptables-restore) or one transaction (nft), so no connection slips
    out uncaptured in between: each one reaches the stand-in proxy, none the
    remote directly."""
    assert pod.script()[0] == 0
    with ConnectionLoop(pod.world) as loop:
        time.sleep(0.2)
        for i in range(RECONCILES):
            (pod.add_stray_v6 if i % 2 else pod.delete_from_loopback_v4)()
            status, out, err = pod.script("--reconcile")
            assert status == 0 and "reconciled" in out, err
        time.sleep(0.2)
    assert loop.failed == []
    assert loop.made >= 50, f"the loop made only {loop.made} connections"
    assert (loop.captured, loop.escaped) == (loop.made, 0)
    print(f"{pod.backend}: {loop.made} connections during {RECONCILES} reconciles, all captured")
