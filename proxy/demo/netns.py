"""Throwaway network namespaces, for the demo and the end-to-end tests.

The demo and each test build a small world of their own: a "pod" namespace (the app and the
proxy) and a "remote" namespace (servers at documentation addresses), joined
by one veth pair and linked to nothing else (only documentation addresses).
Every name carries a per-run suffix so that parallel or aborted runs never
collide, and everything is removed by `close()`, also on failure.

Sockets are opened *inside* a namespace from this process: `NetNs.socket()`
switches the calling thread into the namespace just for the `socket()` call
(a socket stays in the namespace it was created in). So one process plays
the app and the servers, with no helper processes to manage, while the proxy
runs as a real separate process under UID 1337.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from socket import socket as Socket  # the class: NetNs.socket shadows the module's name there

CLONE_NEWNET = 0x40000000
IP_FREEBIND = 15  # linux/in.h; not exported by the socket module
_libc = ctypes.CDLL(None, use_errno=True)
_setns_lock = threading.Lock()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run(cmd: Sequence[str], *, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; on failure raise with its stderr."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, input=input, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def unique_suffix() -> str:
    return f"{os.getpid() % 100000}{secrets.token_hex(2)}"


class NetNs:
    """One named network namespace with its loopback up."""

    def __init__(self, name: str) -> None:
        self.name = name
        run(["ip", "netns", "add", name])
        self.path = f"/run/netns/{name}"
        self.ip("link", "set", "lo", "up")

    # -- running things inside ------------------------------------------------
    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def nsenter_argv(self, *cmd: str) -> list[str]:
        """Like argv, but keeping this process's mounts: `ip netns exec` gives
        the command a fresh /sys without the cgroup hierarchies, which the
        cgroup bypass method needs to see (and to mount into)."""
        return ["nsenter", f"--net={self.path}", "--", *cmd]

    def exec(self, *cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(self.argv(*cmd), check=check, input=input)

    def ip(self, *args: str) -> str:
        return run(["ip", "-n", self.name, *args]).stdout

    def popen(self, *cmd: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*cmd), **kwargs)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Switch the calling thread into this namespace for the block."""
        with _setns_lock:
            here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            there = os.open(self.path, os.O_RDONLY)
            try:
                _setns(there)
                try:
                    yield
                finally:
                    _setns(here)
            finally:
                os.close(here)
                os.close(there)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> Socket:
        with self.entered():
            return socket.socket(family, type)

    def connect(self, addr: tuple, timeout: float = 5.0, source: tuple | None = None) -> Socket:
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        sock = self.socket(family)
        try:
            sock.settimeout(timeout)
            if source is not None:
                sock.bind(source)
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        return sock

    def listen(self, addr: tuple, backlog: int = 512) -> Socket:
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        sock = self.socket(family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # the remote's service ranges are local routes, not interface
        # addresses: IPv6 binds them only with freebind
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        sock.bind(addr)
        sock.listen(backlog)
        return sock

    def close(self) -> None:
        run(["ip", "netns", "delete", self.name], check=False)


class PodWorld:
    """A pod namespace and a remote namespace joined by a veth pair.

    pod    192.0.2.1/24     2001:db8:1::1/64   (the pod IP)
    remote 192.0.2.2/24     2001:db8:1::2/64   (its gateway)
    remote also owns all of 198.51.100.0/24 and 2001:db8:2::/64 (local
    routes): the "services" that outbound traffic goes to.
    """

    POD_V4 = "192.0.2.1"
    REMOTE_V4 = "192.0.2.2"
    POD_V6 = "2001:db8:1::1"
    REMOTE_V6 = "2001:db8:1::2"

    def __init__(self) -> None:
        suffix = unique_suffix()
        self.pod = NetNs(f"scp-pod-{suffix}")
        try:
            self.remote = NetNs(f"scp-rem-{suffix}")
            veth_pod, veth_rem = f"vp{suffix}"[:15], f"vr{suffix}"[:15]
            run(["ip", "link", "add", veth_pod, "netns", self.pod.name,
                 "type", "veth", "peer", "name", veth_rem, "netns", self.remote.name])
            for ns, dev, v4, v6 in ((self.pod, veth_pod, self.POD_V4, self.POD_V6),
                                    (self.remote, veth_rem, self.REMOTE_V4, self.REMOTE_V6)):
                ns.ip("link", "set", dev, "name", "eth0")
                ns.ip("addr", "add", f"{v4}/24", "dev", "eth0")
                ns.ip("-6", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
                ns.ip("link", "set", "eth0", "up")
            self.pod.ip("route", "add", "default", "via", self.REMOTE_V4)
            self.pod.ip("-6", "route", "add", "default", "via", self.REMOTE_V6)
            self.remote.ip("route", "add", "local", "198.51.100.0/24", "dev", "lo")
            self.remote.ip("-6", "route", "add", "local", "2001:db8:2::/64", "dev", "lo")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for ns in (getattr(self, "pod", None), getattr(self, "remote", None)):
            if ns is not None:
                ns.close()


class ThreadedServer:
    """A threaded TCP server in a namespace; `handler(conn)` runs per connection."""

    def __init__(self, ns: NetNs, addr: tuple, handler: Callable[[socket.socket], None]) -> None:
        self.sock = ns.listen(addr)
        self.addr = addr
        self.handler = handler
        self.accepted: list[tuple] = []
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(peer)
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(30)
            self.handler(conn)

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self.sock.close()
        for t in self._threads:
            t.join(timeout=5)
