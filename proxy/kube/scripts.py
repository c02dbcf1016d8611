"""Where the init step's scripts (iptables/) are, for the tools that run them."""

from __future__ import annotations

import sys
from pathlib import Path


class ScriptsMissing(Exception):
    """The iptables/ scripts are neither beside the package nor installed."""


def scripts_dir() -> Path:
    """The iptables/ scripts: beside the package in a checkout, else installed
    with it (pyproject's data-files: share/sidecar-proxy/iptables)."""
    for candidate in (Path(__file__).resolve().parents[2] / "iptables",
                      Path(sys.prefix) / "share" / "sidecar-proxy" / "iptables"):
        if (candidate / "redirect.sh").is_file():
            return candidate
    raise ScriptsMissing("cannot find the iptables/ scripts (redirect.sh, validate.sh)")
