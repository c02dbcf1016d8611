"""A stand-in for agnhost, the Kubernetes e2e test image that deploy/app.yaml runs.

The pod tests play the manifests in deploy/ with only the images substituted,
and no registry is reachable here, so this script (in an image built on the
local Python base) answers to the two subcommands those manifests use, with
agnhost's flags and exit statuses:

  agnhost netexec --http-port=N     an HTTP server: /healthz, /hostname, /clientip,
                                    /echo?msg=TEXT (the parts of netexec the tests ask)
  agnhost connect HOST:PORT [--timeout=5s]
                                    one TCP connection; exit 0 if it opened, else
                                    1 with TIMEOUT, REFUSED or OTHER: ... on stderr

SIGTERM ends it at once with status 0 (it is PID 1, which gets no default
action for SIGTERM).
"""

from __future__ import annotations

import argparse
import http.server
import signal
import socket
import sys
import urllib.parse


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/healthz":
            body = "ok"
        elif url.path == "/hostname":
            body = socket.gethostname()
        elif url.path == "/clientip":
            host, port = self.client_address[:2]
            host = host.removeprefix("::ffff:")  # an IPv4 client, as Go prints it
            body = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        elif url.path == "/echo":
            body = urllib.parse.parse_qs(url.query).get("msg", [""])[0]
        else:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        print(f"netexec: {self.client_address[0]} {fmt % args}", flush=True)


class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6  # [::] takes IPv4 too
    daemon_threads = True


def netexec(port: int) -> int:
    with Server(("::", port), Handler) as server:
        print(f"netexec: serving on port {port}", flush=True)
        server.serve_forever()
    return 0


def seconds(text: str) -> float:
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(text[: -len(suffix)]) * factor
    raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 5s")


def connect(dest: str, timeout: float) -> int:
    host, _, port = dest.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return 0
    except TimeoutError:
        print("TIMEOUT", file=sys.stderr)
    except ConnectionRefusedError:
        print("REFUSED", file=sys.stderr)
    except OSError as exc:
        print(f"OTHER: {exc}", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    parser = argparse.ArgumentParser(prog="agnhost")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("netexec")
    p.add_argument("--http-port", type=int, default=8080)
    p = sub.add_parser("connect")
    p.add_argument("dest")
    p.add_argument("--timeout", type=seconds, default=5.0)
    args = parser.parse_args(argv)
    if args.command == "netexec":
        return netexec(args.http_port)
    return connect(args.dest, args.timeout)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
