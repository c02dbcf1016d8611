"""Test support: re-exports of the sandbox, and small server handlers."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable

from proxy.netns import ThreadedServer as Server  # noqa: F401  (the tests' name for it)
from proxy.sandbox import PROXY_UID, PYTHON, ProxyProcess, setpriv_argv  # noqa: F401


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
