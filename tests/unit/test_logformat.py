"""Envoy's access-log format strings for TCP: parsing, and what each operator renders."""

from __future__ import annotations

import pytest

from proxy.config import ENVOY_LOG_FORMAT, compile_format

ENTRY = {"id": 7, "start": 1796140800.123456, "source": "192.0.2.1:40122", "destination": "198.51.100.10:80",
         "chain": "web", "cluster": "web-v2", "upstream": "[2001:db8::30]:8080", "upstream_local": "[2001:db8::1]:51000",
         "bytes_up": 512, "bytes_down": 1048576, "duration_ms": 12.7, "end": "done"}


def render(fmt: str, **changes) -> str:
    return compile_format(fmt)({**ENTRY, **changes})


@pytest.mark.parametrize("fmt, want", [
    ("%START_TIME%", "2026-12-01T16:00:00.123Z"),
    ("%START_TIME(%s.%6f)%", "1796140800.123456"),
    ("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_REMOTE_PORT%",
     "192.0.2.1:40122 192.0.2.1 40122"),
    ("%DOWNSTREAM_LOCAL_ADDRESS%", "198.51.100.10:80"),
    ("%UPSTREAM_HOST% %UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "[2001:db8::30]:8080 2001:db8::30"),
    ("%UPSTREAM_LOCAL_ADDRESS% %UPSTREAM_CLUSTER%", "[2001:db8::1]:51000 web-v2"),
    ("%BYTES_RECEIVED% %BYTES_SENT% %DURATION%", "512 1048576 12"),
    ("%CONNECTION_ID% %FILTER_CHAIN_NAME%", "7 web"),
    ("%RESPONSE_FLAGS% %RESPONSE_CODE% %PROTOCOL% %REQ(:METHOD)%", "- 0 - -"),
    ("100%% %UPSTREAM_CLUSTER:3%", "100% web"),
])
def test_operators_render_as_envoy_writes_them_for_tcp(fmt, want):
    assert render(fmt) == want


@pytest.mark.parametrize("end, short, long", [
    ("connect_failed", "UF,URX", "UpstreamConnectionFailure,UpstreamRetryLimitExceeded"),
    ("connect_timeout", "UF,URX", "UpstreamConnectionFailure,UpstreamRetryLimitExceeded"),
    ("upstream_overflow", "UO", "UpstreamOverflow"),
    ("no_healthy_upstream", "UH", "NoHealthyUpstream"),
    ("no_route", "NC", "NoClusterFound"),
    ("done", "-", "-")])
def test_response_flags_say_how_it_ended(end, short, long):
    assert render("%RESPONSE_FLAGS% %RESPONSE_FLAGS_LONG%", end=end) == f"{short} {long}"


def test_a_connection_that_never_reached_an_upstream_shows_dashes():
    assert render("%UPSTREAM_HOST% %UPSTREAM_LOCAL_ADDRESS%", upstream=None, upstream_local=None) == "- -"


def test_envoys_default_format_renders_a_whole_line():
    line = render(ENVOY_LOG_FORMAT)
    assert line == ('[2026-12-01T16:00:00.123Z] "- - -" 0 - 512 1048576 12 - "-" "-" "-" "-" '
                    '"[2001:db8::30]:8080"\n')


@pytest.mark.parametrize("fmt", ["%NOT_AN_OPERATOR%", "%REQ%", "%BYTES_SENT(x)%"])
def test_an_unknown_operator_is_refused(fmt):
    with pytest.raises(ValueError, match="is not an operator of Envoy's TCP access log"):
        compile_format(fmt)
