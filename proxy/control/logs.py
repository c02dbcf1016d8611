"""The process's logs: their two formats, and changing levels while running.

Every line goes to stderr, one line per record, as text or JSON. A worker of
a multi-process proxy (supervisor.py) tags its lines with its index, since the
workers share the supervisor's stderr. Levels use Envoy's names on the admin
API (`/logging?level=debug`); `apply_levels` is what that endpoint, and a
worker told about it by its supervisor, does.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence

from .envoylog import SpdlogFormatter

# Envoy's log level names -> Python's (`off` is above every level we log at)
LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL, "off": logging.CRITICAL + 10}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a traceback, if any, stays inside its line."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def setup(fmt: str, level: str, worker: int | None = None, pattern: str | None = None,
          levels: Sequence[tuple[str, str]] = ()) -> None:
    """Log to stderr in `fmt` (text or json) from `level` up; `worker`: a worker's index;
    `pattern`: an spdlog pattern instead (Envoy's --log-format, envoylog.py);
    `levels`: (logger, level) for single loggers."""
    handler = logging.StreamHandler(sys.stderr)
    if pattern is not None:
        handler.setFormatter(SpdlogFormatter(pattern))
    elif fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        tag = "" if worker is None else f" worker={worker}"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"))
        logging.Formatter.converter = time.gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    apply_levels([(name, LEVELS[value]) for name, value in levels])


def our_loggers() -> dict[str, logging.Logger]:
    found = {name: logger for name, logger in logging.root.manager.loggerDict.items()
             if isinstance(logger, logging.Logger) and name.split(".")[0] == "proxy"}
    return {"proxy": logging.getLogger("proxy"), **found}


def apply_levels(changes: list[tuple[str, int]]) -> None:
    """("level", n) sets every logger, as Envoy's ?level= does; (name, n) one of ours."""
    loggers = our_loggers()
    for name, level in changes:
        if name == "level":
            logging.getLogger().setLevel(level)
            for logger in loggers.values():
                logger.setLevel(logging.NOTSET)
        else:
            logging.getLogger(name).setLevel(level)


def level_name(level: int) -> str:
    return next((name for name, value in LEVELS.items() if value == level and name != "trace"), "off")
