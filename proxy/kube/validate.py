"""`sidecar-proxy validate`: does the redirect really work?

The Python twin of iptables/validate.sh, in the spirit of Istio's
istio-validation init container. Run as root in the pod's network namespace
after the init step, with the init step's options (redirect.sh's, and
validate.sh's --timeout and --probe-*). It sends real connections through
the rules and looks where they arrive:

- a listener on the proxy port, as the proxy's UID (a child process);
- per family, an app's connection (UID 0) to a documentation address (or a
  listed service, or the pod's own address for inbound) must arrive there,
  and the accepted socket's SO_ORIGINAL_DST must be the address dialled;
- the same connection made as the proxy (a child process with its UID, in
  its cgroup as well for that method, or a socket with its SO_MARK) must
  not arrive: it would loop.

What to dial is decided once, by the script: `validate.sh --plan` prints the
checks for the options given (the same option semantics as redirect.sh's),
and `validate.sh --explain CHECK:FAMILY` names the reason of a failure (the
module that is absent or the rule that is missing, for which backend and
family). This module does the traffic, which sh cannot do completely (no
getsockopt, no SO_MARK).

One line per check; exit 0, or 126 with the first failure and its reason
(2: bad options, one line).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..config import hostport
from ..datapath.sockopts import original_dst, set_mark, unmapped
from ..exitcodes import EXIT_OK, EXIT_USAGE
from .scripts import ScriptsMissing, scripts_dir

EXIT_INVALID = 126  # as Istio's validation: the pod's repair controller acts on it
PROG = "sidecar-proxy validate"


class Invalid(Exception):
    """A check failed: the redirect does not work."""


@dataclass(frozen=True)
class Check:
    kind: str  # outbound, inbound, bypass, tproxy (the policy routing is there), skip
    family: int
    host: str
    port: int
    what: str


@dataclass(frozen=True)
class Plan:
    proxy_port: int
    proxy_uid: int
    timeout: float
    bypass_wait: float
    proxy: tuple[str, str]  # (uid, UID), (mark, MARK), (cgroup or cgroup2, its cgroup.procs), (none, "")
    checks: tuple[Check, ...]


def parse_plan(text: str) -> Plan:
    """The output of `validate.sh --plan`: settings, then checks, tab-separated."""
    settings: dict[str, list[str]] = {}
    checks = []
    for line in text.splitlines():
        key, *fields = line.split("\t")
        if key == "check":
            kind, family, host, port, what = fields
            checks.append(Check(kind, int(family), host, 0 if port == "-" else int(port), what))
        else:
            settings[key] = fields
    return Plan(proxy_port=int(settings["proxy_port"][0]), proxy_uid=int(settings["proxy_uid"][0]),
                timeout=float(settings["timeout"][0]), bypass_wait=float(settings["bypass_wait"][0]),
                proxy=(settings["proxy"][0], settings["proxy"][1]), checks=tuple(checks))


# --- the listener: the proxy's port, as the proxy's UID -----------------------------------

class Listener:
    """A child process, as the proxy's UID, listening on the proxy port (both
    families). For every connection it writes "TOKEN HOST:PORT" to a pipe: the
    first line the connection sent, and its SO_ORIGINAL_DST."""

    def __init__(self, port: int, uid: int, timeout: float) -> None:
        self.port, self.uid = port, uid
        self.read_fd, write_fd = os.pipe()
        self.buffer = b""
        self.arrived: dict[str, str] = {}  # token -> its original destination
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            os.close(self.read_fd)
            _listen(port, uid, write_fd)
        os.close(write_fd)
        first = self._line(time.monotonic() + timeout)
        if first != "ready":
            self.close()
            raise Invalid(f"cannot listen on port {port} as UID {uid}: {first or 'no answer'}")

    def _line(self, deadline: float) -> str | None:
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                return None
            chunk = os.read(self.read_fd, 4096)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode(errors="replace")

    def wait_for(self, token: str, seconds: float) -> str | None:
        """The original destination ("HOST:PORT", or "none") of the
        connection that brought `token`, or None if none did within `seconds`."""
        deadline = time.monotonic() + seconds
        while token not in self.arrived:
            line = self._line(deadline)
            if line is None:
                return None
            got, _, where = line.partition(" ")
            self.arrived[got] = where
        return self.arrived[token]

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, 9)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        os.close(self.read_fd)


def _listen(port: int, uid: int, out: int) -> None:
    """The listener child: drop to the proxy's UID, listen, report, forever."""
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.bind(("::", port))
        server.listen(64)
        os.write(out, b"ready\n")
        while True:
            conn, peer = server.accept()
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    token = conn.recv(200).split(b"\n")[0].decode(errors="replace")
                    ipv4 = "." in unmapped(peer[0])
                    orig = original_dst(conn, ipv4=ipv4)
                    where = hostport(unmapped(orig[0]), orig[1]) if orig else "none"
                    os.write(out, f"{token} {where}\n".encode())
    except BaseException as exc:  # whatever it is, the parent gets one line
        with contextlib.suppress(OSError):
            os.write(out, f"{exc}\n".encode())
    finally:
        os._exit(0)


# --- the dials ----------------------------------------------------------------------

def dial(host: str, port: int, token: str, timeout: float) -> None:
    """Connect, send the token; any failure is for the listener to judge."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(f"{token}\n".encode())


def dial_as_proxy(plan: Plan, host: str, port: int, token: str) -> None:
    """The same dial as the proxy makes it: its UID, its cgroup, or its mark,
    from a child process (a UID or a cgroup belongs to a process)."""
    kind, value = plan.proxy
    pid = os.fork()
    if pid == 0:
        try:
            # sockets are classified by their creator's cgroup: join it first
            if kind == "cgroup2":  # where the runtime puts the proxy: joined as root
                _join(value)
            if kind in ("uid", "cgroup"):
                os.setgroups([])
                os.setgid(plan.proxy_uid)
                os.setuid(plan.proxy_uid)
            if kind == "cgroup":  # net_cls: joined as the proxy joins it, as its UID (which owns cgroup.procs)
                _join(value)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as sock:
                if kind == "mark":
                    set_mark(sock, int(value))
                sock.settimeout(plan.bypass_wait)
                sock.connect((host, port))
                sock.sendall(f"{token}\n".encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _join(procs: str) -> None:
    with open(procs, "w") as f:
        f.write(f"{os.getpid()}\n")


def proxy_is(plan: Plan) -> str:
    """How the proxy's own connections are told apart, for the last line."""
    kind, value = plan.proxy
    if kind == "uid":
        return f"UID {value}"
    if kind == "mark":
        return f"mark {int(value):#x}"
    if kind in ("cgroup", "cgroup2"):
        return f"cgroup {value.removesuffix('/cgroup.procs')}"
    return "no bypass (explicit)"


def run_checks(plan: Plan, explain: Callable[[Check], str]) -> Iterator[str]:
    """One line per check; raises Invalid (with the reason) at the first failure."""
    listener = Listener(plan.proxy_port, plan.proxy_uid, plan.timeout)
    try:
        yield f"ok: listening on port {plan.proxy_port} as UID {plan.proxy_uid}"
        for check in plan.checks:
            if check.kind == "skip":
                yield f"skip: {check.what}"
                continue
            if check.kind == "tproxy":  # the policy routing TPROXY needs: validate.sh looks (no probe can)
                reason = explain(check)
                if reason != "present":
                    raise Invalid(f"{check.what}: {reason}")
                yield f"ok: {check.what}: present"
                continue
            token = uuid.uuid4().hex
            if check.kind == "bypass":
                dial_as_proxy(plan, check.host, check.port, token)
                if listener.wait_for(token, plan.bypass_wait) is not None:
                    raise Invalid(f"{check.what} came back to the proxy port: the proxy would loop: "
                                  f"{explain(check)}")
                yield f"ok: {check.what} went out directly"
                continue
            dial(check.host, check.port, token, plan.timeout)
            got = listener.wait_for(token, plan.timeout)
            if got is None:
                raise Invalid(f"{check.what} did not reach the proxy port {plan.proxy_port}: {explain(check)}")
            want = hostport(check.host, check.port)
            if got != want:
                raise Invalid(f"{check.what} reached the proxy port, but its original destination "
                              f"(SO_ORIGINAL_DST) is {got}, not {want}")
            yield f"ok: {check.what} reached the proxy port {plan.proxy_port}, original destination {want}"
    finally:
        listener.close()


# --- the command -----------------------------------------------------------------------

def script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(scripts_dir() / "validate.sh"), *args], capture_output=True, text=True,
                          timeout=120)


def cmd_validate(args: argparse.Namespace) -> int:
    options = list(args.extra)
    if os.geteuid() != 0:
        print(f"{PROG}: needs root (it dials as other users and reads the rules)", file=sys.stderr)
        return EXIT_USAGE
    try:
        planned = script("--plan", *options)
    except ScriptsMissing as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if planned.returncode != 0:
        message = planned.stderr.strip().removeprefix("validate.sh: ") or "validate.sh --plan failed"
        print(f"{PROG}: {message}", file=sys.stderr)
        return EXIT_USAGE
    plan = parse_plan(planned.stdout)

    def explain(check: Check) -> str:
        reason = script("--explain", f"{check.kind}:{check.family}", *options)
        return reason.stdout.strip() or reason.stderr.strip() or "no reason found"

    try:
        for line in run_checks(plan, explain):
            print(f"{PROG}: {line}", flush=True)
    except Invalid as exc:
        print(f"{PROG}: FAIL: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_INVALID
    families = "IPv4 and IPv6" if any(c.family == 6 for c in plan.checks) else "IPv4"
    print(f"{PROG}: passed: the redirect works ({proxy_is(plan)}, {families})")
    return EXIT_OK


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "validate", help="check that the installed redirect works (root, in the pod's network namespace)",
        description="Sends connections through the installed rules: an app's must reach the proxy port with "
                    "the right SO_ORIGINAL_DST, the proxy's must not. Takes the options of "
                    "iptables/redirect.sh and iptables/validate.sh (--timeout S, --probe-v4, --probe-v6, "
                    "--probe-port). Exit 0, or 126 with the first failure and its reason.",
    )
    parser.set_defaults(func=cmd_validate, takes_any_arguments=True)
