"""Fixtures shared by the unit and end-to-end tests.

End-to-end tests (marked `netns`) need root, iproute2, iptables and setpriv.
They run everywhere this project is tested (CI is root too), so a missing
prerequisite fails the run instead of skipping it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import pytest
from support import PYTHON, setpriv_argv

from proxy.demo.netns import PodWorld

REQUIRED_TOOLS = ("ip", "iptables", "ip6tables", "iptables-save", "setpriv", "nsenter", "prlimit")


@pytest.fixture(scope="session")
def netns_prerequisites() -> None:
    """Fail (never skip) when the machine cannot run the end-to-end tests."""
    if os.geteuid() != 0:
        pytest.fail("the end-to-end tests need root (network namespaces, iptables)")
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools for the end-to-end tests: {', '.join(missing)} (see .ci/run)")
    probe = subprocess.run([*setpriv_argv(), PYTHON, "-c", "import proxy, uvloop"],
                           capture_output=True, text=True, cwd="/")
    if probe.returncode != 0:
        pytest.fail(f"UID 1337 cannot run {PYTHON} with the proxy installed "
                    f"({probe.stderr.strip().splitlines()[-1:]}); use the README's test command")


@pytest.fixture
def world(netns_prerequisites):
    """A fresh pod namespace and remote namespace, removed afterwards."""
    w = PodWorld()
    try:
        yield w
    finally:
        w.close()


def install_uid_redirect(world: PodWorld, port: int = 5001, uid: int = 1337) -> None:
    """The design note's UID-owner rules (outbound) and inbound redirect, both families."""
    for tool, lo in (("iptables", "127.0.0.1/32"), ("ip6tables", "::1/128")):
        world.pod.exec(tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "!", "-d", lo,
                       "-m", "owner", "!", "--uid-owner", str(uid), "-j", "REDIRECT", "--to-ports", str(port))
        world.pod.exec(tool, "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(port))


@pytest.fixture
def uid_world(world):
    install_uid_redirect(world)
    return world


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_name(request) -> str:
    return request.param


@pytest.fixture
def run(loop_name):
    """Run a coroutine on each event loop (in this process: the unit tests of the data path)."""
    def runner(coro):
        if loop_name == "uvloop":
            import uvloop
            factory = uvloop.new_event_loop
        else:
            factory = asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(asyncio.wait_for(coro, 60))
    return runner
