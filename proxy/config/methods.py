"""The four bypass methods: how the proxy's own upstream connections escape the redirect.

One table for every tool that sets a pod up (the demo, `inject`): what the
proxy needs beyond its UID, and which of the design note's variables the
init step and the proxy must agree on. The rules themselves are the other
half, in iptables/method/*.sh (one file per method, the same names).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    escape: str  # how the proxy's own connections escape the redirect
    proxy_capabilities: tuple[str, ...]  # Linux capabilities the proxy needs (none but for SO_MARK)
    variables: tuple[str, ...]  # the design note's variables both containers carry


METHODS = {m.name: m for m in (
    Method("uid", "the proxy's UID (-m owner --uid-owner)", (), ("ISTIO_PROXY_UID",)),
    Method("mark", "the proxy's SO_MARK (-m mark --mark)", ("NET_ADMIN",), ("ISTIO_SO_MARK",)),
    # ISTIO_PROXY_UID: the init step hands the cgroup to that UID
    Method("cgroup", "the proxy's net_cls cgroup (-m cgroup)", (), ("ISTIO_PROXY_UID", "ISTIO_NET_CLS_ID")),
    Method("explicit", "nothing to escape: only the listed services are captured", (), ()),
)}
