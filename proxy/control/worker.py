"""One worker of a supervisor (`python -m proxy worker --control FD`, see supervisor.py).

It reads its start message (the effective configuration, its index among
the workers, its listening sockets) before its event loop runs, then serves
those sockets as a whole proxy (server.Proxy) without an admin API, and
answers its supervisor over the control channel (channel.py). When the
supervisor is gone, the channel closes and the worker drains and exits: no
worker outlives its proxy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import socket
import sys
from collections.abc import Callable

from ..config import Config, ConfigError, from_data
from ..exitcodes import EXIT_OK
from . import logs
from .channel import Channel, read_first
from .server import Proxy
from .sockets import Bound

REPLACEMENT_IDS = 10**9  # connection ids each generation of a worker may use


class BadStart(Exception):
    """`proxy worker` was not started by a supervisor as it should be; str() says how."""


def share_of_limits(config: Config, index: int, count: int) -> Config:
    """Worker `index` of `count`'s share of every connection limit (datapath/limits.py):
    the shares add up to the limit, so the workers together never pass it."""
    def share(limit: int | None) -> int | None:
        return None if limit is None else limit // count + (index < limit % count)

    return dataclasses.replace(
        config, max_connections=share(config.max_connections),
        listeners=tuple(dataclasses.replace(spec, max_connections=share(spec.max_connections))
                        for spec in config.listeners))


def run_worker(control_fd: int, runner_for: Callable[[str], asyncio.Runner]) -> int:
    """Serve the sockets the supervisor hands over, until told to stop or orphaned."""
    try:
        control = socket.socket(fileno=control_fd)
        start, pending = read_first(control)
        config = dataclasses.replace(from_data(start["config"]), admin_port=None, concurrency=1)
        index, count, generation = int(start["index"]), int(start["count"]), int(start.get("generation", 0))
        config = share_of_limits(config, index, count)
        sockets = [Bound(int(listener), socket.socket(fileno=fd)) for listener, fd in start["listeners"]]
    except OSError as exc:
        raise BadStart(f"--control {control_fd}: {exc.strerror} (workers are started by the proxy itself, "
                       "see --concurrency)") from None
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise BadStart(f"--control {control_fd}: not a start message from a proxy ({exc})") from None
    logs.setup(config.log_format, config.log_level, worker=index, pattern=config.log_pattern,
               levels=config.logger_levels)
    for bound in sockets:
        bound.sock.setblocking(False)
    # a replacement's ids go on far above those of the workers before it
    first_id = index + 1 + count * generation * REPLACEMENT_IDS
    proxy = Proxy(config, argv=sys.argv, sockets=sockets, conn_ids=itertools.count(first_id, count))

    async def serve() -> None:
        def heard(message: dict) -> None:
            op = message.get("op")
            if op == "ping":  # the watchdog (supervisor.py); the answer carries our counters
                channel.answer(message, proxy.counters())
            elif op == "snapshot":
                channel.answer(message, proxy.take(message["limit"]).to_json())
            elif op == "drain":
                proxy.drain_listeners(bool(message.get("inbound_only")), bool(message.get("graceful")),
                                      bool(message.get("skip_exit")))
            elif op == "stop":
                proxy.stop()
            elif op == "terminate":
                proxy.terminate()
            elif op == "log":
                logs.apply_levels([tuple(change) for change in message["changes"]])

        channel = Channel(heard, proxy.stop, pending)  # the supervisor gone: stop
        await asyncio.get_running_loop().create_unix_connection(lambda: channel, sock=control)
        try:
            await proxy.run(on_ready=lambda: channel.send({"event": "ready"}))
        finally:
            channel.close()

    with runner_for(config.loop) as runner:
        runner.run(serve())
    return EXIT_OK
