"""The walking skeleton end to end: real packets on a veth, the real XDP meter,
the agent's sweep, IPFIX to nfcapd, read back with nfdump.

Host a sends crafted frames to host b; pyflow meters b's interface inside b
and exports to nfcapd (and to a test-owned tap, used only to know *when* the
paused flow's first record has left) on b's loopback.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from tests.integration.collect import Tap
from tests.integration.netns import Pair, udp_socket_in
from tests.integration.procs import REPO, nfcapd_in, nfdump_records, pyflow_in

NFCAPD_PORT = 19995


def send(pair: Pair, frames: list, tmp: Path, name: str, gap: float = 0.0) -> None:
    path = tmp / f"{name}.pcap"
    wrpcap(str(path), frames)
    res = pair.run(pair.a, sys.executable, "-m", "tests.integration.sendpkts", pair.a_if, str(path), str(gap),
                   cwd=str(REPO), timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"sent {len(frames)} frames" in res.stdout


def eth(pair: Pair) -> Ether:
    return Ether(src=pair.macs["a"], dst=pair.macs["b"])


def test_ipfix_to_nfcapd_exact_counts(pair: Pair, tmp_path: Path) -> None:
    e = eth(pair)
    v4 = {"src": pair.a_v4, "dst": pair.b_v4}
    v6 = {"src": pair.a_v6, "dst": pair.b_v6}
    burst = (
        [e / IP(**v4) / TCP(sport=40001, dport=80, flags="PA") / (b"t" * 100)] * 10
        + [e / IP(**v4) / UDP(sport=40002, dport=53) / (b"u" * 200)] * 7
        + [e / IP(**v4) / ICMP(type=8, code=0, id=7) / (b"i" * 56)] * 5
        + [e / IPv6(**v6) / UDP(sport=40003, dport=5353) / (b"v" * 300)] * 4
        + [e / IPv6(**v6) / TCP(sport=40004, dport=443, flags="S")] * 3
        + [e / IPv6(**v6) / ICMPv6EchoRequest(id=9) / (b"w" * 56)] * 3
    )
    # (protocol, src port, dst port) -> (packets, bytes per packet): bytes are IP total length
    expected = {
        ("TCP", 40001, 80): (10, 140),
        ("UDP", 40002, 53): (7, 228),
        ("ICMP", 0, 8 * 256): (5, 84),
        ("UDP", 40003, 5353): (4, 348),
        ("TCP", 40004, 443): (3, 60),
        ("ICMP6", 0, 128 * 256): (3, 104),
    }
    paused = e / IP(**v4) / UDP(sport=40005, dport=9000) / (b"p" * 20)  # 48 bytes
    long_flow = e / IP(**v4) / UDP(sport=40006, dport=9001) / (b"l" * 32)  # 60 bytes

    tap = Tap(udp_socket_in(pair.b))
    try:
        with nfcapd_in(pair.b, tmp_path, NFCAPD_PORT) as nfcapd:
            with pyflow_in(
                pair.b, "--interface", pair.b_if,
                "--target", f"127.0.0.1:{NFCAPD_PORT}/ipfix", "--target", f"127.0.0.1:{tap.port}/ipfix",
                "--inactive-flow-timeout", "2s", "--active-flow-timeout", "3s", "--sweep-interval", "250ms",
            ) as flow:
                send(pair, burst, tmp_path, "burst")
                send(pair, [paused] * 3, tmp_path, "paused1")
                # the first part of the paused flow leaves after 2 s idle; then it resumes
                tap.wait_for(lambda r: r.get("L4_SRC_PORT") == 40005)
                send(pair, [paused] * 2, tmp_path, "paused2")
                # 14 packets over 6.5 s: outlives the 3 s active timeout more than once
                send(pair, [long_flow] * 14, tmp_path, "long", gap=0.5)
                rc = flow.stop()
                assert rc == 0, flow.output()
            log = flow.output()
        rows = nfdump_records(nfcapd.flowdir)
        # nfcapd's own verdict on what it received
        assert "Sequence Errors: 0, Bad Packets: 0" in nfcapd.summary(), nfcapd.proc.output()
    finally:
        tap.close()

    assert "metering" in log and "XDP" in log
    ours = [r for r in rows if r["sa"] in (pair.a_v4, pair.a_v6)]
    by_flow: dict[tuple[str, int, int], list[tuple[int, int]]] = defaultdict(list)
    for r in ours:
        assert r["da"] in (pair.b_v4, pair.b_v6)
        by_flow[(r["pr"], int(r["sp"]), int(r["dp"]))].append((int(r["ipkt"]), int(r["ibyt"])))

    for key, (packets, size) in expected.items():
        assert by_flow[key] == [(packets, packets * size)], (key, by_flow[key])

    assert sorted(by_flow[("UDP", 40005, 9000)]) == [(2, 96), (3, 144)]

    long_records = by_flow[("UDP", 40006, 9001)]
    assert len(long_records) >= 2, long_records
    assert sum(p for p, _ in long_records) == 14
    assert sum(b for _, b in long_records) == 14 * 60

    assert set(by_flow) == set(expected) | {("UDP", 40005, 9000), ("UDP", 40006, 9001)}


def test_rejects_missing_interface(pair: Pair) -> None:
    res = subprocess.run(
        ["ip", "netns", "exec", pair.b, str(Path(sys.executable).parent / "pyflow"), "run",
         "--interface", "nosuchif0", "--target", "127.0.0.1:2055/ipfix"],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 3
    assert "no such interface: nosuchif0" in res.stderr
