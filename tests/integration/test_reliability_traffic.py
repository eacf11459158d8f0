"""pyflow never changes traffic: what arrives is byte for byte what arrives without it.

A mixed set of frames -- ordinary IPv4/IPv6 TCP, UDP, ICMP, VLAN and QinQ,
fragments, extension header chains, ARP, LLDP, 802.3 LLC, and malformed ones:
a bare Ethernet header, truncated IP/TCP/UDP headers, bogus IHL, IP lengths
that lie, more IPv6 extension headers than the parser follows, garbage --
crosses the veth between a and b in both directions, three times: without
pyflow, with pyflow on b's interface with XDP, and with TC on both of its
sides (``hook=tc,direction=both``).  Three captures each time:

* on b's interface (AF_PACKET): what b received, after XDP;
* a mirror of b's ingress (a ``u32 match-all ... mirred mirror`` TC filter placed
  after pyflow's, on a veth of its own): what goes on after pyflow's TC
  ingress program -- and proof that later filters still run;
* on a's interface: what b sent, after pyflow's TC egress program.

Every capture must equal the frames sent, in order, in every run, and the
program must have seen every frame (its packets_seen counters).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from tests.integration.netns import Pair, ip, veth_pair
from tests.integration.procs import pyflow_in
from tests.integration.reliability import Sniffer, metric_sum, metrics_in, send_frames, wait_until

# neither source nor destination is on the link or routed: the hosts drop these frames
# quietly, never answering them (no ICMP errors to tell apart from the test's frames)
SRC4, DST4 = "192.0.2.77", "198.51.100.77"
SRC6, DST6 = "2001:db8:1::1", "2001:db8:77::7"


@pytest.fixture
def pair() -> Iterator[Pair]:
    with veth_pair("tr") as p:
        yield p


def mixed_frames(src_mac: str, dst_mac: str) -> list[bytes]:
    e = Ether(src=src_mac, dst=dst_mac)
    ip4 = IP(src=SRC4, dst=DST4)
    ip6 = IPv6(src=SRC6, dst=DST6)
    good = [
        e / ip4 / TCP(sport=40001, dport=443, flags="S"),
        e / ip4 / TCP(sport=40002, dport=443, flags="PA", seq=7) / (b"t" * 300),
        e / ip4 / UDP(sport=40003, dport=53) / (b"u" * 64),
        e / ip4 / ICMP(type=8, id=1) / (b"i" * 56),
        e / IP(src=SRC4, dst=DST4, flags="MF") / UDP(sport=40004, dport=9) / (b"f" * 40),
        e / IP(src=SRC4, dst=DST4, proto=17, frag=100) / (b"g" * 40),
        e / Dot1Q(vlan=10) / ip4 / UDP(sport=40005, dport=9) / b"vlan",
        e / Dot1AD(vlan=20) / Dot1Q(vlan=30) / ip4 / UDP(sport=40006, dport=9) / b"qinq",
        e / ip6 / UDP(sport=40007, dport=5353) / (b"v" * 100),
        e / ip6 / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / TCP(sport=40008, dport=80, flags="S"),
        e / ip6 / IPv6ExtHdrFragment(id=5, m=1) / UDP(sport=40009, dport=9) / (b"h" * 32),
        e / IP(src=SRC4, dst=DST4) / UDP(sport=40010, dport=9) / (b"j" * 1472),  # a full 1514-byte frame
        Ether(src=src_mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc="192.0.2.77", pdst="10.199.0.99"),
        Ether(src=src_mac, dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(bytes.fromhex("020704020000000001040305")),
        Ether(src=src_mac, dst=dst_mac, type=0x0030) / Raw(b"\xaa\xaa\x03" + bytes(45)),  # 802.3 length + LLC
    ]
    seven = ip6
    for _ in range(7):
        seven = seven / IPv6ExtHdrDestOpt()
    raw_good = [bytes(p) for p in good]
    bad = [
        bytes(e)[:14],  # a bare Ethernet header
        bytes(e / ip4 / UDP())[:14 + 10],  # IPv4 header cut short
        bytes(e / ip4 / TCP(sport=1, dport=2))[:14 + 20 + 7],  # TCP header cut short
        bytes(e / ip4 / UDP(sport=1, dport=2))[:14 + 20 + 3],
        bytes(e / IP(src=SRC4, dst=DST4, ihl=3) / UDP(sport=1, dport=2)),  # IHL below 5
        bytes(e / IP(src=SRC4, dst=DST4, ihl=15, len=80) / UDP()),  # options beyond the frame
        bytes(e / IP(src=SRC4, dst=DST4, len=1500) / UDP(sport=3, dport=4)),  # total length lies
        bytes(e / IP(src=SRC4, dst=DST4, version=6) / UDP()),  # version 6 under 0x0800
        bytes(e / seven / UDP(sport=5, dport=6)),  # more extension headers than the parser follows
        bytes(e / IPv6(src=SRC6, dst=DST6, plen=4000) / UDP()),  # payload length lies
        bytes(e / Dot1Q(vlan=5))[:16],  # VLAN tag cut short
        bytes(Ether(src=src_mac, dst=dst_mac, type=0x0800)) + bytes(range(256)) * 2,  # garbage after 0x0800
        bytes(Ether(src=src_mac, dst=dst_mac, type=0x86DD)) + b"\xff" * 70,  # garbage after 0x86DD
    ]
    return raw_good + bad


def setup_mirror(pair: Pair) -> None:
    """In b: a veth of its own (mir0 -> mir1) and, after any filter of pyflow's, a TC filter
    that mirrors everything b_if receives out of mir0."""
    ns = pair.b
    ip("-n", ns, "link", "add", "mir0", "type", "veth", "peer", "name", "mir1")
    for dev in ("mir0", "mir1"):
        ip("-n", ns, "link", "set", dev, "addrgenmode", "none")
        ip("-n", ns, "link", "set", dev, "multicast", "off", "arp", "off", "up")
    tc = ["ip", "netns", "exec", ns, "tc"]
    subprocess.run([*tc, "qdisc", "add", "dev", pair.b_if, "clsact"], check=True)
    subprocess.run([*tc, "filter", "add", "dev", pair.b_if, "ingress", "prio", "10", "protocol", "all",
                    "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "mirror", "dev", "mir0"],
                   check=True)


def marker(src_mac: str, dst_mac: str, n: int) -> bytes:
    """The last frame of each exchange (local experimental ethertype): once a capture has it,
    it has everything sent before it on that path."""
    return bytes(Ether(src=src_mac, dst=dst_mac, type=0x88B5) / Raw(b"pyflow-marker-%d" % n + bytes(32)))


def exchange(pair: Pair, frames_ab: list[bytes], frames_ba: list[bytes], n: int) -> dict[str, list[bytes]]:
    """Send a->b and b->a, each followed by a marker; the three captures, up to the marker and
    without what the hosts sent of their own accord (MLD reports, ...)."""
    m_ab, m_ba = marker(pair.macs["a"], pair.macs["b"], n), marker(pair.macs["b"], pair.macs["a"], n)
    with ExitStack() as stack:
        sniffers = {
            "b received": Sniffer(pair.b, pair.b_if),
            "after b's ingress filters": Sniffer(pair.b, "mir1"),
            "a received": Sniffer(pair.a, pair.a_if),
        }
        for s in sniffers.values():
            stack.callback(s.close)
        send_frames(pair.a, pair.a_if, [*frames_ab, m_ab])
        send_frames(pair.b, pair.b_if, [*frames_ba, m_ba])
        out = {}
        for name, s in sniffers.items():
            sent, last = (frames_ba, m_ba) if name == "a received" else (frames_ab, m_ab)
            wait_until(f"the marker on '{name}'", lambda s=s, last=last: last in s.frames, timeout=15)
            got = s.frames[:s.frames.index(last)]
            # a frame changed on the way would not be one of those sent: it goes missing below
            out[name] = [f for f in got if f in sent]
        return out


def test_traffic_is_unchanged_with_xdp_and_with_tc(pair: Pair, tmp_path: Path) -> None:
    frames_ab = mixed_frames(pair.macs["a"], pair.macs["b"])
    frames_ba = mixed_frames(pair.macs["b"], pair.macs["a"])
    setup_mirror(pair)
    baseline = exchange(pair, frames_ab, frames_ba, 0)
    # The kernel itself drops two of the malformed frames before some capture points, with or
    # without pyflow: the 16-byte frame whose VLAN tag is cut short (the VLAN untag fails before
    # any tap) and, on the mirror, the bare 14-byte Ethernet header.  Everything else arrives.
    assert len(baseline["b received"]) == len(frames_ab) - 1, len(baseline["b received"])
    assert len(baseline["after b's ingress filters"]) == len(frames_ab) - 2
    assert len(baseline["a received"]) == len(frames_ba) - 1
    seen: dict[str, dict[str, float]] = {}
    for n, (name, spec) in enumerate((("with XDP", pair.b_if),
                                      ("with TC on both sides", f"{pair.b_if},hook=tc,direction=both")), 1):
        with pyflow_in(pair.b, "--interface", spec, "--target", "127.0.0.1:21399/ipfix",
                       "--control-socket", "") as flow:
            flow.wait_for_line(f"metering {pair.b_if}")
            before = {h: metric_sum(metrics_in(pair.b), "pyflow_packets_seen_total", hook=h)
                      for h in ("xdp", "tc_ingress", "tc_egress")}
            captured = exchange(pair, frames_ab, frames_ba, n)
            # XDP sees every frame b_if receives; TC ingress what the kernel did not drop before it
            # (the frame with the cut VLAN tag); TC egress every frame b sends -- each plus the marker
            expect = {"xdp": len(frames_ab) + 1} if name == "with XDP" else {
                "tc_ingress": len(baseline["b received"]) + 1, "tc_egress": len(frames_ba) + 1}

            def counts(expect: dict[str, int] = expect, before: dict[str, float] = before) -> dict[str, float]:
                samples = metrics_in(pair.b)
                return {h: metric_sum(samples, "pyflow_packets_seen_total", hook=h) - before[h] for h in expect}

            wait_until(f"the program to have seen every frame: {expect}",
                       lambda expect=expect: counts() == expect, timeout=10)
            seen[name] = counts()
            assert flow.stop() == 0, flow.output()
            assert "Traceback" not in flow.output()
        for point, frames in captured.items():
            assert frames == baseline[point], (name, point)
    print(f"{len(frames_ab)} frames each way, unchanged with XDP and with TC; the program saw {seen}")
