"""Every per-flow detail field lands in the map as the packets say.

Crafted packets run through the real program with BPF_PROG_TEST_RUN (XDP
and both TC entry points), then the one flow entry they made is read back
from the map and compared field by field.  First-packet fields must keep the
first packet's value; min/max pairs and TCP flags must follow every packet.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet, Raw

from pyflow.kernel import abi, bpfsys
from pyflow.records import addr_to_16
from tests.bpf.conftest import TC_ACT_UNSPEC, TEST_IFINDEX, skb_ctx, xdp_ctx

if TYPE_CHECKING:
    from tests.bpf.conftest import Harness

pytestmark = pytest.mark.root

MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"
A4, B4 = "192.0.2.1", "198.51.100.2"
A6, B6 = "2001:db8::1", "2001:db8:ffff::2"


def frame(pkt: Packet) -> bytes:
    raw = bytes(pkt)
    return raw + bytes(max(0, 60 - len(raw)))


def eth() -> Ether:
    return Ether(src=MAC_A, dst=MAC_B)


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def only_entry(h: Harness) -> tuple[Any, Any]:
    keys, values = h.flows()
    assert len(keys) == 1, f"expected one flow entry, found {len(keys)}"
    return keys[0], values[0]


def xdp(h: Harness, *pkts: bytes) -> None:
    for pkt in pkts:
        res = h.test_run(pkt)
        assert res.retval == h.XDP_PASS
        assert res.data_out == pkt


# -- XDP: one flow per case, its fields after the packets ------------------------

CASES: list[tuple[str, list[Packet], dict[str, Any]]] = [
    (
        "ttl and tcp: SYN (TTL 37) then ACK (TTL 64): min 37 max 64, flags 0x12, first packet's seq/ack/window",
        [
            eth() / IP(src=A4, dst=B4, ttl=37) / TCP(sport=40000, dport=443, flags="S", seq=1000, window=29200),
            eth() / IP(src=A4, dst=B4, ttl=64) / TCP(sport=40000, dport=443, flags="A", seq=1001, ack=77,
                                                     window=500) / Raw(b"x" * 100),
        ],
        {"ttl_min": 37, "ttl_max": 64, "tcp_flags": 0x12, "tcp_seq": 1000, "tcp_ack": 0, "tcp_window": 29200,
         "length_min": 40, "length_max": 140, "ip_header_length": 20, "packets": 2, "bytes": 180,
         "src_mac": mac(MAC_A), "dst_mac": mac(MAC_B), "key.vlan_id": 0, "udp_length": 0, "igmp_type": 0},
    ),
    (
        "icmp echo: type 8 code 0 in the key's dst port",
        [eth() / IP(src=A4, dst=B4, ttl=200) / ICMP(type=8, code=0)],
        {"key.dst_port": 8 * 256, "key.protocol": 1, "ttl_min": 200, "ttl_max": 200, "length_min": 28},
    ),
    (
        "vlan 42 tag: the id, not the priority bits",
        [Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=42, prio=5) / IP(src=A4, dst=B4) / UDP(sport=5, dport=53)
         / Raw(b"q" * 12)],
        {"key.vlan_id": 42, "key.inner_vlan_id": 0, "udp_length": 20, "length_min": 40},
    ),
    (
        "ipv6 flow label 0xabcde, hop limit, header length 40",
        [eth() / IPv6(src=A6, dst=B6, fl=0xABCDE, hlim=9, tc=0x28) / UDP(sport=1, dport=2) / Raw(b"z" * 8)],
        {"flow_label": 0xABCDE, "ttl_min": 9, "ttl_max": 9, "ip_header_length": 40, "length_min": 56,
         "key.tos": 0x28, "udp_length": 16},
    ),
    (
        "igmp v2 membership report (type 0x16) with router alert: ip header 24",
        [eth() / IP(src=A4, dst="239.1.2.3", proto=2, ttl=1, options=[IPOption_Router_Alert()])
         / Raw(bytes.fromhex("1600fa04ef010203"))],
        {"igmp_type": 0x16, "ip_header_length": 24, "ttl_min": 1, "length_min": 32},
    ),
]


@pytest.mark.parametrize(("pkts", "expect"), [(p, e) for _, p, e in CASES], ids=[n.split(":")[0] for n, _, _ in CASES])
def test_xdp_fields(harness: Harness, pkts: list[Packet], expect: dict[str, Any]) -> None:
    xdp(harness, *(frame(p) for p in pkts))
    key, value = only_entry(harness)
    got = {name: (key[name[4:]] if name.startswith("key.") else value[name]) for name in expect}
    got = {k: bytes(v) if getattr(v, "dtype", None) is not None and v.dtype.kind == "V" else int(v)
           for k, v in got.items()}
    assert got == expect
    assert value["in_ifindex"] == TEST_IFINDEX


def test_first_packet_fields_do_not_follow_later_packets(harness: Harness) -> None:
    first = eth() / IP(src=A4, dst=B4) / UDP(sport=9, dport=9) / Raw(b"a" * 10)
    later = Ether(src="02:00:00:00:00:ff", dst=MAC_B) / IP(src=A4, dst=B4) / UDP(sport=9, dport=9) / Raw(b"b" * 90)
    xdp(harness, frame(first), frame(later), frame(first))
    _, value = only_entry(harness)
    assert (value["udp_length"], bytes(value["src_mac"])) == (18, mac(MAC_A))
    assert (value["length_min"], value["length_max"], value["packets"]) == (38, 118, 3)


# -- TC: both entry points, GSO, the in/out interfaces ----------------------------


def tc_run(h: Harness, hook: str, pkt: bytes, **ctx: int) -> bpfsys.TestRunResult:
    fd = h.meter.prog_fd_of(hook)
    res = bpfsys.prog_test_run(fd, pkt, ctx=skb_ctx(**ctx))
    assert res.retval == TC_ACT_UNSPEC  # never a verdict: the next filter or qdisc decides, as without pyflow
    assert res.data_out == pkt
    return res


def test_tc_egress_flow_is_outbound_with_the_metered_interface_as_out(harness: Harness) -> None:
    pkt = frame(eth() / IP(src=A4, dst=B4, ttl=63) / TCP(sport=1, dport=2, flags="PA") / Raw(b"d" * 20))
    before = harness.counters()
    tc_run(harness, "tc_egress", pkt)
    key, value = only_entry(harness)
    assert (key["direction"], key["ifindex"]) == (1, TEST_IFINDEX)
    assert (value["in_ifindex"], value["out_ifindex"]) == (0, TEST_IFINDEX)  # sent by this host
    assert (value["packets"], value["bytes"], value["ttl_min"]) == (1, 60, 63)
    stats = harness.meter.read_iface_stats()
    assert stats[(TEST_IFINDEX, abi.Hook.TC_EGRESS)]["counters"][abi.Counter.METERED] >= 1
    assert harness.delta(before, harness.counters()) == {abi.Counter.PACKETS_SEEN: 1, abi.Counter.METERED: 1}


def test_tc_ingress_flow_is_inbound(harness: Harness) -> None:
    pkt = frame(eth() / IPv6(src=A6, dst=B6) / UDP(sport=3, dport=4) / Raw(b"e" * 30))
    tc_run(harness, "tc_ingress", pkt)
    key, value = only_entry(harness)
    assert (key["direction"], key["ifindex"], value["in_ifindex"]) == (0, TEST_IFINDEX, TEST_IFINDEX)
    assert value["bytes"] == 40 + 8 + 30


def test_gso_super_packet_counts_as_its_segments(harness: Harness) -> None:
    """3 segments of at most 1000 payload bytes from one 2500-byte TCP payload skb."""
    pkt = bytes(eth() / IP(src=A4, dst=B4) / TCP(sport=5, dport=6, flags="A") / Raw(b"g" * 2500))
    before = harness.counters()
    tc_run(harness, "tc_egress", pkt, gso_segs=3, gso_size=1000)
    _, value = only_entry(harness)
    # on the wire: 1040 + 1040 + 540 IP bytes
    assert (value["packets"], value["bytes"]) == (3, 2620)
    assert (value["length_min"], value["length_max"]) == (540, 1040)
    assert harness.delta(before, harness.counters()) == {abi.Counter.PACKETS_SEEN: 3, abi.Counter.METERED: 3}


# -- own exports -----------------------------------------------------------------


def test_own_export_datagrams_are_counted_not_metered(harness: Harness) -> None:
    harness.meter.exclude_own_export("10.0.0.1", 40001, "10.0.0.2", 2055)
    own = frame(eth() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=40001, dport=2055) / Raw(b"\x00\x0a"))
    other = frame(eth() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=40002, dport=2055) / Raw(b"\x00\x0a"))
    before = harness.counters()
    tc_run(harness, "tc_egress", own)
    assert harness.flows()[0].size == 0
    assert harness.delta(before, harness.counters()) == {abi.Counter.PACKETS_SEEN: 1, abi.Counter.OWN_EXPORT: 1}
    tc_run(harness, "tc_egress", other)
    key, _ = only_entry(harness)
    assert key["src_port"] == 40002


# -- fib: out-interface and gateway of a routed flow, in a namespace of our own ----


@contextlib.contextmanager
def fib_namespace() -> Iterator[dict[str, int]]:
    """A router namespace: in0 (10.77.1.1/24), out0 (10.77.2.1/24), a route to 203.0.113.0/24
    via 10.77.2.254 and forwarding on; the peers of both veths stay in it too."""
    ns = f"pffib{os.getpid() % 100000}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)

    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        ip("link", "add", "in0", "type", "veth", "peer", "name", "in1")
        ip("link", "add", "out0", "type", "veth", "peer", "name", "out1")
        for dev in ("in0", "in1", "out0", "out1", "lo"):
            ip("link", "set", dev, "up")
        ip("addr", "add", "10.77.1.1/24", "dev", "in0")
        ip("addr", "add", "10.77.2.1/24", "dev", "out0")
        ip("addr", "add", "fd77:2::1/64", "dev", "out0", "nodad")
        ip("route", "add", "203.0.113.0/24", "via", "10.77.2.254", "dev", "out0")
        ip("route", "add", "2001:db8:77::/48", "via", "fd77:2::fe", "dev", "out0")
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.all.forwarding=1",
                        "net.ipv6.conf.all.forwarding=1"], check=True)
        idx: dict[str, int] = {}
        out = subprocess.run(["ip", "-n", ns, "-o", "link"], check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            num, name = line.split(":")[:2]
            idx[name.strip().split("@")[0]] = int(num)
        yield {"ns": ns, **idx}  # type: ignore[dict-item]
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def run_in_ns(ns: str, fn: Any) -> Any:
    from tests.integration.netns import in_netns

    return in_netns(ns, fn)


def test_fib_gives_out_interface_and_gateway_of_routed_flows(harness: Harness) -> None:
    with fib_namespace() as env:
        ns = str(env["ns"])
        routed4 = frame(eth() / IP(src="10.77.1.5", dst="203.0.113.9") / UDP(sport=7, dport=8))
        direct4 = frame(eth() / IP(src="10.77.1.5", dst="10.77.2.9") / UDP(sport=7, dport=8))
        routed6 = frame(eth() / IPv6(src="fd77:1::5", dst="2001:db8:77::9") / UDP(sport=7, dport=8))
        local4 = frame(eth() / IP(src="10.77.1.5", dst="10.77.1.1") / UDP(sport=7, dport=8))
        fd = harness.meter.prog_fd_of("xdp")
        for pkt in (routed4, direct4, routed6, local4):
            # the test run resolves ingress_ifindex in the caller's namespace: run it inside ns
            res = run_in_ns(ns, lambda p=pkt: bpfsys.prog_test_run(fd, p, ctx=xdp_ctx(p, env["in0"])))
            assert res.retval == harness.XDP_PASS
        keys, values = harness.flows()
        got = {socket.inet_ntop(socket.AF_INET6, bytes(k["dst_addr"])): (int(v["out_ifindex"]), bytes(v["next_hop"]))
               for k, v in zip(keys, values, strict=True)}
    assert got == {
        "::ffff:203.0.113.9": (env["out0"], addr_to_16("10.77.2.254")),
        "::ffff:10.77.2.9": (env["out0"], bytes(16)),  # directly connected: no gateway
        "2001:db8:77::9": (env["out0"], addr_to_16("fd77:2::fe")),
        "::ffff:10.77.1.1": (0, bytes(16)),  # delivered to the host itself: no out-interface
    }
