"""The admin HTTP API, shaped like Envoy's: same paths, methods and formats.

It runs in the proxy's own event loop (aiohttp) and costs the data path
nothing between requests: the data path only bumps counters (stats.py); this
module reads them, and the live connections, when a request asks, and hands
the rendering to `statsfmt` (pure functions).

Bound to 127.0.0.1:15000 by default (Istio's admin port). It has no
authentication and can stop the proxy, so a non-loopback address needs
`admin_allow_remote` and logs a warning. As in Envoy, every endpoint that
changes something needs POST: a GET there gets 405 and changes nothing.

Istio's pilot-agent decides readiness from this API:
`GET /stats?usedonly&filter=^(server\\.state|listener_manager\\.workers_started)`
must say `server.state: 0` and `listener_manager.workers_started: 1`, and
`cluster_manager.cds.update_success` / `listener_manager.lds.update_success`
must be above 0. Those stats are computed here from the server's state.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

from .. import __version__
from ..config import ORIGINAL_DST, hostport
from ..control import logs
from ..control.lifecycle import Lifecycle, StartupError, State
from ..control.sockets import bind
from ..datapath.snapshot import Snapshot
from ..datapath.stats import is_gauge
from . import guard
from . import statsfmt as fmt

log = logging.getLogger("proxy.admin")

Handler = Callable[[web.Request, Lifecycle], Awaitable[web.Response]]

REQUEST_TIMEOUT = 10.0  # seconds a connection may take to send a whole request (and idle between them)
BODY_LIMIT = 64 * 1024  # no endpoint reads a body; a big one is refused
CONNECTIONS_LIMIT = 1000  # /connections lists at most this many unless ?limit= says otherwise


# --- what the endpoints read ----------------------------------------------------

def collect_stats(proxy: Lifecycle, snap: Snapshot) -> list[fmt.Stat]:
    """Every stat: the counters, plus the bytes of live connections, plus the server's state."""
    live = dict(snap.live_bytes)
    out = []
    for name in sorted(snap.declared | snap.counters.keys()):
        extra = live.pop(name, 0)
        used = name in snap.counters
        out.append(fmt.Stat(name, snap.counters.get(name, 0) + extra, is_gauge(name), used or extra != 0))
    out.extend(fmt.Stat(name, value, is_gauge(name), value != 0) for name, value in live.items())
    state, up = proxy.state, proxy.workers_started
    out += [
        fmt.Stat("server.state", int(state), gauge=True),
        fmt.Stat("server.live", int(state == State.LIVE), gauge=True),
        fmt.Stat("server.uptime", int(time.monotonic() - proxy.started_mono), gauge=True),
        fmt.Stat("server.concurrency", proxy.config.concurrency, gauge=True),
        fmt.Stat("server.total_connections", snap.total_connections, gauge=True),
        fmt.Stat("listener_manager.workers_started", int(up), gauge=True),
        fmt.Stat("listener_manager.total_listeners_active", 0 if proxy.draining else len(proxy.listeners),
                 gauge=True, used=up),
        # Our configuration is static: it is "received" once, when it is in force.
        fmt.Stat("listener_manager.lds.update_success", int(up), used=up),
        fmt.Stat("cluster_manager.cds.update_success", 1),
        fmt.Stat("cluster_manager.active_clusters", len(proxy.config.clusters) + 1, gauge=True),
    ]
    return out


def cluster_views(proxy: Lifecycle, snap: Snapshot) -> list[fmt.ClusterView]:
    """Configured clusters with their endpoints; original_dst with the destinations it has open."""
    hosts = snap.hosts
    views = [fmt.ClusterView(c.name, tuple(fmt.HostView(e.host, e.port, hosts.get(c.name, {}).get((e.host, e.port), {}))
                                           for e in c.endpoints)) for c in proxy.config.clusters]
    passthrough = sorted(hosts.get(ORIGINAL_DST, {}).items())
    views.append(fmt.ClusterView(ORIGINAL_DST, tuple(fmt.HostView(h, p, stats) for (h, p), stats in passthrough)))
    return sorted(views, key=lambda v: v.name)


# --- endpoints -------------------------------------------------------------------

def _text(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/plain")


def _json(body: str | dict) -> web.Response:
    return web.Response(text=body if isinstance(body, str) else json.dumps(body, indent=2),
                        content_type="application/json")


@functools.cache
def _page() -> str:
    return resources.files(__package__).joinpath("admin.html").read_text(encoding="utf-8")


async def home(request: web.Request, proxy: Lifecycle) -> web.Response:
    return web.Response(text=_page(), content_type="text/html")


async def help_(request: web.Request, proxy: Lifecycle) -> web.Response:
    return _text(usage())


async def ready(request: web.Request, proxy: Lifecycle) -> web.Response:
    state = proxy.state
    return _text(f"{state.name}\n", 200 if state == State.LIVE else 503)


async def server_info(request: web.Request, proxy: Lifecycle) -> web.Response:
    config, uptime = proxy.config, f"{int(time.monotonic() - proxy.started_mono)}s"
    return _json({
        "version": f"sidecar-proxy/{__version__}",
        "state": proxy.state.name,
        "uptime_current_epoch": uptime,
        "uptime_all_epochs": uptime,
        "command_line_options": {
            "argv": list(proxy.argv), "concurrency": config.concurrency, "mode": "Serve", "restart_epoch": 0,
            "log_level": logs.level_name(logging.getLogger().level),
            "log_format": config.log_format, "loop": config.loop,
            "drain_time": f"{config.drain_timeout:g}s",
        },
        "node": {"user_agent_name": "sidecar-proxy", "user_agent_version": __version__},
    })


async def config_dump(request: web.Request, proxy: Lifecycle) -> web.Response:
    return _json(proxy.config.to_dict())


async def listeners(request: web.Request, proxy: Lifecycle) -> web.Response:
    views = [fmt.ListenerView(name, tuple(addresses)) for name, addresses in proxy.listeners.items()]
    if fmt.format_param(request.query, fmt.LISTING_FORMATS) == "json":
        return _json(fmt.render_listeners_json(views))
    return _text(fmt.render_listeners_text(views))


async def clusters(request: web.Request, proxy: Lifecycle) -> web.Response:
    views = cluster_views(proxy, await proxy.snapshot(0))
    if fmt.format_param(request.query, fmt.LISTING_FORMATS) == "json":
        return _json(fmt.render_clusters_json(views))
    return _text(fmt.render_clusters_text(views))


async def stats(request: web.Request, proxy: Lifecycle, default_format: str = "text") -> web.Response:
    query = request.query
    chosen = fmt.format_param({"format": query.get("format", default_format)}, fmt.STATS_FORMATS)
    pattern = query.get("filter")
    fmt.compile_filter(pattern)  # a bad pattern is a 400 before any work
    selected = fmt.select(collect_stats(proxy, await proxy.snapshot(0)), pattern=pattern,
                          used_only="usedonly" in query)
    if chosen == "json":
        return _json(fmt.render_json(selected))
    if chosen == "prometheus":
        return web.Response(text=fmt.render_prometheus(selected),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
    return _text(fmt.render_text(selected))


async def stats_prometheus(request: web.Request, proxy: Lifecycle) -> web.Response:
    return await stats(request, proxy, "prometheus")


async def connections(request: web.Request, proxy: Lifecycle) -> web.Response:
    raw = request.query.get("limit", str(CONNECTIONS_LIMIT))
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9):
        raise fmt.BadRequest(f"limit {raw[:20]!r} is not a number up to 999999999")
    snap = await proxy.snapshot(int(raw))
    return _json({"total": snap.total_connections, "connections": snap.connections})


async def healthcheck_fail(request: web.Request, proxy: Lifecycle) -> web.Response:
    proxy.health_check_failed = True
    log.info("admin: health check failed by request: /ready answers 503")
    return _text("OK\n")


async def healthcheck_ok(request: web.Request, proxy: Lifecycle) -> web.Response:
    proxy.health_check_failed = False
    log.info("admin: health check ok again")
    return _text("OK\n")


async def drain_listeners(request: web.Request, proxy: Lifecycle) -> web.Response:
    if "inboundonly" in request.query:
        raise fmt.BadRequest("inboundonly: the redirected port takes both directions; drain all or none")
    proxy.drain_listeners()  # `graceful` is accepted: closing the listeners never cuts a live connection
    return _text("OK\n")


async def quitquitquit(request: web.Request, proxy: Lifecycle) -> web.Response:
    log.info("admin: /quitquitquit")
    proxy.stop()
    return _text("OK\n")


async def logging_(request: web.Request, proxy: Lifecycle) -> web.Response:
    loggers = logs.our_loggers()
    changes = []
    for name, value in request.query.items():
        if name != "level" and name not in loggers:
            raise fmt.BadRequest(f"error: unknown logger {name!r} (loggers: {', '.join(sorted(loggers))})")
        if value not in logs.LEVELS:
            raise fmt.BadRequest(f"error: unknown logger level {value!r} (levels: {', '.join(logs.LEVELS)})")
        changes.append((name, logs.LEVELS[value]))
    logs.apply_levels(changes)
    await proxy.log_levels_changed(changes)
    lines = [f"  {name}: {logs.level_name(logger.getEffectiveLevel())}\n" for name, logger in sorted(loggers.items())]
    return _text("active loggers:\n" + "".join(lines))


# path -> (handler, mutates, help): Envoy's paths and help texts where Envoy has them
ENDPOINTS: dict[str, tuple[Handler, bool, str]] = {
    "/": (home, False, "Admin home page: a live view of listeners, chains and connections"),
    "/help": (help_, False, "print out list of admin commands"),
    "/ready": (ready, False, "print server state, return 200 if LIVE, otherwise return 503"),
    "/server_info": (server_info, False, "print server version/status information"),
    "/config_dump": (config_dump, False, "dump current configuration"),
    "/listeners": (listeners, False, "print listener info (?format=json)"),
    "/clusters": (clusters, False, "upstream cluster status (?format=json)"),
    "/stats": (stats, False, "print server stats (?filter=REGEX, ?usedonly, ?format=json|prometheus)"),
    "/stats/prometheus": (stats_prometheus, False, "print server stats in prometheus format"),
    "/connections": (connections, False, "live connections as JSON (?limit=N)"),
    "/healthcheck/fail": (healthcheck_fail, True, "cause the server to fail health checks"),
    "/healthcheck/ok": (healthcheck_ok, True, "cause the server to pass health checks"),
    "/drain_listeners": (drain_listeners, True, "drain listeners"),
    "/quitquitquit": (quitquitquit, True, "exit the server"),
    "/logging": (logging_, True, "query/change logging levels (?level=LEVEL, ?LOGGER=LEVEL)"),
}


def usage() -> str:
    return "admin commands are:\n" + "".join(f"  {path}: {h}\n" for path, (_, _, h) in ENDPOINTS.items())


def build_app(proxy: Lifecycle) -> web.Application:
    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            return await handler(request)
        except fmt.BadRequest as exc:
            return _text(f"{exc}\n", 400)
        except web.HTTPNotFound:
            return _text("invalid path. " + usage(), 404)

    hosts = guard.allowed_hosts(proxy.config.admin_address, proxy.config.admin_hosts)

    def route(handler: Handler, mutates: bool):
        async def serve(request: web.Request) -> web.Response:
            refused = guard.refusal(request.headers, mutates or request.method != "GET", hosts,
                                    request.transport.get_extra_info("sockname")[1] if request.transport else 0)
            if refused is not None:
                log.warning("admin: %s %s refused: %s", request.method, request.path, refused.removeprefix("403: "))
                return _text(refused + "\n", 403)
            if mutates and request.method != "POST":
                return _text(f"Method {request.method} not allowed, POST required.", 405)
            return await handler(request, proxy)
        return serve

    app = web.Application(middlewares=[errors], client_max_size=BODY_LIMIT)
    for path, (handler, mutates, _) in ENDPOINTS.items():
        app.router.add_route("*", path, route(handler, mutates))
    return app


# --- start and stop ----------------------------------------------------------------

class AdminServer:
    def __init__(self, runner: web.AppRunner, address: tuple[str, int]) -> None:
        self.runner = runner
        self.address = address  # as bound: the kernel's port if the configuration said 0

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_admin(proxy: Lifecycle) -> AdminServer:
    """Bind the admin API (first thing at start-up) or raise StartupError."""
    config = proxy.config
    address, port = config.admin_address, config.admin_port
    assert port is not None  # the run skeleton starts the admin API only when it has a port
    where = hostport(address, port)
    if not ipaddress.ip_address(address).is_loopback:
        if not config.admin_allow_remote:
            raise StartupError(f"admin: {address} is not a loopback address; the admin API is unauthenticated "
                               "and can stop the proxy: pass --admin-allow-remote (admin_allow_remote: true) "
                               "to serve it there anyway")
        log.warning("admin API on %s, beyond loopback: anyone who can reach it can read the "
                    "configuration and stop the proxy", where)
    try:
        sock = bind(address, port, False)
    except OSError as exc:
        raise StartupError(f"admin: cannot bind {address} port {port}: {exc.strerror}") from None
    # keepalive_timeout also bounds the wait for a new connection's first request:
    # a client that trickles its headers (slowloris) is closed after it
    runner = web.AppRunner(build_app(proxy), access_log=None, handle_signals=False, shutdown_timeout=2.0,
                           keepalive_timeout=REQUEST_TIMEOUT)
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    bound = sock.getsockname()[:2]
    log.info("admin API on %s", hostport(*bound))
    return AdminServer(runner, bound)
