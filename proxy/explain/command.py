"""The command line of `sidecar-proxy explain`.

Exit codes: 0 explained; 1 explained in part (something could not be read:
each is one line of the output); 2 bad input (flags, config file).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import pwd
import sys
from pathlib import Path

from .. import config as cfg
from ..exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from . import gather
from .render import to_json, to_text
from .report import Facts, Request, explain
from .walk import IPAddress

PROG = "sidecar-proxy explain"


class BadInput(Exception):
    pass


def parse_address(text: str, flag: str, port_required: bool) -> tuple[IPAddress, int | None]:
    """ADDR, ADDR:PORT, [V6ADDR]:PORT or a bare IPv6 address."""
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise BadInput(f"{flag}: {text!r} is not ADDR:PORT")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise BadInput(f"{flag}: {host!r} is not an IP address") from None
    if port is None:
        if port_required:
            raise BadInput(f"{flag}: {text!r} has no port (ADDR:PORT, [ADDR]:PORT for IPv6)")
        return address, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BadInput(f"{flag}: {port!r} is not a port (1-65535)")
    return address, int(port)


def _uid(text: str) -> tuple[int, int | None]:
    """--uid: a number or a user name; its primary group if the user exists."""
    if text.isdigit():
        uid = int(text)
        try:
            return uid, pwd.getpwuid(uid).pw_gid
        except KeyError:
            return uid, None
    try:
        entry = pwd.getpwnam(text)
    except KeyError:
        raise BadInput(f"--uid: {text!r} is neither a number nor a user") from None
    return entry.pw_uid, entry.pw_gid


def _number(text: str, flag: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise BadInput(f"--{flag}: {text!r} is not a number (decimal or 0x...)") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise BadInput(f"--{flag}: {text!r} is out of range (0-0xffffffff)")
    return value


def _cgroup(text: str) -> tuple[int, str | None]:
    """--cgroup: a net_cls classid, a net_cls cgroup directory, or a cgroup v2 path."""
    if text[:1].isdigit():
        return _number(text, "cgroup"), None
    if not text.startswith("/"):
        raise BadInput(f"--cgroup: {text!r} is neither a classid nor a path")
    classid_file = Path(text, "net_cls.classid")
    if classid_file.is_file():
        try:
            return int(classid_file.read_text().strip() or 0), None
        except (OSError, ValueError) as exc:
            raise BadInput(f"--cgroup: {classid_file}: {exc}") from None
    for mount in Path("/proc/self/mounts").read_text().splitlines():
        fields = mount.split()
        if len(fields) > 2 and fields[2] == "cgroup2" and (text + "/").startswith(fields[1].rstrip("/") + "/"):
            return 0, "/" + text[len(fields[1]):].strip("/")
    return 0, text  # a path relative to the cgroup2 root, as -m cgroup --path takes it


def request_from(args: argparse.Namespace) -> Request:
    dst, dport = parse_address(args.to, "--to", port_required=True)
    assert dport is not None
    src, sport = parse_address(args.source, "--from", port_required=False) if args.source else (None, None)
    if src is not None and src.version != dst.version:
        raise BadInput(f"--from {args.source} and --to {args.to} are of different address families")
    if args.inbound and args.uid is not None:
        raise BadInput("--uid: an inbound connection has no local socket owner")
    own_classid, own_path = gather.cgroups_of(os.getpid())
    uid, gid = (os.getuid(), os.getgid()) if args.uid is None else _uid(args.uid)
    mark = _number(args.mark, "mark") if args.mark is not None else 0
    classid, path = _cgroup(args.cgroup) if args.cgroup is not None else (own_classid, own_path)
    if args.cgroup is not None and path is None:
        path = own_path
    return Request(dst, dport, src, sport, args.inbound, uid=uid, gid=gid, mark=mark, classid=classid,
                   cgroup_path=path, iif=args.interface)


def facts_for(args: argparse.Namespace, request: Request) -> Facts:
    unreadable: list[str] = []
    connections = None
    config: cfg.Config | None
    if args.config:
        config, source = gather.load_file(args.config), f"config {args.config}"
    elif args.admin:
        try:
            config, path = gather.fetch_admin_config(args.admin)
            source = f"the running proxy's {path}, {args.admin}"
        except gather.Unreadable as exc:
            unreadable.append(f"the proxy's configuration: {exc}")
            config, source = None, "no configuration"
    else:
        config, source = cfg.load(None), "built-in defaults (no --config or --admin)"
    if args.admin and config is not None:
        try:
            connections = gather.fetch_admin(args.admin, config)
            if args.config:
                source += f", counters from {args.admin}"
        except gather.Unreadable as exc:
            unreadable.append(f"the proxy's counters: {exc}")
    port = config.redirect.addresses[0].port if config is not None and config.redirect else cfg.DEFAULT_PORT
    try:
        ruleset = gather.read_rules_file(args.rules, request.dst.version) if args.rules else \
            gather.read_rules(request.dst.version)
    except gather.Unreadable as exc:
        unreadable.append(f"the rules: {exc}")
        ruleset = None
    return Facts(ruleset, config, source, gather.local_addresses(), gather.route, gather.proxy_identity(port),
                 connections, config.concurrency if config is not None else 1, unreadable)


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        request = request_from(args)
        facts = facts_for(args, request)
    except BadInput as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    explanation = explain(request, facts)
    if args.json:
        print(json.dumps(to_json(explanation), indent=2))
    else:
        sys.stdout.write(to_text(explanation))
    return EXIT_FAILURE if explanation.unreadable else EXIT_OK


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("explain", help="what the rules and the proxy would do with one connection "
                                            "(read-only, no traffic)")
    parser.add_argument("--to", required=True, metavar="ADDR:PORT", help="where the connection goes")
    parser.add_argument("--from", dest="source", metavar="ADDR[:PORT]",
                        help="its source (default for outbound: the route's source address)")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--uid", metavar="UID", help="outbound: the socket's owner (default: yours)")
    who.add_argument("--mark", metavar="MARK", help="the socket's SO_MARK (default none)")
    who.add_argument("--cgroup", metavar="C",
                     help="a net_cls classid (0x100001), a net_cls cgroup directory, or a cgroup v2 path "
                          "(default: yours)")
    parser.add_argument("--inbound", action="store_true",
                        help="a connection arriving at the pod (PREROUTING), not one it opens")
    parser.add_argument("--interface", metavar="NAME",
                        help="inbound: the interface it arrives on (default: the route's to --from)")
    parser.add_argument("--config", "-c", metavar="FILE", help="the proxy's config file")
    parser.add_argument("--admin", metavar="URL",
                        help="the running proxy's admin API (e.g. 127.0.0.1:15000): its /config_dump unless "
                             "--config is given, and its counters (round robin's turn)")
    parser.add_argument("--rules", metavar="FILE",
                        help="saved rules (iptables-save -c text or nft -j list ruleset) instead of the "
                             "installed ones")
    parser.add_argument("--json", action="store_true", help="JSON for tools")
    parser.set_defaults(func=cmd_explain)
