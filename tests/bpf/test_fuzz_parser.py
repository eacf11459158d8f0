"""Hostile packets: the parser fuzzed through BPF_PROG_TEST_RUN, on all three entry points.

Frames come from hypothesis -- built field by field with every length and
offset free to lie (IHL 0-15, total/payload lengths, fragment offsets, VLAN
stacks of 0-3 tags, IPv6 extension header chains of 0-9 headers of any kind
and length, any protocol), then cut short or scribbled over -- and from plain
random bytes; and, exhaustively, every truncation of a set of rich packets.

For every frame, on XDP, TC ingress and TC egress:

* the verdict is XDP_PASS / TC_ACT_UNSPEC and the packet comes back unchanged;
* exactly one outcome is counted: metered (one flow entry), not IP, or
  unparsable -- never two, never none;
* the outcome and the flow key are exactly those of ``oracle`` below, a
  second implementation of the documented parse rules in Python
  (docs/architecture.md, "Parser"), and where scapy dissects the frame to an
  IP header and a transport header, its addresses, TOS, protocol and ports
  agree with the key.

``PYFLOW_FUZZ_EXAMPLES`` raises the number of hypothesis examples (``make soak``).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    _ICMPv6,
)
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.layers.sctp import SCTP

from pyflow.kernel import abi, bpfsys
from pyflow.kernel.loader import FlowMeter
from tests.bpf.conftest import TC_ACT_UNSPEC, TEST_IFINDEX, skb_ctx, xdp_ctx

pytestmark = pytest.mark.root

EXAMPLES = int(os.environ.get("PYFLOW_FUZZ_EXAMPLES", "1500"))
MAX_IPV6_EXT = 6  # the meter's default (KernelSettings.max_ipv6_ext)
MAX_FRAME = 3000  # BPF_PROG_TEST_RUN takes up to about a page
XDP_PASS = 2
HOOKS = {"xdp": abi.Hook.XDP, "tc_ingress": abi.Hook.TC_INGRESS, "tc_egress": abi.Hook.TC_EGRESS}
NOT_IP, BAD = "not_ip", "unparsable"

# -- the oracle: the documented parse rules, written again ------------------------


def _be16(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 2], "big")


def _l4(f: bytes, l4: int, proto: int, key: dict[str, Any]) -> dict[str, Any] | str:
    n = len(f)
    if proto == 6:
        if l4 + 20 > n:
            return BAD
        key["src_port"], key["dst_port"] = _be16(f, l4), _be16(f, l4 + 2)
    elif proto in (17, 132):
        if l4 + 8 > n:
            return BAD
        key["src_port"], key["dst_port"] = _be16(f, l4), _be16(f, l4 + 2)
    elif proto in (1, 58):
        if l4 + 2 > n:
            return BAD
        key["dst_port"] = f[l4] << 8 | f[l4 + 1]
    return key


def oracle(f: bytes) -> dict[str, Any] | str:
    """What the meter must make of frame ``f``: a flow key (dict), NOT_IP or BAD."""
    n = len(f)
    if n < 14:
        return BAD
    proto, off = _be16(f, 12), 14
    for _ in range(2):
        if proto not in (0x8100, 0x88A8):
            break
        if off + 4 > n:
            return BAD
        proto, off = _be16(f, off + 2), off + 4
    if proto == 0x0800:
        if off + 20 > n:
            return BAD
        vihl, tot = f[off], _be16(f, off + 2)
        ihl = (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or ihl < 20 or tot < ihl:
            return BAD
        key = {"src_addr": bytes(10) + b"\xff\xff" + f[off + 12:off + 16],
               "dst_addr": bytes(10) + b"\xff\xff" + f[off + 16:off + 20],
               "protocol": f[off + 9], "ip_version": 4, "tos": f[off + 1], "src_port": 0, "dst_port": 0}
        if _be16(f, off + 6) & 0x1FFF:
            return key
        if off + ihl > n:
            return BAD
        return _l4(f, off + ihl, f[off + 9], key)
    if proto == 0x86DD:
        if off + 40 > n:
            return BAD
        if f[off] >> 4 != 6:
            return BAD
        key = {"src_addr": f[off + 8:off + 24], "dst_addr": f[off + 24:off + 40], "protocol": 0, "ip_version": 6,
               "tos": (f[off] << 4 | f[off + 1] >> 4) & 0xFF, "src_port": 0, "dst_port": 0}
        nxt, l4 = f[off + 6], off + 40
        for _ in range(MAX_IPV6_EXT):
            if nxt in (0, 43, 60):
                if l4 + 2 > n:
                    return BAD
                nxt, l4 = f[l4], l4 + (f[l4 + 1] + 1) * 8
            elif nxt == 44:
                if l4 + 8 > n:
                    return BAD
                nxt = f[l4]
                if _be16(f, l4 + 2) & 0xFFF8:  # not the first fragment: payload follows, not headers
                    key["protocol"] = nxt
                    return key
                l4 += 8
            elif nxt == 51:
                if l4 + 2 > n:
                    return BAD
                nxt, l4 = f[l4], l4 + (f[l4 + 1] + 2) * 4
            else:
                break
        key["protocol"] = nxt
        if nxt in (0, 43, 44, 60, 51):
            return BAD  # more extension headers than the parser follows
        if nxt == 59:
            return key
        if l4 > n:
            return BAD
        return _l4(f, l4, nxt, key)
    return NOT_IP


def scapy_agrees(f: bytes, key: dict[str, Any]) -> None:
    """Where scapy dissects ``f`` to an IP header (and a transport header), it must agree with ``key``."""
    pkt = Ether(f)
    l3 = pkt.getlayer(IP) if key["ip_version"] == 4 else pkt.getlayer(IPv6)
    if l3 is None:
        return
    if key["ip_version"] == 4:
        assert key["src_addr"][12:] == bytes(map(int, l3.src.split("."))), (l3.src, key)
        assert key["dst_addr"][12:] == bytes(map(int, l3.dst.split(".")))
        assert (key["tos"], key["protocol"]) == (l3.tos, l3.proto)
        if l3.frag:
            return
    else:
        import socket

        assert key["src_addr"] == socket.inet_pton(socket.AF_INET6, l3.src)
        assert key["dst_addr"] == socket.inet_pton(socket.AF_INET6, l3.dst)
        assert key["tos"] == l3.tc
    # the first layer after the IP header (and its extension headers) that scapy made sense of
    layer = l3.payload
    while isinstance(layer, IPv6ExtHdrHopByHop | IPv6ExtHdrDestOpt | IPv6ExtHdrRouting | IPv6ExtHdrFragment):
        if isinstance(layer, IPv6ExtHdrFragment) and layer.offset:
            return
        # scapy sizes some headers by their contents (a type 0 routing header by its addresses),
        # not by RFC 8200's (length + 1) * 8: where it did, it is no witness for what follows
        size = 8 if isinstance(layer, IPv6ExtHdrFragment) else (layer.len + 1) * 8
        if len(layer) - len(layer.payload) != size:
            return
        layer = layer.payload
    if isinstance(layer, TCP | UDP | SCTP):
        if key["protocol"] in (6, 17, 132):
            assert (key["src_port"], key["dst_port"]) == (layer.sport, layer.dport), (layer.summary(), key)
    elif isinstance(layer, ICMP | _ICMPv6) and key["protocol"] in (1, 58):
        assert key["dst_port"] >> 8 == layer.type
        if any(f.name == "code" for f in layer.fields_desc):  # a few ICMPv6 classes name it otherwise
            assert key["dst_port"] & 0xFF == layer.code


# -- running the three programs ---------------------------------------------------


def tc_test_run_refuses(f: bytes) -> bool:
    """BPF_PROG_TEST_RUN of an skb program refuses (EINVAL) a frame whose ethertype says IPv4 or
    IPv6 but that is shorter than that header; on the wire such a frame reaches TC all the same."""
    ethertype = _be16(f, 12)
    return (ethertype == 0x0800 and len(f) < 14 + 20) or (ethertype == 0x86DD and len(f) < 14 + 40)


class Runner:
    def __init__(self, meter: FlowMeter) -> None:
        self.meter = meter
        self.fds = {h: meter.prog_fd_of(h) for h in HOOKS}
        self.slots = meter.table("iface_slots")

    def counters(self, hook: str) -> np.ndarray:
        """The ifindex-1 counters of ``hook``, summed over CPUs (one array lookup, not a scan)."""
        per_cpu = self.slots[ctypes.c_int(TEST_IFINDEX * 3 + int(HOOKS[hook]))]
        raw = b"".join(bytes(v) for v in per_cpu)
        return np.frombuffer(raw, dtype=abi.IFACE_STATS_DTYPE)["counters"].sum(axis=0).astype(np.int64)

    def clear(self) -> None:
        keys, _ = self.meter.read_flows()
        for k in [k.tobytes() for k in keys]:
            bpfsys.map_delete(self.meter.flows_fd, k)

    def check(self, f: bytes) -> str:
        """Run ``f`` through every entry point; assert everything; the outcome's name."""
        want = oracle(f)
        for hook, fd in self.fds.items():
            before = self.counters(hook)
            if hook == "xdp":
                res = bpfsys.prog_test_run(fd, f, ctx=xdp_ctx(f))
                assert res.retval == XDP_PASS
            elif tc_test_run_refuses(f):
                # a limit of BPF_PROG_TEST_RUN, not of the program (XDP covers these frames)
                with pytest.raises(OSError) as info:
                    bpfsys.prog_test_run(fd, f, ctx=skb_ctx())
                assert info.value.errno == 22
                assert not (self.counters(hook) - before).any()
                continue
            else:
                res = bpfsys.prog_test_run(fd, f, ctx=skb_ctx())
                assert res.retval == TC_ACT_UNSPEC
            assert res.data_out == f, f"{hook} changed the packet"
            moved = {abi.Counter(i).name.lower(): int(d) for i, d in enumerate(self.counters(hook) - before) if d}
            keys, _ = self.meter.read_flows()
            got = [{name: bytes(k[name]) if name.endswith("_addr") else int(k[name])
                    for name in ("src_addr", "dst_addr", "protocol", "ip_version", "tos", "src_port", "dst_port",
                                 "ifindex", "direction")} for k in keys]
            self.clear()
            if isinstance(want, str):
                assert moved == {"packets_seen": 1, want: 1}, (hook, f.hex(), moved, got)
                assert got == []
                continue
            assert moved == {"packets_seen": 1, "metered": 1}, (hook, f.hex(), moved, want)
            expected = {**want, "ifindex": TEST_IFINDEX, "direction": 1 if hook == "tc_egress" else 0}
            assert got == [expected], (hook, f.hex())
        if not isinstance(want, str):
            scapy_agrees(f, want)
        return want if isinstance(want, str) else "metered"


@pytest.fixture(scope="module")
def runner(meter: FlowMeter) -> Iterator[Runner]:
    r = Runner(meter)
    r.clear()
    yield r
    r.clear()


# -- frames ------------------------------------------------------------------------

u8 = st.integers(0, 255)
u16 = st.integers(0, 0xFFFF)


@st.composite
def l4_bytes(draw: st.DrawFn, proto: int) -> bytes:
    if proto == 6:
        return struct.pack("!HHIIBBHHH", draw(u16), draw(u16), draw(st.integers(0, 2**32 - 1)), 0,
                           draw(st.sampled_from([0x50, 0x60, 0xF0, 0x00])), draw(u8), draw(u16), 0, 0)
    if proto in (17, 132):
        return struct.pack("!HHHH", draw(u16), draw(u16), draw(u16), 0) + (bytes(4) if proto == 132 else b"")
    if proto in (1, 58, 2):
        return bytes([draw(u8), draw(u8)]) + bytes(6)
    return draw(st.binary(max_size=24))


PROTOS = st.one_of(st.sampled_from([6, 17, 1, 58, 132, 2, 47, 59]), u8)


@st.composite
def ipv4(draw: st.DrawFn) -> bytes:
    proto = draw(PROTOS)
    ihl = draw(st.one_of(st.just(5), st.integers(0, 15)))
    opts = draw(st.binary(min_size=max(0, ihl - 5) * 4, max_size=max(0, ihl - 5) * 4))
    l4 = draw(l4_bytes(proto)) + draw(st.binary(max_size=64))
    frag = draw(st.one_of(st.just(0), st.just(0x2000), st.integers(0, 0xFFFF)))  # none, MF, anything
    tot = 20 + len(opts) + len(l4)
    tot = draw(st.one_of(st.just(tot), u16))
    version = draw(st.one_of(st.just(4), st.integers(0, 15)))
    hdr = struct.pack("!BBHHHBBH4s4s", version << 4 | ihl, draw(u8), tot, draw(u16), frag, draw(u8), proto, 0,
                      draw(st.binary(min_size=4, max_size=4)), draw(st.binary(min_size=4, max_size=4)))
    return hdr + opts + l4


EXT = st.one_of(st.sampled_from([0, 43, 44, 60, 51]), u8)


@st.composite
def ipv6(draw: st.DrawFn) -> bytes:
    chain = draw(st.lists(st.sampled_from([0, 43, 44, 60, 51]), max_size=9))
    final = draw(PROTOS)
    body = b""
    types = [*chain, final]
    for i, kind in enumerate(chain):
        nxt = types[i + 1]
        if kind == 44:
            offset = draw(st.one_of(st.just(0), st.integers(0, 0x1FFF)))
            body += struct.pack("!BBHI", nxt, 0, offset << 3 | draw(st.integers(0, 1)), draw(st.integers(0, 2**32 - 1)))
        elif kind == 51:
            length = draw(st.one_of(st.just(4), st.integers(0, 255)))
            body += bytes([nxt, length]) + bytes(min((length + 2) * 4, 64) - 2)
        else:
            length = draw(st.one_of(st.just(0), st.integers(0, 255)))
            body += bytes([nxt, length]) + bytes(min((length + 1) * 8, 64) - 2)
    body += draw(l4_bytes(final)) + draw(st.binary(max_size=64))
    plen = draw(st.one_of(st.just(len(body)), u16))
    version = draw(st.one_of(st.just(6), st.integers(0, 15)))
    first = (version << 28) | (draw(u8) << 20) | draw(st.integers(0, 0xFFFFF))
    hdr = struct.pack("!IHBB16s16s", first, plen, types[0], draw(u8), draw(st.binary(min_size=16, max_size=16)),
                      draw(st.binary(min_size=16, max_size=16)))
    return hdr + body


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    tags = b"".join(struct.pack("!HH", draw(st.sampled_from([0x8100, 0x88A8])), draw(u16))
                    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))))
    kind = draw(st.sampled_from(["ipv4", "ipv4", "ipv6", "ipv6", "other"]))
    if kind == "ipv4":
        ethertype, l3 = 0x0800, draw(ipv4())
    elif kind == "ipv6":
        ethertype, l3 = 0x86DD, draw(ipv6())
    else:
        ethertype, l3 = draw(u16), draw(st.binary(max_size=64))
    # the first ethertype is the first tag's, the tags' last "inner type" is the L3 one
    if tags:
        outer = tags[:2]
        inner = tags[2:] + struct.pack("!H", ethertype)
        f = bytes(6) + b"\x02" + bytes(5) + outer + inner + l3
    else:
        f = bytes(6) + b"\x02" + bytes(5) + struct.pack("!H", ethertype) + l3
    f = f[:MAX_FRAME]
    # then hurt it: cut it short, or overwrite a few bytes
    hurt = draw(st.sampled_from(["none", "none", "cut", "scribble"]))
    if hurt == "cut":
        f = f[:draw(st.integers(14, len(f)))]
    elif hurt == "scribble":
        b = bytearray(f)
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(12, len(b) - 1))] = draw(u8)
        f = bytes(b)
    return f


@st.composite
def noise(draw: st.DrawFn) -> bytes:
    """Random bytes behind an Ethernet header, mostly with an IP or VLAN ethertype."""
    ethertype = draw(st.one_of(st.sampled_from([0x0800, 0x86DD, 0x8100, 0x88A8]), u16))
    return bytes(12) + struct.pack("!H", ethertype) + draw(st.binary(max_size=200))


FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                              HealthCheck.data_too_large])


@FUZZ
@given(frames())
def test_built_frames(runner: Runner, f: bytes) -> None:
    event(runner.check(f))


@settings(max_examples=max(EXAMPLES // 2, 50), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(noise())
def test_random_bytes(runner: Runner, f: bytes) -> None:
    event(runner.check(f))


def rich_packets() -> list[bytes]:
    """Packets with something to get wrong at every offset."""
    ip4 = IP(src="192.0.2.1", dst="198.51.100.2", tos=0x28)
    ip6 = IPv6(src="2001:db8::1", dst="2001:db8::2", tc=0x5F, fl=0xABCDE)
    e = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    ah = bytes([6, 4, 0, 0]) + bytes(20)  # AH -> TCP, (4 + 2) * 4 = 24 bytes
    return [bytes(p) for p in (
        e / Dot1AD(vlan=1) / Dot1Q(vlan=2) / IP(src="192.0.2.1", dst="198.51.100.2", options=b"\x94\x04\x00\x00")
        / TCP(sport=1234, dport=443, flags="S", options=[("MSS", 1460)]),
        e / ip4 / UDP(sport=53, dport=5353) / b"x",
        e / ip4 / ICMP(type=3, code=1) / IP(src="198.51.100.2", dst="192.0.2.1") / UDP(sport=1, dport=2),
        e / ip6 / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / IPv6ExtHdrFragment(m=1) / IPv6ExtHdrDestOpt()
        / UDP(sport=7, dport=9) / b"y",
        e / IPv6(src="2001:db8::1", dst="2001:db8::2", nh=51) / ah / TCP(sport=179, dport=1179),
        e / Dot1Q(vlan=3) / ip6 / SCTP(sport=36412, dport=38412),
    )]


def test_every_truncation_of_rich_packets(runner: Runner) -> None:
    outcomes: dict[str, int] = {}
    for pkt in rich_packets():
        assert runner.check(pkt) == "metered"
        for cut in range(14, len(pkt)):
            r = runner.check(pkt[:cut])
            outcomes[r] = outcomes.get(r, 0) + 1
    # the truncations are mostly unparsable; those that keep every header the parser reads are metered
    assert outcomes.get(BAD, 0) > 100 and outcomes.get("metered", 0) > 10, outcomes


def test_oracle_knows_the_parser_tables() -> None:
    """The oracle agrees with the hand-written expectations of test_parser.py (so it is not
    merely agreeing with itself)."""
    from tests.bpf.test_parser import CASES

    for case in CASES:
        got = oracle(case.pkt)
        if isinstance(case.expect, abi.Counter):
            assert got == case.expect.name.lower(), case.name
        else:
            assert isinstance(got, dict), case.name
            e = case.expect
            assert (got["src_addr"], got["dst_addr"], got["src_port"], got["dst_port"], got["protocol"],
                    got["ip_version"], got["tos"]) == (e.src, e.dst, e.src_port, e.dst_port, e.protocol,
                                                       e.ip_version, e.tos), case.name
