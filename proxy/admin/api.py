"""The admin HTTP API, shaped like Envoy's: same paths, methods and formats.

It runs in the proxy's own event loop (aiohttp) and costs the data path
nothing between requests: the data path only bumps counters (stats.py); this
module reads them, and the live connections, when a request asks, and hands
the rendering to pure functions: `statsfmt` (stats, listeners, clusters),
`configdump` (+ `fieldmask`, `asbootstrap`), `envoyinfo` (server info,
runtime, memory) and `loggers` (/logging). Each answer carries Envoy 1.40's
Content-Type and headers (checked side by side with Envoy in tests/envoy).

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

from aiohttp import HttpVersion11, web

from ..config import ORIGINAL_DST, Config, hostport
from ..control import logs
from ..control.lifecycle import Lifecycle, StartupError, State
from ..control.sockets import bind
from ..datapath.snapshot import Snapshot
from ..datapath.stats import is_gauge
from . import configdump, envoyinfo, guard, loggers
from . import statsfmt as fmt

log = logging.getLogger("proxy.admin")

Handler = Callable[[web.Request, Lifecycle], Awaitable[web.Response]]

REQUEST_TIMEOUT = 10.0  # seconds a connection may take to send a whole request (and idle between them)
BODY_LIMIT = 64 * 1024  # no endpoint reads a body; a big one is refused
CONNECTIONS_LIMIT = 1000  # /connections lists at most this many unless ?limit= says otherwise

# Envoy's content types, and the headers it sends with every answer
TEXT = "text/plain; charset=UTF-8"
JSON = "application/json"
HTML = "text/html; charset=UTF-8"
HEADERS = {"Cache-Control": "no-cache, max-age=0", "X-Content-Type-Options": "nosniff"}
UINT32_MAX = 0xFFFFFFFF  # a circuit breaker our YAML leaves open, as Envoy writes "no limit"


class AdminState:
    """What the admin API itself remembers between requests: the counters' values at the last
    /reset_counters (each shows its change since), and the level of each of Envoy's loggers."""

    def __init__(self, config: Config) -> None:
        self.reset_at: dict[str, int] = {}
        options = config.command_line or {}
        self.envoy_levels = loggers.initial_levels(options.get("log_level", config.log_level),
                                                   options.get("component_log_level", ""))
        self.node = envoyinfo.node(config.envoy_node)


STATE = web.AppKey("state", AdminState)


# --- what the endpoints read ----------------------------------------------------

def collect_stats(proxy: Lifecycle, snap: Snapshot, reset_at: dict[str, int] | None = None) -> list[fmt.Stat]:
    """Every stat: the counters, plus the bytes of live connections, plus the server's state;
    a counter counts from its value at the last /reset_counters (`reset_at`)."""
    out = _collect_stats(proxy, snap)
    if reset_at:
        out = [s if s.gauge else s._replace(value=s.value - reset_at.get(s.name, 0)) for s in out]
    return out


def _collect_stats(proxy: Lifecycle, snap: Snapshot) -> list[fmt.Stat]:
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
    return out + _membership(proxy.config, snap)


def _membership(config: Config, snap: Snapshot) -> list[fmt.Stat]:
    """Envoy's membership stats of each cluster: a STATIC one's endpoints (set once, a change
    if there are any), an ORIGINAL_DST one's destinations listed now (its membership_change
    is counted as they come and go: datapath/upstream.py). Every host is healthy, none
    degraded, excluded or weighted, as in an Envoy without health checks."""
    out = []
    for name, kind, endpoints in [*((c.name, c.kind, len(c.endpoints)) for c in config.clusters),
                                  (ORIGINAL_DST, "original_dst", 0)]:
        prefix = f"cluster.{name}."
        members = len(snap.hosts.get(name, ())) if kind == "original_dst" else endpoints
        if kind != "original_dst":
            out.append(fmt.Stat(prefix + "membership_change", int(members > 0), used=members > 0))
        out += [fmt.Stat(prefix + stat, value, gauge=True, used=value != 0) for stat, value in (
            ("max_host_weight", 0), ("membership_degraded", 0), ("membership_excluded", 0),
            ("membership_healthy", members), ("membership_total", members))]
    return out


def cluster_views(config: Config, snap: Snapshot) -> list[fmt.ClusterView]:
    """Configured clusters with their endpoints and circuit breakers, named as the bootstrap
    names them; the proxy's own original_dst (when a chain forwards to the original
    destination) with the destinations it has open."""
    hosts = snap.hosts
    envoy = _bootstrap_clusters(config)
    views = []
    for c in config.clusters:
        data = envoy.get(c.name)
        open_hosts = hosts.get(c.name, {})
        endpoints = tuple(fmt.HostView(e.host, e.port, open_hosts.get((e.host, e.port), {})) for e in c.endpoints)
        name = data.get("name", c.name) if data else c.name
        if c.kind == "original_dst":  # Envoy lists the destinations an ORIGINAL_DST cluster holds
            endpoints = _original_hosts(name, open_hosts)
        views.append(fmt.ClusterView(name, endpoints,
                                     _thresholds(data, c.max_connections), c.name))
    if _forwards_to_original(config):
        views.append(fmt.ClusterView(ORIGINAL_DST, _original_hosts(ORIGINAL_DST, hosts.get(ORIGINAL_DST, {})),
                                     _thresholds(None, None)))
    return sorted(views, key=lambda v: v.name)


def _original_hosts(cluster: str, hosts: dict[tuple[str, int], dict[str, int]]) -> tuple[fmt.HostView, ...]:
    """An ORIGINAL_DST cluster's destinations, each named as Envoy names it: cluster name, then address."""
    return tuple(fmt.HostView(h, p, stats, f"{cluster}{hostport(h, p)}") for (h, p), stats in sorted(hosts.items()))


def _bootstrap_clusters(config: Config) -> dict[str, dict]:
    """The bootstrap's clusters by the model's name for them (config/envoy: same order)."""
    if config.bootstrap is None:
        return {}
    listed = config.bootstrap.get("static_resources", {}).get("clusters", [])
    return {model.name: data for model, data in zip(config.clusters, listed, strict=False)}


def _thresholds(data: dict | None, max_connections: int | None) -> tuple[fmt.Threshold, ...]:
    """Envoy's two priorities: the first threshold of each in the bootstrap, Envoy's defaults
    for what it leaves out; our YAML has only max_connections (none: no limit)."""
    out = []
    for default in fmt.ENVOY_THRESHOLDS:
        values = default._asdict()
        if data is None:
            if default.priority == "default":
                values["max_connections"] = UINT32_MAX if max_connections is None else max_connections
        else:
            given: dict = next((t for t in data.get("circuit_breakers", {}).get("thresholds", [])
                          if t.get("priority", "DEFAULT").lower() == default.priority), {})
            values.update({k: int(v) for k, v in given.items() if k in fmt.THRESHOLD_FIELDS})
        out.append(fmt.Threshold(**values))
    return tuple(out)


def _forwards_to_original(config: Config) -> bool:
    return any(chain.action == "original" for listener in config.listeners
               for chain in (*listener.chains, *((listener.default_chain,) if listener.default_chain else ())))


# --- endpoints -------------------------------------------------------------------

def _reply(body: str, content_type: str, status: int = 200) -> web.Response:
    """An answer with Envoy's exact Content-Type and its other headers."""
    return web.Response(body=body.encode(), status=status, headers={"Content-Type": content_type, **HEADERS})


def _text(body: str, status: int = 200) -> web.Response:
    return _reply(body, TEXT, status)


def _json(body: str | dict, status: int = 200) -> web.Response:
    return _reply(body if isinstance(body, str) else json.dumps(body, indent=1), JSON, status)


def _state(request: web.Request) -> AdminState:
    return request.app[STATE]


@functools.cache
def _page() -> str:
    return resources.files(__package__).joinpath("admin.html").read_text(encoding="utf-8")


async def home(request: web.Request, proxy: Lifecycle) -> web.Response:
    return _reply(_page(), HTML)


async def help_(request: web.Request, proxy: Lifecycle) -> web.Response:
    return _text(usage())


async def ready(request: web.Request, proxy: Lifecycle) -> web.Response:
    state = proxy.state
    return _text(f"{state.name}\n", 200 if state == State.LIVE else 503)


async def server_info(request: web.Request, proxy: Lifecycle) -> web.Response:
    node = configdump.plain("envoy.config.core.v3.Node", _state(request).node, always_print=True)
    info = envoyinfo.server_info(proxy.config, proxy.state.name, int(time.monotonic() - proxy.started_mono), node)
    return _json(info)


async def config_dump(request: web.Request, proxy: Lifecycle) -> web.Response:
    bootstrap = configdump.bootstrap_data(proxy.config, _state(request).node)
    reply = configdump.render(bootstrap, proxy.started_wall, request.query)
    return _reply(reply.body, reply.content_type, reply.status)


async def certs(request: web.Request, proxy: Lifecycle) -> web.Response:
    return _json({"certificates": []})


async def runtime(request: web.Request, proxy: Lifecycle) -> web.Response:
    return _json(envoyinfo.runtime(proxy.config.bootstrap))


async def memory(request: web.Request, proxy: Lifecycle) -> web.Response:
    return _json(envoyinfo.memory())


async def init_dump(request: web.Request, proxy: Lifecycle) -> web.Response:
    return _json({})  # static listeners and clusters: nothing waits to be initialised, as in Envoy


async def hot_restart_version(request: web.Request, proxy: Lifecycle) -> web.Response:
    return _text(envoyinfo.HOT_RESTART_VERSION)


async def reset_counters(request: web.Request, proxy: Lifecycle) -> web.Response:
    """Every counter counts from zero again (gauges and /clusters' per-host figures do not, as in Envoy)."""
    snap = await proxy.snapshot(0)
    _state(request).reset_at = {s.name: s.value for s in collect_stats(proxy, snap) if not s.gauge}
    log.info("admin: counters reset")
    return _text("OK\n")


async def listeners(request: web.Request, proxy: Lifecycle) -> web.Response:
    views = [fmt.ListenerView(name, tuple(addresses)) for name, addresses in proxy.listeners.items()]
    if fmt.format_param(request.query, fmt.LISTING_FORMATS) == "json":
        return _json(fmt.render_listeners_json(views))
    return _text(fmt.render_listeners_text(views))


async def clusters(request: web.Request, proxy: Lifecycle) -> web.Response:
    views = cluster_views(proxy.config, await proxy.snapshot(0))
    if fmt.format_param(request.query, fmt.LISTING_FORMATS) == "json":
        return _json(fmt.render_clusters_json(views))
    return _text(fmt.render_clusters_text(views))


async def stats(request: web.Request, proxy: Lifecycle, default_format: str = "text") -> web.Response:
    query = request.query
    chosen = fmt.format_param({"format": query.get("format", default_format)}, fmt.STATS_FORMATS)
    pattern = query.get("filter")
    fmt.compile_filter(pattern)  # a bad pattern is a 400 before any work
    selected = fmt.select(collect_stats(proxy, await proxy.snapshot(0), _state(request).reset_at),
                          pattern=pattern, used_only="usedonly" in query)
    if chosen == "json":
        return _json(fmt.render_json(selected))
    if chosen == "prometheus":
        return _text(fmt.render_prometheus(selected))
    return _text(fmt.render_text(selected))


async def stats_prometheus(request: web.Request, proxy: Lifecycle) -> web.Response:
    return await stats(request, proxy, "prometheus")


async def connections(request: web.Request, proxy: Lifecycle) -> web.Response:
    raw = request.query.get("limit", str(CONNECTIONS_LIMIT))
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9):
        raise fmt.BadRequest(f"limit {raw[:20]!r} is not a number up to 999999999")
    snap = await proxy.snapshot(int(raw))
    return _json({"total": snap.total_connections, "connections": snap.connections})


async def effective_config(request: web.Request, proxy: Lifecycle) -> web.Response:
    """The proxy's own model of its configuration, as `sidecar-proxy check` prints it
    (load.from_data reads it back): what `explain --admin` reads. /config_dump says the
    same in Envoy's terms, which have no field for some of it (a chain's direction,
    the inbound mode and source, the bypass cgroup)."""
    return _json(proxy.config.to_dict())


async def healthcheck_fail(request: web.Request, proxy: Lifecycle) -> web.Response:
    proxy.health_check_failed = True
    log.info("admin: health check failed by request: /ready answers 503")
    return _text("OK\n")


async def healthcheck_ok(request: web.Request, proxy: Lifecycle) -> web.Response:
    proxy.health_check_failed = False
    log.info("admin: health check ok again")
    return _text("OK\n")


async def drain_listeners(request: web.Request, proxy: Lifecycle) -> web.Response:
    """Envoy's: the listeners stop (`inboundonly`: those of inbound only; `graceful`: once
    drain_time is over; `skip_exit`: never); control/server.py. pilot-agent sends
    `?inboundonly&graceful` and does not read the answer."""
    inbound_only, graceful = "inboundonly" in request.query, "graceful" in request.query
    skip_exit = "skip_exit" in request.query
    log.info("admin: /drain_listeners%s%s%s", " inboundonly" if inbound_only else "", " graceful" if graceful else "",
             " skip_exit" if skip_exit else "")
    proxy.drain_listeners(inbound_only=inbound_only, graceful=graceful, skip_exit=skip_exit)
    return _text("OK\n")


async def quitquitquit(request: web.Request, proxy: Lifecycle) -> web.Response:
    log.info("admin: /quitquitquit")
    proxy.stop()
    return _text("OK\n")


async def logging_(request: web.Request, proxy: Lifecycle) -> web.Response:
    """Envoy's /logging (loggers.py): Envoy's logger names, and ours."""
    state, ours = _state(request), logs.our_loggers()
    error = ""
    try:
        everything, named = loggers.requested(request.query.items(), ours)
    except loggers.LoggingError as exc:
        error = f"error: {exc}\n\n{loggers.USAGE}"
    else:
        changes: list[tuple[str, int]] = []
        if everything is not None:
            state.envoy_levels = dict.fromkeys(state.envoy_levels, everything)
            changes.append(("level", logs.LEVELS[everything]))
        elif named:
            state.envoy_levels.update({n: lv for n, lv in named.items() if n in state.envoy_levels})
            changes += [(n, logs.LEVELS[lv]) for n, lv in loggers.ours_from(
                {n: lv for n, lv in state.envoy_levels.items() if n in named})]
            changes += [(n, logs.LEVELS[lv]) for n, lv in named.items() if n in ours]
        if changes:
            logs.apply_levels(changes)
            await proxy.log_levels_changed(changes)
    levels = {name: logs.level_name(logger.getEffectiveLevel()) for name, logger in ours.items()}
    return _text(error + loggers.listing(state.envoy_levels, levels), 400 if error else 200)


# path -> (handler, mutates, help): Envoy's paths and help texts where Envoy has them
ENDPOINTS: dict[str, tuple[Handler, bool, str]] = {
    "/": (home, False, "Admin home page: a live view of listeners, chains and connections"),
    "/certs": (certs, False, "print certs on machine"),
    "/clusters": (clusters, False, "upstream cluster status (?format=json)"),
    "/config_dump": (config_dump, False, "dump current Envoy configs (?resource=, ?mask=, ?name_regex=, "
                                         "?include_eds)"),
    "/connections": (connections, False, "live connections as JSON (?limit=N)"),
    "/drain_listeners": (drain_listeners, True, "drain listeners"),
    "/effective_config": (effective_config, False, "the proxy's own configuration as `sidecar-proxy check` "
                                                   "prints it (JSON)"),
    "/healthcheck/fail": (healthcheck_fail, True, "cause the server to fail health checks"),
    "/healthcheck/ok": (healthcheck_ok, True, "cause the server to pass health checks"),
    "/help": (help_, False, "print out list of admin commands"),
    "/hot_restart_version": (hot_restart_version, False, "print the hot restart compatibility version"),
    "/init_dump": (init_dump, False, "dump current Envoy init manager information (experimental)"),
    "/listeners": (listeners, False, "print listener info (?format=json)"),
    "/logging": (logging_, True, "query/change logging levels (?level=, ?paths=NAME:LEVEL,..., ?NAME=LEVEL)"),
    "/memory": (memory, False, "print current allocation/heap usage"),
    "/quitquitquit": (quitquitquit, True, "exit the server"),
    "/ready": (ready, False, "print server state, return 200 if LIVE, otherwise return 503"),
    "/reset_counters": (reset_counters, True, "reset all counters to zero"),
    "/runtime": (runtime, False, "print runtime values"),
    "/server_info": (server_info, False, "print server version/status information"),
    "/stats": (stats, False, "print server stats (?filter=REGEX, ?usedonly, ?format=json|prometheus)"),
    "/stats/prometheus": (stats_prometheus, False, "print server stats in prometheus format"),
}


def usage() -> str:
    """Envoy's list: each path, `(POST)` where it changes something, and what it does."""
    return "admin commands are:\n" + "".join(f"  {path}{' (POST)' if mutates else ''}: {h}\n"
                                             for path, (_, mutates, h) in ENDPOINTS.items())


def build_app(proxy: Lifecycle) -> web.Application:
    @web.middleware
    async def errors(request: web.Request, handler):
        if request.version < HttpVersion11:  # Envoy's admin takes HTTP/1.1 (and 2) only, whatever the path
            response = web.Response(body=b"Upgrade Required", status=426, headers={"Content-Type": "text/plain"})
            response.force_close()
            return response
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
    app[STATE] = AdminState(proxy.config)
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
