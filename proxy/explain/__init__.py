"""`sidecar-proxy explain`: what happens to one connection, without making it.

A tool, like proxy/kube: the running proxy never imports it. It reads the
installed rules of this network namespace and walks a connection's first
packet through them (walk.py, with the semantics of the matches our scripts
write), then tells what the proxy would do with it (decision.py, with the
data path's own chain selection), and whether the proxy's own upstream
connection would come back to it (report.py).

    rules.py     iptables-save text / nft JSON -> one model of rules
    walk.py      the packet through the chains: every rule hit, the verdict
    decision.py  the proxy's decision from its configuration
    report.py    both, the loop check and the warnings (pure)
    gather.py    what is read from the machine (rules, routes, the proxy)
    render.py    text or JSON
    command.py   the command line
"""

from .command import add_parser

__all__ = ["add_parser"]
