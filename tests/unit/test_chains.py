"""Chain selection: Envoy's precedence, checked case by case and against a reference."""

from __future__ import annotations

import ipaddress
import itertools
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import Chain, ConfigError, Match, check_ambiguous
from proxy.datapath.chains import LOOKUP_MEMORY, NO_MATCH, ChainTable, Connection, select, specificity

ip = ipaddress.ip_address
net = ipaddress.ip_network


def chain(name, ports=(), dst=(), src=(), direction="any", sports=(), direct=(), stype="any", transport=""):
    return Chain(name=name, match=Match(tuple(ports), tuple(map(net, dst)), tuple(map(net, src)), direction,
                                        tuple(sports), tuple(map(net, direct)), stype, transport))


def conn(dst="198.51.100.10", port=80, src="192.0.2.1", direction="outbound", sport=40000):
    local = src == dst or src.startswith("127.") or src == "::1"
    return Connection(ip(dst), port, ip(src), direction, sport, local)


def pick(chains, c):
    found = ChainTable(chains).select(c)
    assert found == select(chains, c)  # the indexed and the plain path agree
    return found.name if found else None


def test_exact_port_beats_any_port():
    chains = [chain("any"), chain("http", ports=[80])]
    assert pick(chains, conn(port=80)) == "http"
    assert pick(chains, conn(port=443)) == "any"


def test_longest_destination_prefix_wins():
    chains = [chain("wide", dst=["198.51.100.0/24"]), chain("narrow", dst=["198.51.100.0/28"]), chain("all")]
    assert pick(chains, conn(dst="198.51.100.10")) == "narrow"
    assert pick(chains, conn(dst="198.51.100.200")) == "wide"
    assert pick(chains, conn(dst="203.0.113.1")) == "all"


def test_port_is_decided_before_prefix():
    # A port-specific chain with a wide prefix beats a port-less chain with a narrow one.
    chains = [chain("port", ports=[80], dst=["0.0.0.0/0"]), chain("prefix", dst=["198.51.100.10/32"])]
    assert pick(chains, conn(port=80)) == "port"
    assert pick(chains, conn(port=81)) == "prefix"


def test_no_backtracking_after_port_step():
    # Envoy prunes: the port-80 chain wins step 1, fails step 2, and the
    # port-less chain is no longer a candidate. The default action applies.
    chains = [chain("port80-elsewhere", ports=[80], dst=["203.0.113.0/24"]), chain("catch-all")]
    assert pick(chains, conn(port=80, dst="198.51.100.10")) is None
    assert pick(chains, conn(port=81, dst="198.51.100.10")) == "catch-all"


def test_source_prefix_after_destination():
    chains = [chain("from-a", src=["192.0.2.0/25"]), chain("from-any")]
    assert pick(chains, conn(src="192.0.2.1")) == "from-a"
    assert pick(chains, conn(src="192.0.2.200")) == "from-any"


def test_direction_is_last():
    chains = [chain("in", direction="inbound"), chain("any")]
    assert pick(chains, conn(direction="inbound")) == "in"
    assert pick(chains, conn(direction="outbound")) == "any"
    assert pick([chain("in", direction="inbound")], conn(direction="outbound")) is None


def test_ipv6_and_ipv4_do_not_mix():
    chains = [chain("v6", dst=["2001:db8::/32"]), chain("v4", dst=["0.0.0.0/0"])]
    assert pick(chains, conn(dst="2001:db8::1")) == "v6"
    assert pick(chains, conn(dst="198.51.100.1")) == "v4"
    assert pick([chain("v4", dst=["0.0.0.0/0"])], conn(dst="2001:db8::1")) is None


def test_empty_table_matches_nothing():
    assert pick([], conn()) is None


def test_specificity_scores():
    c = chain("x", ports=[80], dst=["198.51.100.0/24"])
    assert specificity(c, conn()) == (1, 25, 0, 0, 0, 0, 0, 0)
    assert specificity(c, conn(port=81))[0] == NO_MATCH


def test_a_source_port_is_tried_before_any_source_port():
    chains = [chain("any-port", src=["192.0.2.0/24"]), chain("one-port", src=["192.0.2.0/24"], sports=[40000])]
    assert pick(chains, conn(sport=40000)) == "one-port"
    assert pick(chains, conn(sport=40001)) == "any-port"  # Envoy falls back to port 0 within the source leaf


def test_source_type_local_or_external_beats_any_without_falling_back():
    chains = [chain("any"), chain("local", stype="local")]
    assert pick(chains, conn(src="127.0.0.1")) == "local"
    assert pick(chains, conn(src="198.51.100.10", dst="198.51.100.10")) == "local"  # from the address it dialled
    assert pick(chains, conn(src="192.0.2.1")) == "any"
    # a local connection with only an "external" chain and "any": any
    assert pick([chain("any"), chain("ext", stype="external")], conn(src="127.0.0.1")) == "any"


def test_transport_protocol_raw_buffer_beats_any():
    assert pick([chain("any"), chain("raw", transport="raw_buffer")], conn()) == "raw"


def test_direct_source_comes_before_source_type_and_source():
    chains = [chain("by-source", src=["192.0.2.0/25"]), chain("by-direct", direct=["192.0.2.0/24"])]
    assert pick(chains, conn(src="192.0.2.1")) == "by-direct"


@pytest.mark.parametrize("a, b", [
    (dict(ports=[80]), dict(ports=[80])),
    (dict(ports=[80, 443]), dict(ports=[443])),
    (dict(dst=["198.51.100.0/24"]), dict(dst=["203.0.113.0/24", "198.51.100.0/24"])),
    (dict(), dict()),
    (dict(direction="inbound", src=["192.0.2.0/24"]), dict(direction="inbound", src=["192.0.2.0/24"])),
])
def test_identical_matches_are_ambiguous(a, b):
    with pytest.raises(ConfigError, match="same connections"):
        check_ambiguous((chain("a", **a), chain("b", **b)))


@pytest.mark.parametrize("a, b", [
    (dict(ports=[80]), dict(ports=[81])),
    (dict(dst=["198.51.100.0/24"]), dict(dst=["198.51.100.0/25"])),
    (dict(direction="inbound"), dict(direction="outbound")),
    (dict(), dict(direction="inbound")),
])
def test_different_matches_are_fine(a, b):
    check_ambiguous((chain("a", **a), chain("b", **b)))


# --- property: the table agrees with a brute-force reference -------------------------

def reference(chains, c):
    """Brute force: the lexicographically most specific chain, if it matches fully.

    Pruning criterion by criterion keeps, at each step, the chains with the best
    score at that step; that is exactly the lexicographic maximum of the score
    tuples, and the result matches only if none of its scores is NO_MATCH.
    """
    if not chains:
        return None
    best = max(chains, key=lambda ch: specificity(ch, c))
    return None if NO_MATCH in specificity(best, c) else best


PREFIXES = ["198.51.100.0/24", "198.51.100.0/26", "198.51.100.64/26", "198.51.100.8/29",
            "203.0.113.0/24", "0.0.0.0/0", "2001:db8::/32", "2001:db8:2::/48"]
SOURCES = ["192.0.2.0/24", "192.0.2.0/25", "2001:db8:1::/64"]
chain_spec = st.fixed_dictionaries({
    "ports": st.lists(st.sampled_from([80, 443, 8080]), max_size=2, unique=True),
    "dst": st.lists(st.sampled_from(PREFIXES), max_size=2, unique=True),
    "src": st.lists(st.sampled_from(SOURCES), max_size=1, unique=True),
    "direction": st.sampled_from(["any", "inbound", "outbound"]),
}, optional={
    "sports": st.lists(st.sampled_from([40000, 40001]), max_size=1, unique=True),
    "direct": st.lists(st.sampled_from(SOURCES), max_size=1, unique=True),
    "stype": st.sampled_from(["any", "local", "external"]),
    "transport": st.sampled_from(["", "raw_buffer"]),
})
conn_spec = st.builds(
    conn,
    dst=st.sampled_from(["198.51.100.10", "198.51.100.70", "203.0.113.9", "192.0.2.77", "2001:db8:2::5", "2001:db8:9::1"]),
    port=st.sampled_from([80, 443, 8080, 9999]),
    src=st.sampled_from(["192.0.2.1", "192.0.2.200", "2001:db8:1::1", "127.0.0.1", "198.51.100.10"]),
    direction=st.sampled_from(["inbound", "outbound"]),
    sport=st.sampled_from([40000, 40001, 40002]),
)


@settings(max_examples=400, deadline=None)
@given(specs=st.lists(chain_spec, max_size=6), c=conn_spec)
def test_table_agrees_with_reference(specs, c):
    chains = [chain(f"c{i}", **s) for i, s in enumerate(specs)]
    try:
        check_ambiguous(tuple(chains))
    except ConfigError:
        return  # such a config never loads
    table = ChainTable(chains)
    got = table.select(c)
    assert got == reference(chains, c)
    assert got == select(chains, c)
    for _ in range(2):  # the string form agrees, also when answered from memory
        assert table.lookup(str(c.dst), c.dst_port, str(c.src), c.direction, c.src_port) == got
    if got is not None:  # whatever wins really matches the connection
        assert NO_MATCH not in specificity(got, c)


def test_lookup_memory_is_bounded_and_stays_right():
    table = ChainTable([chain("web", ports=[80], dst=["198.51.100.0/24"]), chain("any-80", ports=[80])])
    for i in range(LOOKUP_MEMORY + 10):  # more distinct destinations than it remembers
        dst = str(ipaddress.ip_address("198.51.0.0") + i)
        want = "web" if dst.startswith("198.51.100.") else "any-80"
        assert table.lookup(dst, 80, "192.0.2.1", "outbound").name == want
    assert len(table._memory) <= LOOKUP_MEMORY
    assert table.lookup("198.51.100.10", 80, "192.0.2.1", "outbound").name == "web"
    assert table.lookup("198.51.100.10", 443, "192.0.2.1", "outbound") is None


# --- ambiguity: the indexed check agrees with the element-by-element definition -------

def ambiguous_pair(chains):
    """By definition: some tuple of one element per criterion is named by two
    chains (an empty list names the element None)."""
    owners = {}
    for i, ch in enumerate(chains):
        m = ch.match
        lists = (m.ports, m.destinations, m.sources, m.source_ports, m.direct_sources)
        for key in itertools.product(*(values or (None,) for values in lists)):
            owners.setdefault((*key, m.direction, m.source_type, m.transport_protocol), set()).add(i)
    return any(len(who) > 1 for who in owners.values())


@settings(max_examples=400, deadline=None)
@given(specs=st.lists(chain_spec, max_size=6))
def test_ambiguity_check_agrees_with_its_definition(specs):
    chains = tuple(chain(f"c{i}", **s) for i, s in enumerate(specs))
    try:
        check_ambiguous(chains)
    except ConfigError:
        assert ambiguous_pair(chains)
    else:
        assert not ambiguous_pair(chains)


def test_ambiguity_check_costs_the_lists_lengths_not_their_product():
    """Two chains of 2,000 ports x 2,000 destinations: 4 million element tuples
    each if multiplied out (gigabytes); checked in a process capped at 256 MB."""
    code = textwrap.dedent("""
        import ipaddress, resource
        resource.setrlimit(resource.RLIMIT_AS, (256 << 20, 256 << 20))
        from proxy.config import Chain, ConfigError, Match, check_ambiguous
        dsts = tuple(ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(2000))
        a = Chain("a", Match(ports=tuple(range(1, 2001)), destinations=dsts))
        b = Chain("b", Match(ports=tuple(range(3000, 5000)), destinations=dsts))
        check_ambiguous((a, b))
        try:
            check_ambiguous((a, b, Chain("c", Match(ports=(4999,), destinations=dsts[-1:]))))
        except ConfigError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert "chains[2].match: matches the same connections as chains[1] ('b')" in out.stdout
