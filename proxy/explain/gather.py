"""What explain reads from the machine: rules, routes, addresses, the proxy.

Read-only, and never fatal: each reader returns what it found or one line
saying what it could not read and why (most of it needs root: iptables-save
and nft need CAP_NET_ADMIN, the owner of a socket's process is in other
users' /proc/PID/fd). The rest of the explanation goes on without it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import config as cfg
from ..datapath.localaddrs import dump_addresses
from .report import ProxyIdentity
from .rules import Rule, RulesError, Ruleset, parse_nft_json, parse_save
from .walk import IPAddress

TIMEOUT = 10.0  # seconds for each command and each admin request
OUR_TABLE = "sidecar_proxy"  # redirect.sh --backend nft-native


class Unreadable(Exception):
    """One line: what could not be read, and why."""


class NotThere(Unreadable):
    """The admin API has no such path (HTTP 404)."""


def _run(*argv: str) -> str:
    if shutil.which(argv[0]) is None:
        raise Unreadable(f"{argv[0]}: not installed")
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unreadable(f"{' '.join(argv)}: {exc}") from None
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        raise Unreadable(f"{' '.join(argv)}: {why}")
    return out.stdout


def read_rules(family: int) -> Ruleset:
    """The installed rules for `family`: our nft table if there is one, else
    iptables' (the nft variant, or legacy if that is where our chains are)."""
    problems = []
    if shutil.which("nft"):
        try:
            data = json.loads(_run("nft", "-j", "list", "ruleset"))
        except Unreadable as exc:
            problems.append(str(exc))
        except ValueError as exc:
            raise Unreadable(f"nft -j list ruleset: not JSON ({exc})") from None
        else:
            if any("table" in i and i["table"].get("name") == OUR_TABLE for i in data.get("nftables", [])):
                return _only_ours(parse_nft_json(data))
    tools = ("iptables-save", "iptables-legacy-save") if family == 4 else ("ip6tables-save", "ip6tables-legacy-save")
    found = None
    for tool in tools:
        if shutil.which(tool) is None:
            continue
        try:
            text = _run(tool, "-c")
        except Unreadable as exc:
            problems.append(str(exc))
            continue
        ruleset = parse_save(text, family)
        if found is None or ":SIDECAR_" in text:
            found = ruleset
        if ":SIDECAR_" in text:
            break
    if found is None:
        raise Unreadable("; ".join(problems) or "neither nft nor iptables-save is installed")
    return found


def _only_ours(ruleset: Ruleset) -> Ruleset:
    """nft-native: our table. (Tables iptables-nft made hold xt expressions this walker cannot read.)"""
    ruleset.tables = [t for t in ruleset.tables if t.name == OUR_TABLE]
    for table in ruleset.tables:
        for rules in table.chains.values():
            rules[:] = [_cgroup_named(rule) for rule in rules]
    return ruleset


def _cgroup_named(rule: Rule) -> Rule:
    """A `socket cgroupv2` match as a path below the cgroup2 root. nft lists
    the cgroup by its path below /sys/fs/cgroup, which on a host with the
    hybrid layout is not that root (`unified/NAME`), or, if it does not find
    it there, by its id (the directory's inode number)."""
    terms = list(rule.terms)
    for n, term in enumerate(terms):
        if term.kind == "cgroup_path":
            value = str(term.value)
            path = _cgroup_by_id(int(value)) if value.isdigit() else _below_root(value)
            if path is not None and path != value:
                terms[n] = replace(term, value=path, text=f"{term.text} ({path})")
    return replace(rule, terms=tuple(terms))


def _cgroup2_roots() -> list[str]:
    return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
            if len(line.split()) > 2 and line.split()[2] == "cgroup2"]


def _below_root(listed: str) -> str | None:
    full = os.path.normpath(os.path.join("/sys/fs/cgroup", listed.lstrip("/")))
    for root in _cgroup2_roots():
        if full == root or full.startswith(root.rstrip("/") + "/"):
            return "/" + os.path.relpath(full, root).removeprefix(".")
    return None


def _cgroup_by_id(inode: int) -> str | None:
    for root in _cgroup2_roots()[:1]:
        for directory, subdirectories, _ in os.walk(root):
            try:
                if os.stat(directory).st_ino == inode:
                    return "/" + os.path.relpath(directory, root).removeprefix(".")
            except OSError:
                continue
            if directory.count("/") - root.count("/") >= MAX_CGROUP_DEPTH:
                subdirectories.clear()
    return None


MAX_CGROUP_DEPTH = 8  # how deep a cgroup id is looked for


def read_rules_file(path: str, family: int) -> Ruleset:
    """Saved rules (--rules FILE): nft's JSON, or iptables-save text."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise Unreadable(f"{path}: {exc.strerror or exc}") from None
    try:
        if text.lstrip().startswith("{"):
            return _only_ours(parse_nft_json(json.loads(text)))
        return parse_save(text, family)
    except (RulesError, ValueError, KeyError, TypeError) as exc:
        raise Unreadable(f"{path}: {exc}") from None


def route(dst: IPAddress) -> tuple[IPAddress | None, str | None]:
    """The kernel's route to `dst` in this network namespace: (source, interface)."""
    try:
        routes = json.loads(_run("ip", "-j", "route", "get", str(dst)))
    except (Unreadable, ValueError):
        return None, None
    if not routes:
        return None, None
    prefsrc = routes[0].get("prefsrc")
    return (ipaddress.ip_address(prefsrc) if prefsrc else None), routes[0].get("dev")


def local_addresses() -> frozenset[str]:
    try:
        return dump_addresses()
    except OSError:
        return frozenset()


# ---------------------------------------------------------------- the proxy --

def proxy_identity(port: int) -> ProxyIdentity:
    """Who owns the socket listening on the proxy port in this network namespace."""
    listening = _listening(port)
    if listening is None:
        return ProxyIdentity(port, found=f"nothing listens on port {port} here")
    uid, inode = listening
    pid = _pid_of(inode)
    if pid is None:
        return ProxyIdentity(port, uid=uid, found=f"the socket on port {port} belongs to UID {uid}")
    classid, path = cgroups_of(pid)
    return ProxyIdentity(port, uid, pid, classid, path, found=f"pid {pid} listens on port {port}")


def _listening(port: int) -> tuple[int, int] | None:
    """(uid, inode) of a TCP socket in LISTEN on `port` (/proc/net/tcp{,6}: this namespace's)."""
    for name in ("/proc/net/tcp6", "/proc/net/tcp"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return int(fields[7]), int(fields[9])
    return None


def _pid_of(inode: int) -> int | None:
    wanted = f"socket:[{inode}]"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) == wanted:
                    return int(entry.name)
        except OSError:
            continue
    return None


def cgroups_of(pid: int) -> tuple[int, str | None]:
    """The net_cls classid and the cgroup v2 path of a process."""
    classid, v2 = 0, None
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return 0, None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2 = path
        elif "net_cls" in controllers.split(","):
            classid = _classid(path)
    return classid, v2


def _classid(path: str) -> int:
    for mount in Path("/proc/self/mounts").read_text().splitlines():
        fields = mount.split()
        if len(fields) > 3 and fields[2] == "cgroup" and "net_cls" in fields[3].split(","):
            try:
                return int(Path(fields[1], path.lstrip("/"), "net_cls.classid").read_text().strip() or 0)
            except (OSError, ValueError):
                continue
    return 0


# ----------------------------------------------------------- configuration --

def load_file(path: str) -> cfg.Config:
    """The proxy's config as `sidecar-proxy run --config F` builds it (with the environment)."""
    return cfg.load(path)


def admin_base(url: str) -> str:
    return (url if "://" in url else f"http://{url}").rstrip("/")


def fetch_admin_config(url: str) -> tuple[cfg.Config, str]:
    """The running proxy's config, and the admin path it came from: its own
    model from /effective_config (this proxy, started from our YAML or from a
    bootstrap), else, for a real Envoy, the bootstrap in its /config_dump read
    by the proxy's bootstrap front end."""
    base = admin_base(url)
    try:
        return cfg.from_data(_get_json(f"{base}/effective_config")), "/effective_config"
    except NotThere:
        pass  # not this proxy: Envoy's admin answers 404
    except cfg.ConfigError as exc:
        raise Unreadable(f"{base}/effective_config: {exc}") from None
    dump = _get_json(f"{base}/config_dump")
    sections = dump.get("configs", []) if isinstance(dump, dict) else []
    boot = next((s.get("bootstrap") for s in sections if isinstance(s, dict)
                 and str(s.get("@type", "")).endswith("BootstrapConfigDump")), None)
    if boot is None:
        raise Unreadable(f"{base}/config_dump: no bootstrap in it")
    from ..config.envoy import from_bootstrap
    try:
        return from_bootstrap(boot), "/config_dump"
    except cfg.ConfigError as exc:
        raise Unreadable(f"{base}/config_dump: its bootstrap does not load ({exc}); give the proxy's "
                         "config file with --config") from None


def fetch_admin(url: str, config: cfg.Config) -> dict[str, int]:
    """Per cluster of `config`, the connections that reached one of its
    endpoints so far (/stats: attempts less failures): round robin's turn."""
    base = admin_base(url)
    stats: dict[str, int] = {}
    for stat in _get_json(f"{base}/stats?format=json&filter=cluster").get("stats", []):
        name, value = str(stat.get("name", "")), stat.get("value", 0)
        if name.startswith("cluster.") and isinstance(value, int):
            stats[name] = value
    connections = {}
    for cluster in config.clusters:
        total = stats.get(f"cluster.{cluster.name}.upstream_cx_total", 0)
        failed = stats.get(f"cluster.{cluster.name}.upstream_cx_connect_fail", 0)
        connections[cluster.name] = total - failed
    return connections


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise NotThere(f"{url}: HTTP 404") from None
        raise Unreadable(f"{url}: HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        raise Unreadable(f"{url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise Unreadable(f"{url}: {exc}") from None
