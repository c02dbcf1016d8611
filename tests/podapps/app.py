"""The application in the pod tests' plain Pod (before `sidecar-proxy inject`).

  app.py serve PORT                 for each connection: read to EOF, then answer
                                    "<bytes> <sha256> <peer address>" (dual stack)
  app.py send HOST PORT SIZE        send SIZE bytes (seeded, so both ends can tell
                                    them), half-close, print JSON: what was sent
                                    and the answer
  app.py hold HOST PORT             open a connection, say one line, then wait for
                                    the other end to close it (the drain check)

It runs as an ordinary UID; SIGTERM ends it at once with status 0.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import socket
import sys
import threading


def serve(port: int) -> None:
    server = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    print(f"app: serving on port {port}", flush=True)
    while True:
        conn, peer = server.accept()
        threading.Thread(target=answer, args=(conn, peer), daemon=True).start()


def answer(conn: socket.socket, peer: tuple) -> None:
    with conn:
        digest, count = hashlib.sha256(), 0
        while data := conn.recv(1 << 16):
            digest.update(data)
            count += len(data)
        host = peer[0].removeprefix("::ffff:")
        conn.sendall(f"{count} {digest.hexdigest()} {host}\n".encode())


def send(host: str, port: int, size: int) -> None:
    payload = random.Random(size).randbytes(size)
    with socket.create_connection((host, port), timeout=20) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(1 << 16):
            reply += chunk
    print(json.dumps({"sent": size, "sha256": hashlib.sha256(payload).hexdigest(), "reply": reply.decode()}))


def hold(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=20) as sock:
        sock.sendall(b"held\n")
        sock.settimeout(None)
        while sock.recv(1 << 16):
            pass
    print("closed by the other end", flush=True)


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    command, *rest = argv
    if command == "serve":
        serve(int(rest[0]))
    elif command == "send":
        send(rest[0], int(rest[1]), int(rest[2]))
    elif command == "hold":
        hold(rest[0], int(rest[1]))
    else:
        sys.exit(f"app.py: unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
