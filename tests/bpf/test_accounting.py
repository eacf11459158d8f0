"""What the XDP program adds up: packets, bytes, TCP flags, timestamps,
flow ids, and the cache-full path, run through BPF_PROG_TEST_RUN."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from pyflow.kernel import abi, bpfsys
from tests.bpf.conftest import xdp_ctx

if TYPE_CHECKING:
    from tests.bpf.conftest import Harness

pytestmark = pytest.mark.root

C = abi.Counter
A4, B4 = "192.0.2.10", "198.51.100.20"
V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def eth() -> Ether:
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def udp(sport: int, payload: int = 100, dport: int = 53) -> bytes:
    """An IPv4/UDP frame whose IP total length is 28 + payload."""
    return bytes(eth() / IP(src=A4, dst=B4) / UDP(sport=sport, dport=dport) / (b"u" * payload))


def tcp(flags: str, payload: bytes = b"") -> bytes:
    return bytes(eth() / IP(src=A4, dst=B4) / TCP(sport=40000, dport=443, flags=flags) / payload)


def boottime_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


@pytest.fixture
def one_cpu() -> Iterator[int]:
    """Pin this thread to one CPU: BPF_PROG_TEST_RUN runs the program on the
    caller's CPU, so per-CPU state (flow_seq, counters) is predictable."""
    old = os.sched_getaffinity(0)
    cpu = min(old)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, old)


def test_same_flow_n_times_is_one_entry(harness: Harness) -> None:
    n = 7
    pkt = udp(5000, payload=100)
    before = harness.counters()
    for _ in range(n):
        assert harness.run(pkt) == harness.XDP_PASS
    assert harness.delta(before, harness.counters()) == {C.PACKETS_SEEN: n, C.METERED: n}

    keys, values = harness.flows()
    assert len(keys) == 1
    assert keys[0]["src_addr"].tobytes() == V4_MAPPED_PREFIX + bytes([192, 0, 2, 10])
    assert (int(keys[0]["src_port"]), int(keys[0]["dst_port"]), int(keys[0]["protocol"])) == (5000, 53, 17)
    assert int(values[0]["packets"]) == n
    assert int(values[0]["bytes"]) == n * 128  # IP total length 20 + 8 + 100, not the 142-byte frame
    assert int(values[0]["tcp_flags"]) == 0


def test_tcp_flags_are_ored(harness: Harness) -> None:
    steps = [("S", 0x02), ("A", 0x12), ("FA", 0x13)]
    for flags, expected_or in steps:
        assert harness.run(tcp(flags)) == harness.XDP_PASS
        keys, values = harness.flows()
        assert len(keys) == 1
        assert int(values[0]["tcp_flags"]) == expected_or
    assert int(values[0]["packets"]) == 3
    assert int(values[0]["bytes"]) == 3 * 40


def test_packets_with_payload_and_different_sizes_add_exact_bytes(harness: Harness) -> None:
    sizes = [0, 1, 100, 1400]
    for size in sizes:
        harness.run(udp(6000, payload=size))
    _, values = harness.flows()
    assert len(values) == 1
    assert int(values[0]["packets"]) == len(sizes)
    assert int(values[0]["bytes"]) == sum(28 + s for s in sizes)


def test_cache_full(tiny_harness: Harness) -> None:
    h = tiny_harness
    flows = [udp(10000 + i, payload=10) for i in range(10)]
    before = h.counters()
    for pkt in flows:
        assert h.run(pkt) == h.XDP_PASS
    delta = h.delta(before, h.counters())
    assert delta == {C.PACKETS_SEEN: 10, C.METERED: 4, C.CACHE_FULL: 6}
    # every packet ended up somewhere
    assert delta[C.PACKETS_SEEN] == delta[C.METERED] + delta[C.CACHE_FULL]

    keys, values = h.flows()
    assert len(keys) == 4
    # the first four flows got the entries; the other six found no room
    assert sorted(int(p) for p in keys["src_port"]) == [10000, 10001, 10002, 10003]
    assert [int(p) for p in values["packets"]] == [1, 1, 1, 1]
    assert [int(b) for b in values["bytes"]] == [38, 38, 38, 38]

    # A full cache still meters the flows it holds.
    before = h.counters()
    assert h.run(flows[0]) == h.XDP_PASS
    assert h.delta(before, h.counters()) == {C.PACKETS_SEEN: 1, C.METERED: 1}
    keys, values = h.flows()
    by_port = {int(k["src_port"]): int(v["packets"]) for k, v in zip(keys, values, strict=True)}
    assert by_port == {10000: 2, 10001: 1, 10002: 1, 10003: 1}


def test_timestamps_are_boottime(harness: Harness) -> None:
    pkt = udp(7000)
    t0 = boottime_ns()
    harness.run(pkt)
    t1 = boottime_ns()
    time.sleep(0.002)
    t2 = boottime_ns()
    harness.run(pkt)
    t3 = boottime_ns()

    _, values = harness.flows()
    assert len(values) == 1
    first, last = int(values[0]["first_seen_ns"]), int(values[0]["last_seen_ns"])
    assert t0 <= first <= t1
    assert t2 <= last <= t3
    assert first < last


def test_flow_ids_are_distinct_and_stable(harness: Harness, one_cpu: int) -> None:
    n = 10
    for i in range(n):
        harness.run(udp(20000 + i))
    keys, values = harness.flows()
    ids = [int(v) for v in values["flow_id"]]
    assert len(ids) == n
    assert len(set(ids)) == n
    # id = cpu << 48 | per-CPU sequence: all on our CPU, consecutive in creation order
    assert {i >> 48 for i in ids} == {one_cpu}
    seqs = [i & ((1 << 48) - 1) for i in ids]
    assert seqs == list(range(seqs[0], seqs[0] + n))
    assert [int(p) for p in keys["src_port"]] == [20000 + i for i in range(n)]

    # More packets for an existing flow never change its id.
    harness.run(udp(20000))
    _, again = harness.flows()
    assert [int(v) for v in again["flow_id"]] == ids


def test_counters_are_kept_per_interface_and_hook(harness: Harness) -> None:
    """Scrape-time stats: per (ifindex, hook), packets by outcome and metered IP bytes."""
    key = (1, int(abi.Hook.XDP))  # the harness runs packets as if received on lo (ifindex 1)
    before = harness.meter.read_iface_stats().get(key)
    pkt = bytes(Ether() / IP(src="192.0.2.7", dst="192.0.2.8") / UDP(sport=7, dport=9) / (b"z" * 72))
    harness.run(pkt)
    harness.run(pkt)
    harness.run(bytes(Ether(type=0x0806) / (b"\x00" * 28)))  # ARP: seen, not IP
    after = harness.meter.read_iface_stats()[key]
    c0 = before["counters"] if before is not None else np.zeros(abi.COUNTER_MAX, dtype=np.uint64)
    b0 = int(before["metered_bytes"]) if before is not None else 0
    moved = {abi.Counter(i): int(n) for i, n in enumerate(after["counters"] - c0) if n}
    assert moved == {abi.Counter.PACKETS_SEEN: 3, abi.Counter.METERED: 2, abi.Counter.NOT_IP: 1}
    assert int(after["metered_bytes"]) - b0 == 2 * (20 + 8 + 72)


def test_large_ifindex_is_counted_in_the_hash(harness: Harness) -> None:
    """ifindex beyond the per-CPU array (1024) lands in the per-CPU hash, under its own key."""
    ifindex = 4242
    subprocess.run(["ip", "link", "del", "pfbig0"], capture_output=True)
    subprocess.run(["ip", "link", "add", "pfbig0", "index", str(ifindex), "type", "veth", "peer", "name", "pfbig1"],
                   check=True)
    try:
        pkt = bytes(Ether() / IP(src="192.0.2.9", dst="192.0.2.10") / UDP(sport=1, dport=2) / (b"q" * 12))
        res = bpfsys.prog_test_run(harness.meter.prog_fd or 0, pkt, ctx=xdp_ctx(pkt, ifindex))
        assert res.retval == harness.XDP_PASS
        st = harness.meter.read_iface_stats()[(ifindex, int(abi.Hook.XDP))]
        assert int(st["counters"][abi.Counter.METERED]) == 1
        assert int(st["metered_bytes"]) == 20 + 8 + 12
        keys, _ = harness.flows()
        assert ifindex in keys["ifindex"].tolist()
    finally:
        subprocess.run(["ip", "link", "del", "pfbig0"], capture_output=True)


def test_flows_created_counts_inserts_only(tiny_harness: Harness) -> None:
    """flow_seq sums to the entries created: a full cache's failed inserts do not count."""
    before = tiny_harness.meter.flows_created()
    for i in range(10):
        tiny_harness.run(bytes(Ether() / IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=3000 + i, dport=53)))
    assert tiny_harness.meter.flows_created() - before == 4
