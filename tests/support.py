"""Test support: re-exports of the sandbox, and small server handlers."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from proxy.demo.netns import ThreadedServer as Server  # noqa: F401  (the tests' name for it)
from proxy.demo.sandbox import PROXY_UID, PYTHON, ProxyProcess, setpriv_argv  # noqa: F401

# --- handlers ---------------------------------------------------------------------------

def identify(name: str) -> Callable[[socket.socket], None]:
    """Say who we are and who called, then echo until EOF."""
    def handler(conn: socket.socket) -> None:
        peer = conn.getpeername()
        conn.sendall(f"{name} {peer[0]}\n".encode())
        while data := conn.recv(65536):
            conn.sendall(data)
    return handler


def digest_sink(conn: socket.socket) -> None:
    """Read until EOF, then answer with the byte count and sha256 of what came."""
    h, n = hashlib.sha256(), 0
    while data := conn.recv(1 << 20):
        h.update(data)
        n += len(data)
    conn.sendall(f"{n} {h.hexdigest()}\n".encode())


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def recv_line(sock: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode()


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


# --- the admin API, from inside a namespace ------------------------------------------

ADMIN = ("127.0.0.1", 15000)


class Reply(NamedTuple):
    status: int
    headers: dict[str, str]
    body: str

    def json(self):
        return json.loads(self.body)

    def brief(self) -> tuple[int, str]:
        return self.status, self.body


def admin(ns, method: str, path: str, addr: tuple = ADMIN) -> Reply:
    """One HTTP/1.1 request to the admin API (HTTP/1.0 gets Envoy's 426), from inside `ns`."""
    with ns.connect(addr, timeout=10) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: {addr[0]}\r\nContent-Length: 0\r\n"
                  f"Connection: close\r\n\r\n".encode())
        raw = recv_all(s)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = dechunk(body)
    return Reply(int(status_line.split()[1]), headers, body.decode())


def dechunk(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body put together."""
    out = b""
    while body:
        size, _, body = body.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out, body = out + body[:n], body[n + 2:]
    return out


def stats_of(ns) -> dict[str, int]:
    text = admin(ns, "GET", "/stats").body
    return {name: int(value) for name, _, value in (line.partition(": ") for line in text.splitlines())}


def wait_until(check, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s")
        time.sleep(0.05)


# --- processes ---------------------------------------------------------------------------

def children_of(pid: int) -> list[int]:
    """PIDs of a process's children (the workers of a proxy with --concurrency)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def status_field(pid: int, name: str) -> str:
    """A field of /proc/PID/status, e.g. "Uid" or "CapEff"."""
    with open(f"/proc/{pid}/status") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith(name + ":"))


# --- the init image's tools ------------------------------------------------------------

def init_image_bin(directory: Path, applets: tuple[str, ...]) -> str:
    """Fill `directory` with BusyBox `applets` and the iptables programs and
    nft, nothing else: the init image's PATH (Alpine: BusyBox's tools)."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox is not installed (apt-get install busybox)"
    for applet in applets:
        (directory / applet).symlink_to(busybox)
    sbin = Path(shutil.which("iptables-nft-restore") or "/usr/sbin/iptables-nft-restore").parent
    for program in sbin.iterdir():
        if "tables" in program.name or program.name == "nft":
            (directory / program.name).symlink_to(program)
    return str(directory)
