"""The `sidecar-proxy` command: argparse subcommands and exit codes.

Exit codes: 0 success (also after a clean drain on SIGTERM); 1 the proxy
could not start or stopped on an error of the environment (privilege, a port
in use); 2 bad input (flags, config file).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Sequence

import yaml

from . import config as cfg
from .control import logs
from .control.lifecycle import (
    LISTENER_DELAY_ENV,
    AdminServer,
    Lifecycle,
    Runner,
    StartupError,
    check_mark_privilege,
    join_cgroup,
    raise_open_files_limit,
)
from .control.server import Proxy
from .control.supervisor import WorkerFailed
from .exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

log = logging.getLogger("proxy")


def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML config file (see README)")
    parser.add_argument("--port", metavar="N", help="the redirected port (env ISTIO_PROXY_PORT; default 5001)")
    parser.add_argument("--mark", metavar="MARK",
                        help="SO_MARK on every upstream socket, e.g. 0x1 (env ISTIO_SO_MARK; needs CAP_NET_ADMIN)")
    parser.add_argument("--cgroup", metavar="DIR", help="join this cgroup at start (the cgroup bypass method)")
    parser.add_argument("--loop", choices=cfg.LOOPS, help="event loop (default uvloop)")
    parser.add_argument("--concurrency", metavar="N",
                        help="worker processes on the same ports, as Envoy's --concurrency, "
                             "or auto: one per CPU (default 1)")
    parser.add_argument("--log-format", choices=cfg.LOG_FORMATS, help="log and access-log format (default text)")
    parser.add_argument("--log-level", choices=cfg.LOG_LEVELS, help="default info")
    parser.add_argument("--access-log", metavar="TARGET", help="stderr (default), stdout, off, or a file path")
    parser.add_argument("--idle-timeout", metavar="DURATION", help="close connections idle this long (default 1h)")
    parser.add_argument("--connect-timeout", metavar="DURATION", help="upstream connect timeout (default 5s)")
    parser.add_argument("--splice", choices=cfg.SPLICE_MODES,
                        help="auto (default): bulk transfers move by splice(2), in the kernel; off: always copy")
    parser.add_argument("--drain-timeout", metavar="DURATION",
                        help="on SIGTERM: inbound drains, outbound is still accepted, and live connections "
                             "go on this long; then exit (default 5s)")
    parser.add_argument("--drain-time", metavar="DURATION",
                        help="how long the listeners go on after /drain_listeners?graceful before they stop "
                             "(Envoy's --drain-time-s; default 600s)")
    parser.add_argument("--drain-strategy", choices=cfg.DRAIN_STRATEGIES,
                        help="how inbound stops on SIGTERM: gradual (default), new inbound connections are "
                             "refused with a probability rising over the drain timeout; immediate, all at once")
    parser.add_argument("--max-connections", metavar="N",
                        help="connections open at once in the whole proxy; past it, new ones are reset "
                             "(Envoy's global_downstream_max_connections; default: no limit)")
    parser.add_argument("--admin-address", metavar="IP",
                        help="admin API address (default 127.0.0.1; anything but loopback needs --admin-allow-remote)")
    parser.add_argument("--admin-port", metavar="N", help="admin API port (default 15000, Istio's; 0 turns it off)")
    parser.add_argument("--admin-allow-remote", action="store_true", default=None,
                        help="allow a non-loopback admin address (the API is unauthenticated and can stop the proxy)")
    parser.add_argument("--admin-hosts", metavar="NAMES",
                        help="host names a request's Host may carry besides the admin address and localhost "
                             "(comma-separated)")


def load_config(args: argparse.Namespace) -> cfg.Config:
    flags = {key: getattr(args, key, None) for key in (*cfg.SETTINGS, *cfg.SHORT_FORM)}
    return cfg.load(args.config, flags=flags)


def cmd_run(args: argparse.Namespace) -> int:
    return serve(load_config(args), sys.argv)


def serve(config: cfg.Config, argv: Sequence[str]) -> int:
    """Run the proxy `config` describes until it is stopped (`sidecar-proxy run`, `sidecar-envoy`)."""
    logs.setup(config.log_format, config.log_level, pattern=config.log_pattern, levels=config.logger_levels)
    log_ignored(config)
    before, after = raise_open_files_limit()  # first: every socket after it counts

    def ready() -> None:  # (logged once started: a start-up error stays one line)
        log.info("open files: soft limit %s", f"raised from {before} to {after} (the hard limit)"
                 if after != before else after)
        log.info("ready (loop=%s, workers=%d)", config.loop, config.concurrency)

    try:
        if config.cgroup:
            join_cgroup(config.cgroup)  # first: sockets inherit the cgroup's classid
        check_mark_privilege(config)
        proxy: Runner
        if config.concurrency > 1:
            from .control.supervisor import Supervisor
            proxy = Supervisor(config, argv=argv, listener_delay=_listener_delay(), admin=start_admin)
        else:
            proxy = Proxy(config, argv=argv, listener_delay=_listener_delay(), admin=start_admin)
        with runner_for(config.loop) as runner:
            runner.run(proxy.run(on_ready=ready))
    except (StartupError, WorkerFailed) as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    log.info("stopped")
    return EXIT_OK


def log_ignored(config: cfg.Config) -> None:
    """Name, once, what an Envoy bootstrap set that the proxy accepts and does not act on."""
    if config.ignored:
        log.warning("accepted and not acted on (operational, see README): %s", ", ".join(config.ignored))


async def start_admin(proxy: Lifecycle) -> AdminServer:
    from .admin.api import start_admin  # aiohttp is loaded only where the admin API runs
    return await start_admin(proxy)


def runner_for(loop: str) -> asyncio.Runner:
    if loop == "uvloop":
        import uvloop
        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


def cmd_worker(args: argparse.Namespace) -> int:
    """One worker of a proxy run with --concurrency N (started by the supervisor)."""
    from .control.worker import BadStart, run_worker
    try:
        return run_worker(args.control, runner_for)
    except BadStart as exc:
        print(f"sidecar-proxy worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE


def _listener_delay() -> float:
    """The test hook that holds the listeners back (see lifecycle.LISTENER_DELAY_ENV)."""
    value = os.environ.get(LISTENER_DELAY_ENV, "")
    return cfg.parse_duration(value, LISTENER_DELAY_ENV) if value else 0.0


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args)
    yaml.safe_dump(config.to_dict(), sys.stdout, sort_keys=False)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar-proxy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the proxy on the redirected port")
    _config_flags(run)
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate a config and print the effective one")
    _config_flags(check)
    check.set_defaults(func=cmd_check)
    worker = sub.add_parser("worker", help="internal: one worker of a proxy run with --concurrency N "
                                           "(the proxy starts them itself)")
    worker.add_argument("--control", type=int, required=True, metavar="FD")
    worker.set_defaults(func=cmd_worker)
    for name, module in TOOLS.items():
        try:
            tool = importlib.import_module(module, __package__)
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith(__package__ + "."):
                raise
            _absent_tool(sub, name)  # the runtime image ships the proxy alone
        else:
            tool.add_parser(sub)
    return parser


# Subcommands that live with the tools (proxy/kube, proxy/demo): each module
# has add_parser(sub). The proxy's runtime image leaves those folders out
# (proxy/explain too: it reads rules and configs, it never serves traffic).
TOOLS = {"demo": ".demo.demo", "services": ".kube.services", "inject": ".kube.inject",
         "validate": ".kube.validate", "explain": ".explain"}


def _absent_tool(sub, name: str) -> None:
    def absent(args: argparse.Namespace) -> int:
        print(f"sidecar-proxy {name}: not part of this installation (the proxy's image carries the proxy "
              "alone); run it where the whole package is installed (pip install sidecar-proxy)", file=sys.stderr)
        return EXIT_USAGE
    parser = sub.add_parser(name, help="(not in this installation)", add_help=False)
    parser.set_defaults(func=absent, takes_any_arguments=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_any_arguments", False):
        parser.parse_args(argv)  # the usual one-line error and exit 2
    args.extra = extra  # a command that takes any arguments hands them on (validate: to validate.sh)
    try:
        return args.func(args)
    except cfg.ConfigError as exc:
        print(f"sidecar-proxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
