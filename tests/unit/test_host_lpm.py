"""Host-derived fields without root: the LPM, the route table's rules, the AS file, isMulticast, the enricher."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyflow.enrich import Enricher, is_multicast_octet
from pyflow.errors import ConfigError
from pyflow.host.asn import AsTable
from pyflow.host.lpm import AddrKeys, PrefixTable
from pyflow.host.routes import (
    RT_TABLE_LOCAL,
    RTN_BLACKHOLE,
    RTN_BROADCAST,
    RTN_LOCAL,
    RTN_MULTICAST,
    Route,
    RouteTable,
    route_from_msg,
)
from pyflow.records import addr_from_16, addr_to_16, empty

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Addr = ipaddress.IPv4Address | ipaddress.IPv6Address


def addrs16(addrs: list[Addr]) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([addr_to_16(x) for x in addrs], dtype="V16").reshape(-1)
    return a, np.array([x.version for x in addrs], dtype=np.uint8)


def brute_force(nets: list[Net], addr: Addr) -> int:
    """Index of the longest network containing addr (first of equals), -1 for none."""
    best, best_len = -1, -1
    for i, n in enumerate(nets):
        if n.version == addr.version and addr in n and n.prefixlen > best_len:
            best, best_len = i, n.prefixlen
    return best


# -- strategies: prefixes that overlap, nest and share boundaries; addresses at and around them --------

def _network(version: int) -> st.SearchStrategy[Net]:
    bits = 32 if version == 4 else 128
    lens = st.one_of(st.sampled_from([0, bits, bits - 1, 1, 8, 16, 24] if version == 4 else
                                     [0, bits, bits - 1, 1, 32, 48, 64, 96]), st.integers(0, bits))
    # few distinct high bits so that prefixes nest and collide
    value = st.one_of(st.integers(0, 2**bits - 1),
                      st.tuples(st.integers(0, 3), st.integers(0, 2**(bits - 8) - 1)).map(
                          lambda t: (t[0] << (bits - 2)) | (t[1] & 0xFF)),
                      st.sampled_from([0, 2**bits - 1, 2**(bits - 1), 2**(bits - 1) - 1]))
    return st.tuples(value, lens).map(
        lambda t: ipaddress.ip_network((t[0] >> (bits - t[1]) << (bits - t[1]) if t[1] else 0, t[1])))


networks = st.lists(st.one_of(_network(4), _network(6)), max_size=40)


def _probes(nets: list[Net], extra: list[int], rnd: list[int]) -> list[Addr]:
    out: list[Addr] = []
    for n in nets:
        top = 2**n.max_prefixlen - 1
        first, last = int(n.network_address), int(n.broadcast_address)
        for v in (first, last, first - 1, last + 1, (first + last) // 2):
            if 0 <= v <= top:
                out.append(ipaddress.ip_address(v) if n.version == 6 or v > 2**32 - 1 else ipaddress.IPv4Address(v))
    for i, v in enumerate(extra + rnd):
        out.append(ipaddress.IPv4Address(v % 2**32) if i % 2 else ipaddress.IPv6Address(v % 2**128))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nets=networks, extra=st.lists(st.integers(0, 2**128 - 1), max_size=10),
       rnd=st.lists(st.sampled_from([0, 2**32 - 1, 2**128 - 1, 2**127, 2**31]), max_size=4))
def test_lpm_matches_brute_force(nets: list[Net], extra: list[int], rnd: list[int]) -> None:
    table = PrefixTable.from_networks(nets)
    probes = _probes(nets, extra, rnd)
    if not probes:
        return
    a, v = addrs16(probes)
    idx, plen = table.lookup(a, v)
    want = [brute_force(nets, p) for p in probes]
    assert idx.tolist() == want
    assert plen.tolist() == [nets[w].prefixlen if w >= 0 else 0 for w in want]
    # the same through precomputed keys
    idx2, _ = table.lookup(AddrKeys.of(a, v))
    assert idx2.tolist() == want


def test_lpm_edges() -> None:
    nets = [ipaddress.ip_network(n) for n in (
        "0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "255.255.255.255/32",
        "::/0", "2001:db8::/32", "2001:db8::1/128", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", "10.1.0.0/16")]
    t = PrefixTable.from_networks(nets)
    cases = {"10.1.2.3": 4, "10.1.2.4": 3, "10.1.3.1": 2, "10.2.0.0": 1, "11.0.0.0": 0, "255.255.255.255": 5,
             "2001:db8::1": 8, "2001:db8::2": 7, "2001:db9::": 6, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff": 9,
             "::ffff:10.1.2.3": 6}  # a v4-mapped address in an IPv6 record is IPv6: only IPv6 prefixes
    a, v = addrs16([ipaddress.ip_address(x) for x in cases])
    idx, plen = t.lookup(a, v)
    assert idx.tolist() == list(cases.values())
    assert plen[0] == 32 and plen[4] == 0  # the default route matches with length 0
    # no table, other versions: nothing matches
    empty_t = PrefixTable.from_networks([])
    assert empty_t.lookup(a, v)[0].tolist() == [-1] * len(cases)
    assert t.lookup(a, np.zeros(len(a), np.uint8))[0].tolist() == [-1] * len(cases)
    with pytest.raises(ValueError):
        PrefixTable(np.zeros((1, 16), np.uint8), np.array([33]), np.array([4]))


def test_lpm_v4_host_bits_are_ignored() -> None:
    # PrefixTable masks host bits itself (routes and files are normalised before, but be safe)
    a = np.array([addr_to_16("10.1.2.3")], dtype="V16")
    t = PrefixTable(a, np.array([16]), np.array([4]))
    q, v = addrs16([ipaddress.ip_address("10.1.200.200")])
    assert t.lookup(q, v)[1].tolist() == [16]


# -- the route table's rules -----------------------------------------------------------------------

def route(net: str, gw: str | None = None, oif: int = 0, **kw: Any) -> Route:
    n = ipaddress.ip_network(net)
    return Route(n.version, addr_to_16(n.network_address), n.prefixlen,
                 addr_to_16(gw) if gw else bytes(16), oif, **kw)


def test_route_table_lookup() -> None:
    t = RouteTable([
        route("0.0.0.0/0", "192.0.2.1", 2),
        route("10.0.0.0/16", "192.0.2.9", 3),
        route("10.0.1.0/24", None, 4),
        route("10.0.1.0/24", "192.0.2.99", 5, metric=100),  # a worse metric of the same prefix
        route("10.9.0.0/16", None, 0, type=RTN_BLACKHOLE),
        route("2001:db8::/32", "fe80::1", 6),
        route("10.0.1.1/32", None, 4, table=RT_TABLE_LOCAL, type=RTN_LOCAL),
        route("10.0.1.255/32", None, 4, table=RT_TABLE_LOCAL, type=RTN_BROADCAST),
        route("ff00::/8", None, 4, table=RT_TABLE_LOCAL, type=RTN_MULTICAST),  # not "local"
        route("172.16.0.0/12", "192.0.2.7", 7, table=1000),  # other tables are not followed
    ])
    qs = ["10.0.1.7", "10.0.2.7", "8.8.8.8", "10.9.9.9", "2001:db8::5", "2001:db9::5", "172.16.0.1"]
    a, v = addrs16([ipaddress.ip_address(q) for q in qs])
    plen, gw, oif = t.lookup(a, v)
    assert plen.tolist() == [24, 16, 0, 16, 32, 0, 0]
    assert oif.tolist() == [4, 3, 2, 0, 6, 0, 2]
    gws = [str(addr_from_16(bytes(g), int(ver))) for g, ver in zip(gw, v, strict=True)]
    assert gws == ["0.0.0.0", "192.0.2.9", "192.0.2.1", "0.0.0.0", "fe80::1", "::", "192.0.2.1"]
    la, lv = addrs16([ipaddress.ip_address(x) for x in ("10.0.1.1", "10.0.1.255", "10.0.1.2", "ff02::1")])
    assert t.is_local(la, lv).tolist() == [True, True, False, False]


class FakeNh(dict[str, Any]):
    def get_attr(self, name: str) -> Any:
        return dict(self.get("attrs", [])).get(name)


def test_route_from_msg() -> None:
    msg = FakeNh(family=2, flags=0, table=252, dst_len=16, type=1,
                 attrs=[("RTA_TABLE", 254), ("RTA_DST", "10.50.0.0"), ("RTA_PRIORITY", 5),
                        ("RTA_MULTIPATH", [FakeNh(oif=7, attrs=[("RTA_GATEWAY", "10.0.0.1")]),
                                           FakeNh(oif=8, attrs=[("RTA_GATEWAY", "10.0.0.2")])])])
    r = route_from_msg(msg)
    assert r == Route(4, addr_to_16("10.50.0.0"), 16, addr_to_16("10.0.0.1"), 7, 254, 1, 5)
    default6 = route_from_msg(FakeNh(family=10, flags=0, table=254, dst_len=0, type=1,
                                     attrs=[("RTA_GATEWAY", "fe80::1"), ("RTA_OIF", 3)]))
    assert default6 == Route(6, bytes(16), 0, addr_to_16("fe80::1"), 3)
    # IPv4 through an IPv6 gateway (RTA_VIA): the interface, no gateway
    via = route_from_msg(FakeNh(family=2, flags=0, table=254, dst_len=24, type=1,
                                attrs=[("RTA_DST", "10.60.0.0"), ("RTA_OIF", 2),
                                       ("RTA_VIA", {"family": 10, "addr": "fd00::2"})]))
    assert via is not None and via.gateway == bytes(16) and via.oif == 2
    assert route_from_msg(FakeNh(family=7, flags=0, table=254, dst_len=0, type=1, attrs=[])) is None


# -- isMulticast -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("addr", "octet"), [
    ("224.0.0.1", 0x01), ("239.255.255.255", 0x01), ("223.255.255.255", 0), ("240.0.0.1", 0), ("10.0.0.1", 0),
    ("ff02::1", 0x20),  # link-local scope 2, T 0
    ("ff05::2", 0x50),  # site-local
    ("ff15::1234", 0x58),  # T flag set (transient), scope 5
    ("ff3e:40:2001:db8::1", 0xE8),  # unicast-prefix-based (P and T), global scope 0xe
    ("ff0e::1", 0xE0), ("ff00::", 0x00),  # scope 0 and no T: the octet says 0, as the IE defines
    ("fe80::1", 0), ("2001:db8::1", 0), ("::ffff:224.0.0.1", 0),  # an IPv6 record is IPv6
])
def test_is_multicast_octet(addr: str, octet: int) -> None:
    a, v = addrs16([ipaddress.ip_address(addr)])
    assert is_multicast_octet(a, v).tolist() == [octet]


# -- the AS file ------------------------------------------------------------------------------------

AS_FILE = """\
# prefix-to-AS
192.0.2.0/24      64500
192.0.2.128/25    AS64501   # more specific
198.51.100.7      64502

2001:db8::/32     64503
2001:db8:1::/48   4200000000
10.0.0.0/8        0
"""


def test_as_table(tmp_path: Path) -> None:
    f = tmp_path / "as.txt"
    f.write_text(AS_FILE)
    t = AsTable.from_file(f)
    assert len(t) == 6
    qs = ["192.0.2.1", "192.0.2.200", "198.51.100.7", "198.51.100.8", "2001:db8:2::1", "2001:db8:1::1", "10.1.1.1"]
    a, v = addrs16([ipaddress.ip_address(q) for q in qs])
    assert t.lookup(a, v).tolist() == [64500, 64501, 64502, 0, 64503, 4200000000, 0]


@pytest.mark.parametrize(("line", "why"), [
    ("192.0.2.0/24", "expected 'PREFIX AS'"),
    ("192.0.2.0/24 64500 extra", "expected 'PREFIX AS'"),
    ("192.0.2.1/24 64500", "has host bits set"),
    ("192.0.2.0/33 64500", "bad prefix"),
    ("not-an-ip 64500", "bad prefix"),
    ("192.0.2.0/24 AS-x", "not a number"),
    ("192.0.2.0/24 -1", "not a number"),
    ("192.0.2.0/24 4294967296", "out of range"),
])
def test_as_file_bad_lines(tmp_path: Path, line: str, why: str) -> None:
    f = tmp_path / "bad.txt"
    f.write_text(f"# ok\n192.0.2.0/24 64500\n\n{line}\n")
    with pytest.raises(ConfigError) as exc:
        AsTable.from_file(f)
    assert str(exc.value).startswith(f"{f}:4: ")
    assert why in str(exc.value)


def test_as_file_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the prefix-to-AS file"):
        AsTable.from_file(tmp_path / "missing.txt")


# -- the enricher's rules -----------------------------------------------------------------------------

def records(*rows: tuple[str, str, int]) -> np.ndarray:
    """(src, dst, egress_ifindex) rows."""
    r = empty(len(rows))
    for i, (src, dst, egress) in enumerate(rows):
        s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        r[i]["src_addr"] = addr_to_16(s)
        r[i]["dst_addr"] = addr_to_16(d)
        r[i]["ip_version"] = d.version
        r[i]["egress_ifindex"] = egress
    return r


TABLE_ROUTES = [
    route("0.0.0.0/0", "192.0.2.1", 2),
    route("192.0.2.0/24", None, 2),
    route("10.1.0.0/16", None, 3),
    route("10.2.0.0/16", "10.1.0.254", 3),
    route("2001:db8:1::/64", None, 3),
    route("fe80::/64", None, 3),
    route("10.1.0.1/32", None, 3, table=RT_TABLE_LOCAL, type=RTN_LOCAL),
    route("10.1.255.255/32", None, 3, table=RT_TABLE_LOCAL, type=RTN_BROADCAST),
]


def test_enricher_routes() -> None:
    t = RouteTable(TABLE_ROUTES, {4: True, 6: True})
    r = records(
        ("10.1.0.5", "10.2.3.4", 0),  # forwarded through a gateway
        ("10.1.0.5", "8.8.8.8", 0),  # default route: mask 0, its gateway
        ("10.2.0.9", "10.1.0.7", 0),  # directly connected: no gateway
        ("10.1.0.5", "10.1.0.1", 0),  # to the host itself: no out-interface
        ("10.1.0.5", "10.1.255.255", 0),  # broadcast: not forwarded
        ("10.1.0.5", "224.0.0.5", 0),  # multicast: not forwarded
        ("2001:db8:1::5", "fe80::1", 0),  # IPv6 link-local: never forwarded
        ("10.1.0.5", "10.2.3.4", 9),  # the kernel's out-interface stands; not the route's: no gateway
        ("10.1.0.5", "10.2.3.4", 3),  # the kernel's, the route's interface: the route's gateway
    )
    r["next_hop"][8] = addr_to_16("10.1.0.253")  # ... unless the kernel gave a next hop
    r2 = r.copy()
    Enricher(routes=t).enrich(r)
    assert r["src_mask"].tolist() == [16, 16, 16, 16, 16, 16, 64, 16, 16]
    assert r["dst_mask"].tolist() == [16, 0, 16, 16, 16, 0, 64, 16, 16]
    assert r["egress_ifindex"].tolist() == [3, 2, 3, 0, 0, 0, 0, 9, 3]
    nh = [str(addr_from_16(bytes(x["next_hop"]), int(x["ip_version"]))) for x in r]
    assert nh == ["10.1.0.254", "192.0.2.1", "0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0", "::", "0.0.0.0",
                  "10.1.0.253"]
    assert r["is_multicast"].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0]
    # a host that does not forward IPv4: no out-interface filled (the gateway still needs one)
    Enricher(routes=RouteTable(TABLE_ROUTES, {4: False, 6: True})).enrich(r2)
    assert r2["egress_ifindex"].tolist() == [0, 0, 0, 0, 0, 0, 0, 9, 3]
    assert r2["dst_mask"].tolist() == [16, 0, 16, 16, 16, 0, 64, 16, 16]


def test_enricher_sources_are_optional() -> None:
    r = records(("10.1.0.5", "10.2.3.4", 0))
    r["src_mask"] = 7
    r["src_as"] = 9
    Enricher(multicast=False).enrich(r)
    assert r["src_mask"][0] == 7 and r["src_as"][0] == 9 and r["egress_ifindex"][0] == 0
    Enricher(asn=AsTable.from_text("10.0.0.0/8 64500\n")).enrich(r)
    assert r["src_as"][0] == 64500 and r["dst_as"][0] == 64500 and r["src_mask"][0] == 7
    Enricher().enrich(empty(0))
