"""The XDP parser, katran style: one table of crafted packets, each run once
through BPF_PROG_TEST_RUN on an empty cache, each with exactly one expected
outcome: either one exact flow entry, or exactly one "not metered" counter.

For every case the program must return XDP_PASS and hand the packet back
unchanged (the meter never alters traffic), and every counter other than the
expected ones must stay where it was.

Frames that are not deliberately truncated are padded to the 60-byte Ethernet
minimum, as a NIC delivers them, so "bytes = IP total length, not frame
length" is actually tested.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.layers.sctp import SCTP
from scapy.packet import Packet, Raw

from pyflow.kernel import abi

if TYPE_CHECKING:
    from tests.bpf.conftest import Harness

pytestmark = pytest.mark.root

MAC_A = "02:00:00:00:00:01"
MAC_B = "02:00:00:00:00:02"
A4, B4 = "192.0.2.1", "198.51.100.2"
A6, B6 = "2001:db8::1", "2001:db8:ffff::2"
IFINDEX = 1  # the test runs' ingress_ifindex (lo), see conftest.xdp_ctx


def v4(addr: str) -> bytes:
    """IPv4 address as stored in the key: v4-mapped ::ffff:a.b.c.d."""
    return bytes(10) + b"\xff\xff" + socket.inet_aton(addr)


def v6(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, addr)


def eth(**kw: Any) -> Ether:
    return Ether(src=MAC_A, dst=MAC_B, **kw)


def frame(pkt: Packet) -> bytes:
    """Wire bytes padded to the 60-byte Ethernet minimum (FCS excluded)."""
    raw = bytes(pkt)
    return raw + bytes(max(0, 60 - len(raw)))


def cut(pkt: Packet, length: int) -> bytes:
    """The first ``length`` wire bytes: a truncated frame (never padded)."""
    raw = bytes(pkt)
    assert len(raw) > length
    return raw[:length]


@dataclass(frozen=True)
class Flow:
    """One expected cache entry after one packet."""

    src: bytes
    dst: bytes
    src_port: int
    dst_port: int
    protocol: int
    ip_version: int
    tos: int
    bytes: int  # IP total length: IPv4 tot_len, IPv6 payload_len + 40
    tcp_flags: int = 0
    vlan_id: int = 0  # outer tag
    inner_vlan_id: int = 0  # QinQ: the tag inside it


@dataclass(frozen=True)
class Case:
    name: str
    pkt: bytes
    expect: Flow | abi.Counter


def F4(sport: int, dport: int, proto: int, nbytes: int, tos: int = 0, flags: int = 0,
       vlans: tuple[int, int] = (0, 0)) -> Flow:
    return Flow(v4(A4), v4(B4), sport, dport, proto, 4, tos, nbytes, flags, *vlans)


def F6(sport: int, dport: int, proto: int, nbytes: int, tos: int = 0, flags: int = 0) -> Flow:
    return Flow(v6(A6), v6(B6), sport, dport, proto, 6, tos, nbytes, flags)


TCP_P, UDP_P, ICMP_P, ICMP6_P, SCTP_P = 6, 17, 1, 58, 132
SYN, ACK, PSH = 0x02, 0x10, 0x08

ip4 = IP(src=A4, dst=B4)
ip6 = IPv6(src=A6, dst=B6)

# An AH header (RFC 4302) for IPv6 -> TCP: next 6, len 4 => (4 + 2) * 4 = 24 bytes.
AH_TO_TCP = bytes([TCP_P, 4, 0, 0]) + (0x1000).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes(12)

CASES = [
    # --- IPv4 ------------------------------------------------------------------
    Case("ipv4_tcp_syn_df",  # DF set: not a fragment
         frame(eth() / IP(src=A4, dst=B4, flags="DF") / TCP(sport=40000, dport=443, flags="S")),
         F4(40000, 443, TCP_P, 40, flags=SYN)),
    Case("ipv4_udp",
         frame(eth() / ip4 / UDP(sport=5353, dport=53) / (b"q" * 16)),
         F4(5353, 53, UDP_P, 44)),
    Case("ipv4_options_udp",  # ihl 7: two router-alert options before UDP
         frame(eth() / IP(src=A4, dst=B4, options=[IPOption_Router_Alert(), IPOption_Router_Alert()])
               / UDP(sport=1234, dport=5678) / b"opts"),
         F4(1234, 5678, UDP_P, 40)),
    Case("ipv4_icmp_echo",
         frame(eth() / ip4 / ICMP(type=8, code=0, id=7, seq=1) / b"abcdefgh"),
         F4(0, 0x0800, ICMP_P, 36)),
    Case("ipv4_icmp_port_unreachable",  # the quoted UDP header is not read as ports
         frame(eth() / ip4 / ICMP(type=3, code=3) / IP(src=B4, dst=A4) / UDP(sport=53, dport=5353)),
         F4(0, 0x0303, ICMP_P, 56)),
    Case("ipv4_first_fragment",  # MF set, offset 0: the L4 header is there
         frame(eth() / IP(src=A4, dst=B4, flags="MF") / UDP(sport=1000, dport=2000) / (b"x" * 24)),
         F4(1000, 2000, UDP_P, 52)),
    Case("ipv4_non_first_fragment",  # offset 3: payload starts with UDP-port-looking bytes
         frame(eth() / IP(src=A4, dst=B4, proto=UDP_P, frag=3) / Raw(b"\x03\xe8\x07\xd0" + b"x" * 20)),
         F4(0, 0, UDP_P, 44)),
    Case("ipv4_tos_b8",
         frame(eth() / IP(src=A4, dst=B4, tos=0xB8) / UDP(sport=16384, dport=16386) / (b"rtp!" * 5)),
         F4(16384, 16386, UDP_P, 48, tos=0xB8)),
    Case("ipv4_sctp",
         frame(eth() / ip4 / SCTP(sport=36412, dport=38412)),
         F4(36412, 38412, SCTP_P, 32)),
    Case("vlan_8021q",
         frame(eth() / Dot1Q(vlan=100) / ip4 / UDP(sport=4789, dport=4790) / (b"v" * 8)),
         F4(4789, 4790, UDP_P, 36, vlans=(100, 0))),
    Case("qinq_8021ad_8021q",
         frame(eth() / Dot1AD(vlan=200) / Dot1Q(vlan=100) / ip4 / TCP(sport=22, dport=50000, flags="PA")
               / b"data"),
         F4(22, 50000, TCP_P, 44, flags=PSH | ACK, vlans=(200, 100))),
    # --- IPv6 ------------------------------------------------------------------
    Case("ipv6_tcp",
         frame(eth() / ip6 / TCP(sport=40001, dport=80, flags="SA")),
         F6(40001, 80, TCP_P, 60, flags=SYN | ACK)),
    Case("ipv6_udp_tc_a0",  # all flow-label bits set: none may leak into tos
         frame(eth() / IPv6(src=A6, dst=B6, tc=0xA0, fl=0xFFFFF) / UDP(sport=5004, dport=5006) / (b"v" * 12)),
         F6(5004, 5006, UDP_P, 60, tos=0xA0)),
    Case("ipv6_udp_tc_5f",  # traffic class straddles bytes 0 and 1: both nibbles
         frame(eth() / IPv6(src=A6, dst=B6, tc=0x5F, fl=0) / UDP(sport=5004, dport=5006) / (b"v" * 12)),
         F6(5004, 5006, UDP_P, 60, tos=0x5F)),
    Case("ipv6_hbh_dstopt_udp",
         frame(eth() / ip6 / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / UDP(sport=546, dport=547)
               / (b"d" * 8)),
         F6(546, 547, UDP_P, 72)),
    Case("ipv6_six_ext_headers_udp",  # exactly MAX_IPV6_EXT: still parsed
         frame(eth() / ip6 / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
               / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / UDP(sport=7, dport=9)),
         F6(7, 9, UDP_P, 96)),
    Case("ipv6_ah_tcp",
         frame(eth() / IPv6(src=A6, dst=B6, nh=51) / Raw(AH_TO_TCP) / TCP(sport=179, dport=40179, flags="A")),
         F6(179, 40179, TCP_P, 84, flags=ACK)),
    Case("ipv6_fragment_first",  # offset 0, M=1: the UDP header follows
         frame(eth() / ip6 / IPv6ExtHdrFragment(id=7, m=1, offset=0) / UDP(sport=4000, dport=4001)
               / (b"f" * 16)),
         F6(4000, 4001, UDP_P, 72)),
    Case("ipv6_fragment_non_first",
         frame(eth() / ip6 / IPv6ExtHdrFragment(id=7, m=0, offset=3, nh=UDP_P)
               / Raw(b"\x0f\xa0\x0f\xa1" + b"f" * 12)),
         F6(0, 0, UDP_P, 64)),
    # A non-first fragment holds the middle of the fragmentable part (which may
    # start with a destination-options header, RFC 8200 4.5): what follows the
    # fragment header is payload, never parsed as headers.  The protocol is the
    # fragment header's next header, ports 0.
    Case("ipv6_fragment_non_first_payload_like_dstopt_tcp",
         frame(eth() / ip6 / IPv6ExtHdrFragment(id=8, m=1, offset=5, nh=60)
               / Raw(bytes([TCP_P, 0]) + bytes(6) + b"\x00\x16\xc3\x50" + bytes(12))),
         F6(0, 0, 60, 72)),
    Case("ipv6_fragment_non_first_payload_like_long_ext_header",
         frame(eth() / ip6 / IPv6ExtHdrFragment(id=9, m=0, offset=5, nh=60) / Raw(b"\x3c\xff" + bytes(14))),
         F6(0, 0, 60, 64)),
    Case("icmpv6_echo_request",
         frame(eth() / ip6 / ICMPv6EchoRequest(id=1, seq=1, data=b"ping")),
         F6(0, 128 * 256, ICMP6_P, 52)),
    Case("ipv6_no_next_header",
         frame(eth() / IPv6(src=A6, dst=B6, nh=59)),
         F6(0, 0, 59, 40)),
    # --- not IP ----------------------------------------------------------------
    Case("arp",
         frame(eth() / ARP(op=1, hwsrc=MAC_A, psrc=A4, pdst=B4)),
         abi.Counter.NOT_IP),
    Case("lldp",
         frame(Ether(src=MAC_A, dst="01:80:c2:00:00:0e", type=0x88CC)
               / Raw(bytes.fromhex("020704020000000001040305010006020078") + bytes(2))),
         abi.Counter.NOT_IP),
    # Documented limit: the parser skips at most two VLAN tags; after two the
    # ethertype it sees is 0x8100 again, so a triple-tagged frame is NOT_IP.
    Case("three_vlan_tags",
         frame(eth() / Dot1AD(vlan=300) / Dot1Q(vlan=200) / Dot1Q(vlan=100) / ip4 / UDP(sport=1, dport=2)),
         abi.Counter.NOT_IP),
    # --- malformed / truncated -----------------------------------------------
    # A frame shorter than 14 bytes cannot be test-run (the kernel answers
    # EINVAL, see test_frame_shorter_than_ethernet_header_is_refused), so the
    # shortest truncation reachable is an 802.1Q ethertype with no tag.
    Case("truncated_vlan_tag", cut(eth() / Dot1Q(vlan=100) / ip4 / UDP(), 14), abi.Counter.UNPARSABLE),
    Case("truncated_inner_vlan_tag",
         cut(eth() / Dot1AD(vlan=200) / Dot1Q(vlan=100) / ip4 / UDP(), 20), abi.Counter.UNPARSABLE),
    Case("truncated_ipv4_header", cut(eth() / ip4 / UDP(), 14 + 19), abi.Counter.UNPARSABLE),
    Case("ipv4_ihl_4", frame(eth() / IP(src=A4, dst=B4, ihl=4) / UDP(sport=1, dport=2)),
         abi.Counter.UNPARSABLE),
    Case("ipv4_version_6_under_0800", frame(eth(type=0x0800) / IP(src=A4, dst=B4, version=6) / UDP()),
         abi.Counter.UNPARSABLE),
    Case("ipv4_tot_len_below_ihl", frame(eth() / IP(src=A4, dst=B4, len=19) / UDP()), abi.Counter.UNPARSABLE),
    Case("ipv4_ihl_beyond_frame",  # ihl 15 (60 bytes) but only 20 + 8 present
         bytes(eth() / IP(src=A4, dst=B4, ihl=15, len=80) / UDP()), abi.Counter.UNPARSABLE),
    Case("truncated_tcp_header", cut(eth() / ip4 / TCP(sport=1, dport=2), 14 + 20 + 19),
         abi.Counter.UNPARSABLE),
    Case("truncated_udp_header", cut(eth() / ip4 / UDP(sport=1, dport=2), 14 + 20 + 7),
         abi.Counter.UNPARSABLE),
    Case("truncated_icmp_header", cut(eth() / ip4 / ICMP(type=8), 14 + 20 + 1), abi.Counter.UNPARSABLE),
    Case("truncated_ipv6_header", cut(eth() / ip6 / UDP(), 14 + 39), abi.Counter.UNPARSABLE),
    Case("truncated_ipv6_ext_header", cut(eth() / ip6 / IPv6ExtHdrHopByHop() / UDP(), 14 + 40 + 1),
         abi.Counter.UNPARSABLE),
    Case("truncated_ipv6_fragment_header", cut(eth() / ip6 / IPv6ExtHdrFragment() / UDP(), 14 + 40 + 7),
         abi.Counter.UNPARSABLE),
    Case("ipv6_version_4_under_86dd", frame(eth(type=0x86DD) / IPv6(src=A6, dst=B6, version=4) / UDP()),
         abi.Counter.UNPARSABLE),
    Case("ipv6_seven_ext_headers",  # one more than MAX_IPV6_EXT = 6
         frame(eth() / ip6 / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
               / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
               / UDP(sport=7, dport=9)),
         abi.Counter.UNPARSABLE),
]


def test_case_names_unique() -> None:
    assert len({c.name for c in CASES}) == len(CASES)


def key_fields(key: np.void) -> dict[str, object]:
    return {name: key[name].tobytes() if name.endswith("_addr") else int(key[name])
            for name in abi.FLOW_KEY_DTYPE.names or ()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_parser(harness: Harness, case: Case) -> None:
    res, delta = harness.measure(case.pkt)

    assert res.retval == harness.XDP_PASS
    assert res.data_out == case.pkt  # the meter never changes traffic
    keys, values = harness.flows()

    if isinstance(case.expect, abi.Counter):
        assert delta == {abi.Counter.PACKETS_SEEN: 1, case.expect: 1}
        assert len(keys) == 0
        return

    e = case.expect
    assert delta == {abi.Counter.PACKETS_SEEN: 1, abi.Counter.METERED: 1}
    assert len(keys) == 1
    assert key_fields(keys[0]) == {
        "src_addr": e.src,
        "dst_addr": e.dst,
        "ifindex": IFINDEX,
        "src_port": e.src_port,
        "dst_port": e.dst_port,
        "protocol": e.protocol,
        "ip_version": e.ip_version,
        "tos": e.tos,
        "direction": 0,
        "vlan_id": e.vlan_id,
        "inner_vlan_id": e.inner_vlan_id,
    }
    v = values[0]
    assert (int(v["packets"]), int(v["bytes"]), int(v["tcp_flags"])) == (1, e.bytes, e.tcp_flags)
    assert int(v["first_seen_ns"]) == int(v["last_seen_ns"]) > 0


def test_frame_shorter_than_ethernet_header_is_refused(harness: Harness) -> None:
    """BPF_PROG_TEST_RUN refuses XDP input under ETH_HLEN (14) with EINVAL,
    so the program's own "truncated Ethernet" branch cannot be reached from
    a test run; the program never runs, and no counter moves."""
    before = harness.counters()
    with pytest.raises(OSError) as info:
        harness.run(cut(eth() / ip4 / UDP(), 10))
    assert info.value.errno == 22  # EINVAL
    assert harness.delta(before, harness.counters()) == {}
