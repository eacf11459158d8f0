"""VLAN ids that are true at every hook, and part of the flow key.

By the time TC runs, the stack has moved a received frame's outer tag out of
the frame into the skb (``skb->vlan_tci``; NICs with VLAN offload do it in
hardware), so the TC path must read the tag from the skb and the tags still
in the frame after it.  A test run cannot set ``vlan_tci`` through its
context, so these tests build the program with ``test_vlan_from_mark``: the
TC entry points first push the tag given in the skb mark (bit 16: 802.1ad)
into the skb, exactly where the receive path leaves it, and then meter the
packet as usual.  XDP still sees every tag in the frame.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Raw

from pyflow.kernel import abi, bpfsys
from pyflow.kernel.loader import FlowMeter, KernelSettings
from tests.bpf.conftest import TC_ACT_UNSPEC, TEST_IFINDEX, Harness, clean_harness, skb_ctx, xdp_ctx

pytestmark = pytest.mark.root

AD = 0x10000  # mark bit: the skb's tag is 802.1ad (an S-tag)


@pytest.fixture(scope="module")
def vlan_meter(_require_root: None) -> Iterator[FlowMeter]:
    with FlowMeter(KernelSettings(cache_entries=256, test_vlan_from_mark=True)) as meter:
        meter.load()
        yield meter


@pytest.fixture
def h(vlan_meter: FlowMeter) -> Iterator[Harness]:
    yield from clean_harness(vlan_meter)


def frame(*tags: Packet) -> bytes:
    pkt: Packet = Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b")
    for tag in tags:
        pkt = pkt / tag
    raw = bytes(pkt / IP(src="192.0.2.1", dst="198.51.100.2") / UDP(sport=4000, dport=53) / Raw(b"v" * 20))
    return raw + bytes(max(0, 60 - len(raw)))


def tc(h: Harness, hook: str, pkt: bytes, mark: int = 0) -> None:
    res = bpfsys.prog_test_run(h.meter.prog_fd_of(hook), pkt, ctx=skb_ctx(mark=mark))
    assert res.retval == TC_ACT_UNSPEC


def xdp(h: Harness, pkt: bytes) -> None:
    res = bpfsys.prog_test_run(h.meter.prog_fd_of("xdp"), pkt, ctx=xdp_ctx(pkt))
    assert res.retval == h.XDP_PASS and res.data_out == pkt


def vlans(h: Harness) -> list[tuple[int, int, int]]:
    """(outer, inner, packets) of every flow, sorted."""
    keys, values = h.flows()
    rows = zip(keys["vlan_id"], keys["inner_vlan_id"], values["packets"], strict=True)
    return sorted((int(a), int(b), int(n)) for a, b, n in rows)


@pytest.mark.parametrize("hook", ["tc_ingress", "tc_egress"])
def test_tc_reports_the_skbs_tag(h: Harness, hook: str) -> None:
    """The frame itself is untagged: the tag is only in the skb, as the stack leaves it."""
    before = h.counters()
    tc(h, hook, frame(), mark=100)
    assert vlans(h) == [(100, 0, 1)]
    assert h.delta(before, h.counters()) == {abi.Counter.PACKETS_SEEN: 1, abi.Counter.METERED: 1}


def test_tc_qinq_outer_from_the_skb_inner_from_the_frame(h: Harness) -> None:
    tc(h, "tc_ingress", frame(Dot1Q(vlan=30)), mark=AD | 20)
    assert vlans(h) == [(20, 30, 1)]


def test_tc_without_a_skb_tag_reads_both_tags_from_the_frame(h: Harness) -> None:
    tc(h, "tc_ingress", frame(Dot1AD(vlan=200), Dot1Q(vlan=100)))
    assert vlans(h) == [(200, 100, 1)]


def test_xdp_reads_both_tags_from_the_frame(h: Harness) -> None:
    xdp(h, frame(Dot1AD(vlan=200), Dot1Q(vlan=100)))
    xdp(h, frame(Dot1Q(vlan=7)))
    assert vlans(h) == [(7, 0, 1), (200, 100, 1)]


def test_priority_bits_are_not_the_vlan_id(h: Harness) -> None:
    tc(h, "tc_ingress", frame(), mark=(5 << 13) | 42)  # PCP 5, VID 42
    assert vlans(h) == [(42, 0, 1)]


def test_same_five_tuple_on_two_vlans_is_two_flows(h: Harness) -> None:
    """A trunk: the same conversation on VLAN 10 and 11 (and untagged) stays three flows, at
    XDP and at TC, each with its own packets."""
    for _ in range(3):
        xdp(h, frame(Dot1Q(vlan=10)))
    xdp(h, frame(Dot1Q(vlan=11)))
    tc(h, "tc_ingress", frame(), mark=10)
    tc(h, "tc_ingress", frame(), mark=10)
    tc(h, "tc_ingress", frame())
    keys, values = h.flows()
    assert len(keys) == 3
    # one key per (vlan, inner): XDP and TC of one VLAN share the flow (same ifindex, direction)
    assert vlans(h) == [(0, 0, 1), (10, 0, 5), (11, 0, 1)]
    assert int(np.sum(values["packets"])) == 7


# -- links without an Ethernet header (WireGuard, tun, GRE, IPIP) ----------------------------


@pytest.fixture
def l3_lo(h: Harness) -> Iterator[Harness]:
    """lo marked as an L3 link, as mark_link_layer does for a tun or WireGuard device."""

    fd = h.meter.maps["l3_links"]
    bpfsys.map_update(fd, struct.pack("=I", TEST_IFINDEX), b"\x01")
    yield h
    bpfsys.map_update(fd, struct.pack("=I", TEST_IFINDEX), b"\x00")


@pytest.mark.parametrize("hook", ["xdp", "tc_ingress", "tc_egress"])
def test_l3_link_packets_start_with_the_ip_header(l3_lo: Harness, hook: str) -> None:
    from scapy.layers.inet6 import IPv6

    v4 = bytes(IP(src="192.0.2.1", dst="198.51.100.2") / UDP(sport=4000, dport=53) / Raw(b"w" * 20))
    v6 = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=4000, dport=53) / Raw(b"w" * 20))
    before = l3_lo.counters()
    for pkt in (v4, v4, v6):
        if hook == "xdp":
            xdp(l3_lo, pkt)
        else:
            tc(l3_lo, hook, pkt)
    keys, values = l3_lo.flows()
    got = sorted((int(k["ip_version"]), int(k["src_port"]), int(v["packets"]), int(v["bytes"]),
                  bytes(v["src_mac"])) for k, v in zip(keys, values, strict=True))
    assert got == [(4, 4000, 2, 96, bytes(6)), (6, 4000, 1, 68, bytes(6))]  # no MACs on an L3 link
    assert l3_lo.delta(before, l3_lo.counters()) == {abi.Counter.PACKETS_SEEN: 3, abi.Counter.METERED: 3}


def test_unmarked_link_parses_ethernet(h: Harness) -> None:
    """The same bytes on an Ethernet link are no Ethernet frame of IP: not metered, and counted so."""
    pkt = bytes(IP(src="192.0.2.1", dst="198.51.100.2") / UDP(sport=4000, dport=53) / Raw(b"w" * 20))
    before = h.counters()
    xdp(h, pkt)
    assert len(h.flows()[0]) == 0
    assert h.delta(before, h.counters()) == {abi.Counter.PACKETS_SEEN: 1, abi.Counter.NOT_IP: 1}
