"""The XDP hot path through BPF_PROG_TEST_RUN, as ratios to an empty XDP program loaded in the same run."""

from __future__ import annotations

import statistics
import struct

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import UDP, IPv6
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether

from pyflow.kernel.bpfsys import prog_test_run
from pyflow.kernel.build import import_bcc
from pyflow.kernel.loader import FlowMeter, KernelSettings

REPEAT = 1_000_000
EMPTY = "int empty_xdp(struct xdp_md *ctx) { return XDP_PASS; }"


def _ctx(pkt: bytes) -> bytes:
    return struct.pack("<6I", 0, len(pkt), 0, 1, 0, 0)


def _mean_ns(fd: int, pkt: bytes, repeat: int) -> float:
    return float(prog_test_run(fd, pkt, repeat=repeat, ctx=_ctx(pkt)).duration_ns)


def _measure(label: str, settings: KernelSettings, empty_fd: int, v4: bytes, v6: bytes,
             repeat: int) -> list[tuple[str, float, float]]:
    rows = []
    qinq = bytes(Ether() / Dot1AD(vlan=100) / Dot1Q(vlan=7) / IP(src="192.0.2.1", dst="198.51.100.2")
                 / TCP(sport=40000, dport=443, flags="A") / (b"x" * 64))
    with FlowMeter(settings) as meter:
        fd = meter.load()
        for name, pkt in (("existing flow, IPv4 TCP", v4), ("existing flow, IPv6 UDP", v6),
                          ("existing flow, QinQ IPv4 TCP", qinq)):
            prog_test_run(fd, pkt, ctx=_ctx(pkt))  # create the entry
            base = statistics.median(_mean_ns(empty_fd, pkt, REPEAT) for _ in range(repeat))
            ours = statistics.median(_mean_ns(fd, pkt, REPEAT) for _ in range(repeat))
            rows.append((f"{name}, {label}", base, ours))
        # new flows: one run per distinct packet, median of many
        news, bases = [], []
        for i in range(3000):
            pkt = bytes(Ether() / IP(src="10.1.0.1", dst="10.2.0.2") / TCP(sport=1024 + i, dport=80) / (b"x" * 64))
            bases.append(_mean_ns(empty_fd, pkt, 1))
            news.append(_mean_ns(fd, pkt, 1))
        rows.append((f"new flow, IPv4 TCP (single runs), {label}", statistics.median(bases), statistics.median(news)))
    return rows


def run(repeat: int) -> None:
    bcc = import_bcc()
    empty = bcc.BPF(text=EMPTY)
    empty_fd = empty.load_func(b"empty_xdp", bcc.BPF.XDP).fd
    v4 = bytes(Ether() / IP(src="192.0.2.1", dst="198.51.100.2") / TCP(sport=40000, dport=443, flags="A") / (b"x" * 64))
    v6 = bytes(Ether() / IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=5000, dport=53) / (b"x" * 64))
    rows = []
    # every field on (the default: min/max TTL and length per packet, fib lookup per new flow),
    # and the per-packet detail off (--ipfix ttl=no,ip-total-length=no,out-interface=no,gateway=no)
    for label, settings in (("every field", KernelSettings(cache_entries=65536)),
                            ("minimal fields", KernelSettings(cache_entries=65536, ttl=False, length=False,
                                                              fib=False))):
        rows += _measure(label, settings, empty_fd, v4, v6, repeat)
    empty.cleanup()
    print("## Kernel hot path (BPF_PROG_TEST_RUN)\n")
    print(f"repeat {REPEAT:,} per measurement (new flows: 3,000 single runs), median of {repeat}\n")
    print("| case | empty XDP ns | pyflow ns | ratio |")
    print("|---|---:|---:|---:|")
    for name, base, ours in rows:
        print(f"| {name} | {base:.1f} | {ours:.1f} | {ours / base:.2f}x |")
    print()
