"""The admin API's guard against web pages: Host (DNS rebinding) and cross-site requests."""

from __future__ import annotations

import pytest

from proxy.admin.guard import allowed_hosts, host_of, refusal

HOSTS = allowed_hosts("127.0.0.1", ["sidecar.local"])


@pytest.mark.parametrize("header, host", [("127.0.0.1:15000", "127.0.0.1"), ("LOCALHOST", "localhost"),
                                          ("[::1]:15000", "::1"), ("::1", "::1"), ("Sidecar.Local:80", "sidecar.local")])
def test_host_of(header, host):
    assert host_of(header) == host


@pytest.mark.parametrize("headers", [
    {"Host": "127.0.0.1:15000"}, {"Host": "localhost:15000"}, {"Host": "[::1]:15000"},
    {"Host": "sidecar.local:15000"},
    # tools and probes send no Origin; a browser typing the URL says none
    {"Host": "127.0.0.1:15000", "Sec-Fetch-Site": "none"},
    # the live page itself
    {"Host": "127.0.0.1:15000", "Origin": "http://127.0.0.1:15000", "Sec-Fetch-Site": "same-origin"},
    {"Host": "localhost:15000", "Origin": "http://localhost:15000"},
])
def test_the_api_itself_and_tools_pass(headers):
    assert refusal(headers, mutates=True, hosts=HOSTS, port=15000) is None


@pytest.mark.parametrize("headers, why", [
    ({"Host": "evil.example:15000"}, "Host 'evil.example:15000' is not this admin API"),  # DNS rebinding
    ({}, "Host None"),
    ({"Host": "127.0.0.1:15000", "Origin": "http://evil.example"}, "page at http://evil.example"),
    ({"Host": "127.0.0.1:15000", "Origin": "http://127.0.0.1:8081"}, "page at http://127.0.0.1:8081"),  # same site
    ({"Host": "127.0.0.1:15000", "Origin": "null"}, "page at null"),  # a sandboxed or file page
    ({"Host": "127.0.0.1:15000", "Sec-Fetch-Site": "cross-site"}, "a cross-site request"),
    ({"Host": "127.0.0.1:15000", "Sec-Fetch-Site": "same-site"}, "a same-site request"),
])
def test_rebinding_and_cross_site_changes_are_refused(headers, why):
    line = refusal(headers, mutates=True, hosts=HOSTS, port=15000)
    assert line is not None and line.startswith("403: ") and why in line and "\n" not in line


def test_a_cross_site_read_is_left_to_the_browser_but_a_foreign_host_is_not():
    # a cross-origin GET cannot read the answer (no CORS headers), and changes nothing
    assert refusal({"Host": "127.0.0.1:15000", "Origin": "http://evil.example"}, False, HOSTS, 15000) is None
    assert refusal({"Host": "evil.example"}, False, HOSTS, 15000) is not None
