"""Exact at scale: flows that resume after their inactive timeout, and a burst of expiring flows.

Two namespaces joined by a veth pair; pyflow meters the receiving end and exports IPFIX to
nfcapd (stock settings: no -B) in the receiving namespace; frames leave the other end from an
AF_PACKET socket as fast as it takes them.  Whatever the timing, the totals must be exact
at nfcapd with every kernel not-metered counter at 0; the timing only decides how often the
resume map is used, which the tests print (tests/bpf check that path deterministically).

* one flow: one packet, idle just past its inactive timeout, then 50,000 packets at full speed:
  two records at nfcapd, 1 and 50,000 packets (the resumed traffic is one new flow);
* 10,000 flows the same way, 20 packets each after the gap: two records per flow, 1 and 20;
* 100,000 one-packet flows in one burst, expiring in one sweep: all 100,000 records at nfcapd,
  sent at the target's default pace (max-rate), none dropped by the collector's socket;
* in each, the agent's peak resident memory (VmHWM) stays under AGENT_PEAK_KIB.
"""

from __future__ import annotations

import collections
import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from tests.integration.netns import Pair, veth_pair
from tests.integration.procs import nfcapd_in, nfdump_records, pyflow_in, wait_drained
from tests.integration.reliability import (
    metric_sum,
    metrics_in,
    send_frames,
    udp_drops_in,
    wait_until,
)

PORT = 21301
INACTIVE_S = 1.0
# The agent's peak resident memory over a run (VmHWM): records are built and sent in bounded
# chunks, so a 100,000-flow burst must not grow it without bound (measured: 55, 63 and 102 MiB
# in the three tests below).
AGENT_PEAK_KIB = 192 * 1024


@pytest.fixture
def pair() -> Iterator[Pair]:
    with veth_pair("sc") as p:
        yield p


def frames(pair: Pair, flows: int, payload: int = 18) -> list[bytes]:
    """One UDP frame per flow: (source port, destination port) distinct, the IP header the same
    for all (so its checksum is too; the UDP checksum is 0, "none", as IPv4 allows)."""
    base = bytes(Ether(src=pair.macs["a"], dst=pair.macs["b"]) / IP(src=pair.a_v4, dst=pair.b_v4)
                 / UDP(sport=1, dport=1, chksum=0) / (b"s" * payload))
    l4 = 14 + 20
    out = []
    for i in range(flows):
        sport, dport = 1024 + i % 60000, 7000 + i // 60000
        out.append(base[:l4] + struct.pack("!HH", sport, dport) + base[l4 + 4:])
    return out


def run_meter(pair: Pair, *extra: str, target_opts: str = "") -> Iterator[object]:
    return pyflow_in(pair.b, "--interface", pair.b_if, "--hook", "tc", "--control-socket", "",
                     "--inactive-flow-timeout", f"{int(INACTIVE_S * 1000)}ms",
                     "--target", f"127.0.0.1:{PORT}/ipfix{target_opts}", *extra)


Collected = tuple[list[dict[str, str]], dict[str, float]]


def wait_sent(pair: Pair, idle_records: int) -> None:
    """Until ``idle_records`` records left by the inactive timeout and every queue is empty."""

    def sent() -> bool:
        m = metrics_in(pair.b)
        return (metric_sum(m, "pyflow_flow_records_total", reason="idle") >= idle_records
                and metric_sum(m, "pyflow_export_queued_records") == 0)

    wait_until(f"{idle_records} idle records sent", sent, timeout=60)


def vm_hwm_kib(pid: int) -> int:
    """The peak resident set of ``pid`` (``ip netns exec`` execs pyflow: the agent's own pid)."""
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1])


def meter_and_collect(pair: Pair, tmp_path: Path, first: list[bytes], then: list[bytes],
                      extra: tuple[str, ...] = (), idle_records: int = 0, target_opts: str = "") -> Collected:
    """Send ``first``, wait just past the inactive timeout, send ``then``; with ``idle_records``,
    wait until that many records left by the inactive timeout and were sent; stop pyflow (clean
    flush) and return nfcapd's records and pyflow's last metrics."""
    total = len(first) + len(then)
    with nfcapd_in(pair.b, tmp_path, PORT) as collector, run_meter(pair, *extra, target_opts=target_opts) as flow:
        flow.wait_for_line(f"metering {pair.b_if}")  # type: ignore[attr-defined]
        send_frames(pair.a, pair.a_if, first)
        wait_until("the first frames metered",
                   lambda: metric_sum(metrics_in(pair.b), "pyflow_packets_seen_total") >= len(first))
        t_first = time.monotonic()  # the kernel has stamped every first frame by now, under load too
        time.sleep(max(0.0, t_first + INACTIVE_S + 0.002 - time.monotonic()))  # just past the timeout
        send_frames(pair.a, pair.a_if, then)
        wait_until("every frame metered",
                   lambda: metric_sum(metrics_in(pair.b), "pyflow_packets_seen_total") >= total, timeout=60)
        if idle_records:
            wait_sent(pair, idle_records)
        samples = metrics_in(pair.b)
        peak_kib = vm_hwm_kib(flow.p.pid)  # type: ignore[attr-defined]
        assert flow.stop() == 0, flow.output()  # type: ignore[attr-defined]
        m = re.search(r": (\d+) records in (\d+) datagrams", flow.output())  # type: ignore[attr-defined]
        assert m, flow.output()  # type: ignore[attr-defined]
        wait_drained(pair.b, [PORT])
        drops = udp_drops_in(pair.b, PORT)
    assert drops == 0, f"nfcapd's socket dropped {drops} datagrams"
    print(f"agent peak RSS (VmHWM) {peak_kib / 1024:.0f} MiB")
    assert peak_kib <= AGENT_PEAK_KIB, f"agent peak RSS {peak_kib} KiB"
    assert "Sequence Errors: 0" in collector.summary(), collector.proc.output()
    return nfdump_records(collector.flowdir), samples


def check_kernel(samples: dict[str, float], total: int) -> None:
    """Every packet seen is in a flow entry: every not-metered counter at 0."""
    assert metric_sum(samples, "pyflow_packets_seen_total") == total
    assert metric_sum(samples, "pyflow_packets_metered_total") == total
    not_metered = {k: v for k, v in samples.items() if k.startswith("pyflow_packets_not_metered_total") and v}
    assert not not_metered, not_metered


def per_flow(rows: list[dict[str, str]], pair: Pair) -> dict[tuple[int, int], list[int]]:
    out: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
    for r in rows:
        if r["sa"] == pair.a_v4 and r["pr"].upper() in ("UDP", "17"):
            out[(int(r["sp"]), int(r["dp"]))].append(int(r["ipkt"]))
    return {k: sorted(v) for k, v in out.items()}


def test_one_flow_resuming_at_full_speed_after_its_timeout(pair: Pair, tmp_path: Path) -> None:
    (f,) = frames(pair, 1)
    rows, samples = meter_and_collect(pair, tmp_path, [f], [f] * 50_000)
    check_kernel(samples, 50_001)
    print(f"resumed: {metric_sum(samples, 'pyflow_packets_resumed_total'):.0f} packets went to the resume map")
    assert per_flow(rows, pair) == {(1024, 7000): [1, 50_000]}


def test_ten_thousand_flows_resuming_at_once(pair: Pair, tmp_path: Path) -> None:
    fs = frames(pair, 10_000)
    rows, samples = meter_and_collect(pair, tmp_path, fs, [f for f in fs for _ in range(20)])
    check_kernel(samples, 10_000 * 21)
    print(f"resumed: {metric_sum(samples, 'pyflow_packets_resumed_total'):.0f} packets went to the resume map")
    got = per_flow(rows, pair)
    assert len(got) == 10_000
    assert collections.Counter(tuple(v) for v in got.values()) == {(1, 20): 10_000}


def test_an_expiry_burst_reaches_a_stock_collector_whole(pair: Pair, tmp_path: Path) -> None:
    """100,000 one-packet flows expire in one sweep; the target's default pace keeps nfcapd whole."""
    fs = frames(pair, 100_000, payload=4)
    rows, samples = meter_and_collect(pair, tmp_path, fs, [], extra=("--cache-entries", "256k"), idle_records=100_000)
    check_kernel(samples, 100_000)
    assert metric_sum(samples, "pyflow_flow_records_total", reason="idle") == 100_000
    assert metric_sum(samples, "pyflow_export_queue_dropped_records_total") == 0
    got = per_flow(rows, pair)
    assert len(got) == 100_000 and all(v == [1] for v in got.values())
