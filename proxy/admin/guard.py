"""Who may talk to the admin API: the checks that keep a web page out. Pure.

The API has no authentication and can stop the proxy, so a browser must not
be turned into a client of it:

- DNS rebinding: a page on a name the attacker controls, re-pointed at
  127.0.0.1, talks to the API as "its own" origin, but its requests carry
  that name in Host. Every request must name the API itself in Host: its
  address, or localhost, or a name the configuration allows
  (`admin_hosts`).
- Cross-site requests: any page can make a browser POST a form to
  http://127.0.0.1:15000/quitquitquit (no CORS preflight for a form). The
  browser says where such a request comes from: Origin (on every POST) and
  Sec-Fetch-Site. A request that changes something must come from the API's
  own origin, or from no page at all (curl, pilot-agent, the kubelet: no
  Origin, or Sec-Fetch-Site "none").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def allowed_hosts(address: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The host names (without port) a request may carry in Host."""
    return frozenset({address.lower(), *LOCAL_NAMES, *(name.lower() for name in extra)})


def host_of(value: str) -> str:
    """The host part of a Host header or an origin's netloc: 'Example.com:80' -> 'example.com'."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:15000
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def refusal(headers: Mapping[str, str], mutates: bool, hosts: frozenset[str], port: int) -> str | None:
    """Why a request must be refused (the 403's line), or None."""
    host = headers.get("Host")
    if host is None or host_of(host) not in hosts:
        return f"403: Host {host!r} is not this admin API (allowed: {', '.join(sorted(hosts))}; see admin_hosts)"
    if not mutates:
        return None
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site.lower() not in ("same-origin", "none"):
        return f"403: a {site} request from a web page may not change the proxy"
    origin = headers.get("Origin")
    if origin is not None:
        parts = urlsplit(origin) if origin != "null" else None
        if parts is None or parts.scheme != "http" or (parts.hostname or "") not in hosts \
                or (parts.port or 80) != port:
            return f"403: a request from the page at {origin} may not change the proxy"
    return None
