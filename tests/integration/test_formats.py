"""Every export format through the real meter, decoded by three real collectors at once.

Host a sends IPv4 and IPv6 flows of known size to host b; pyflow meters b's
interface and exports each format (NetFlow v1, v5, v9, IPFIX and IPFIX in
RouterOS time mode) to its own nfcapd and its own nfacctd, while tshark
captures what nfcapd receives, plus one target at a closed port.  Each
collector must agree on every flow's packets and bytes, report no decode or
sequence errors and never miss a template.
"""

from __future__ import annotations

import json
import re
import subprocess
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

from tests.integration.netns import Pair
from tests.integration.procs import nfacctd_in, nfcapd_in, nfdump_records, pyflow_in, tshark_capture_in, walk
from tests.integration.test_end_to_end import eth, send

FORMATS = {"1": 0, "5": 1, "9": 2, "ipfix": 3, "ipfix,time=routeros": 4}
# pmacct 1.7.7's nfacctd does not accept NetFlow v1: it drops v1 datagrams without a
# word, even with debug on. v1 is checked by nfcapd and tshark only.
NFACCTD_FORMATS = {fmt: i for fmt, i in FORMATS.items() if fmt != "1"}
NFCAPD_BASE, NFACCTD_BASE, CLOSED_PORT = 20100, 20200, 20399
PROTO = {"TCP": 6, "UDP": 17, "ICMP": 1, "ICMP6": 58}

Key = tuple[str, str, int, int]  # src, dst, protocol, src port (0 for ICMP)


def traffic(pair: Pair) -> tuple[list[Any], dict[Key, tuple[int, int]]]:
    e = eth(pair)
    v4 = {"src": pair.a_v4, "dst": pair.b_v4}
    v6 = {"src": pair.a_v6, "dst": pair.b_v6}
    flows = [
        ((pair.a_v4, pair.b_v4, 6, 41001), e / IP(**v4) / TCP(sport=41001, dport=80, flags="PA") / (b"t" * 100),
         6, 140),
        ((pair.a_v4, pair.b_v4, 17, 41002), e / IP(**v4) / UDP(sport=41002, dport=53) / (b"u" * 200), 4, 228),
        ((pair.a_v4, pair.b_v4, 1, 0), e / IP(**v4) / ICMP(type=8, id=3) / (b"i" * 56), 3, 84),
        ((pair.a_v6, pair.b_v6, 17, 41003), e / IPv6(**v6) / UDP(sport=41003, dport=5353) / (b"v" * 300), 5, 348),
        ((pair.a_v6, pair.b_v6, 6, 41004), e / IPv6(**v6) / TCP(sport=41004, dport=443, flags="S"), 2, 60),
        ((pair.a_v6, pair.b_v6, 58, 0), e / IPv6(**v6) / ICMPv6EchoRequest(id=4) / (b"w" * 56), 3, 104),
    ]
    frames = [f for _, frame, n, _ in flows for f in [frame] * n]
    return frames, {key: (n, n * size) for key, _, n, size in flows}


def only_v4(expected: dict[Key, tuple[int, int]]) -> dict[Key, tuple[int, int]]:
    return {k: v for k, v in expected.items() if ":" not in k[0]}


def add(totals: dict[Key, list[int]], key: Key, packets: int, octets: int) -> None:
    t = totals.setdefault(key, [0, 0])
    t[0] += packets
    t[1] += octets


def nfdump_totals(flowdir: Path) -> dict[Key, tuple[int, int]]:
    totals: dict[Key, list[int]] = {}
    for r in nfdump_records(flowdir):
        proto = PROTO[r["pr"]]
        add(totals, (r["sa"], r["da"], proto, 0 if proto in (1, 58) else int(r["sp"])), int(r["ipkt"]),
            int(r["ibyt"]))
    return {k: (v[0], v[1]) for k, v in totals.items()}


def pmacct_totals(raw: dict[tuple[str, str, int, int, int], tuple[int, int]]) -> dict[Key, tuple[int, int]]:
    totals: dict[Key, list[int]] = {}
    for (src, dst, sport, _dport, proto), (packets, octets) in raw.items():
        add(totals, (src, dst, proto, 0 if proto in (1, 58) else sport), packets, octets)
    return {k: (v[0], v[1]) for k, v in totals.items()}


def tshark_decode(pcap: Path, port: int) -> tuple[dict[Key, tuple[int, int]], list[str], list[dict[str, Any]]]:
    """tshark's view of one collector port: per-flow totals, expert messages, cflow headers."""
    out = subprocess.run(["tshark", "-n", "-r", str(pcap), "-d", f"udp.port=={port},cflow", "-Y",
                          f"udp.dstport=={port}", "-T", "json"], capture_output=True, text=True, check=True).stdout
    totals: dict[Key, list[int]] = {}
    experts: list[str] = []
    headers = []
    for pkt in json.loads(out):
        layers = pkt["_source"]["layers"]
        cflow = layers.get("cflow")
        assert cflow is not None, f"tshark did not dissect a datagram to {port} as cflow"
        if "_ws.malformed" in layers:
            experts.append("malformed")
        headers.append(cflow)
        for d in walk(cflow):
            if "_ws.expert.message" in d:
                experts.append(d["_ws.expert.message"])
            src = d.get("cflow.srcaddr") or d.get("cflow.srcaddrv6")
            if src is None or "cflow.protocol" not in d:
                continue
            proto = int(d["cflow.protocol"])
            packets = int(d["cflow.packets"])
            octets = int(d["cflow.octets"])
            dst = d.get("cflow.dstaddr") or d.get("cflow.dstaddrv6")
            add(totals, (src, dst, proto, 0 if proto in (1, 58) else int(d["cflow.srcport"])), packets, octets)
    return {k: (v[0], v[1]) for k, v in totals.items()}, experts, headers


def test_every_format_three_collectors(pair: Pair, tmp_path: Path) -> None:
    frames, expected = traffic(pair)
    targets = []
    for fmt, i in FORMATS.items():
        version, _, opts = fmt.partition(",")
        suffix = f",{opts}" if opts else ""
        targets += ["--target", f"127.0.0.1:{NFCAPD_BASE + i}/{version}{suffix}"]
        if fmt in NFACCTD_FORMATS:
            targets += ["--target", f"127.0.0.1:{NFACCTD_BASE + i}/{version}{suffix}"]
    targets += ["--target", f"127.0.0.1:{CLOSED_PORT}/9"]
    nfcapd_ports = [NFCAPD_BASE + i for i in FORMATS.values()]
    pcap = tmp_path / "cflow.pcap"

    with ExitStack() as stack:
        nfcapds = {fmt: stack.enter_context(nfcapd_in(pair.b, tmp_path, NFCAPD_BASE + i)) for fmt, i in FORMATS.items()}
        nfacctds = {fmt: stack.enter_context(nfacctd_in(pair.b, tmp_path, NFACCTD_BASE + i))
                    for fmt, i in NFACCTD_FORMATS.items()}
        capture = stack.enter_context(tshark_capture_in(pair.b, pcap, nfcapd_ports))
        with pyflow_in(pair.b, "--interface", pair.b_if, "--inactive-flow-timeout", "15s", *targets) as flow:
            send(pair, frames, tmp_path, "burst")
            assert flow.stop() == 0, flow.output()
        log = flow.output()
        sent = {m.group(1): (int(m.group(2)), int(m.group(3)), int(m.group(4)))
                for m in re.finditer(r"127\.0\.0\.1:(\d+)/\S+: (\d+) records in (\d+) datagrams, (\d+) not rep", log)}
        for fmt, i in NFACCTD_FORMATS.items():
            nfacctds[fmt].wait_received(sent[str(NFACCTD_BASE + i)][1])
        capture.wait_captured(sum(sent[str(p)][1] for p in nfcapd_ports))
    # every collector has stopped and written what it got

    closed = re.search(rf"127\.0\.0\.1:{CLOSED_PORT}/9: .*send errors: (.*)", log)
    assert closed and "econnrefused" in closed.group(1), log

    for fmt, i in FORMATS.items():
        want = only_v4(expected) if fmt in ("1", "5") else expected
        records, datagrams, not_representable = sent[str(NFCAPD_BASE + i)]
        assert records == len(want), (fmt, log)
        assert not_representable == len(expected) - len(want), (fmt, log)

        assert "Sequence Errors: 0, Bad Packets: 0" in nfcapds[fmt].summary(), (fmt, nfcapds[fmt].proc.output())
        assert nfdump_totals(nfcapds[fmt].flowdir) == want, fmt

        if fmt in nfacctds:
            pm = nfacctds[fmt]
            assert pmacct_totals(pm.totals()) == want, (fmt, pm.proc.output())
            assert not [ln for ln in pm.proc.lines if re.search(r"WARN|ERROR", ln)], (fmt, pm.proc.output())

        totals, experts, headers = tshark_decode(pcap, NFCAPD_BASE + i)
        assert len(headers) == datagrams, fmt
        assert totals == want, fmt
        assert "malformed" not in experts, (fmt, experts)
        assert not [x for x in experts if "template" in x.lower()], (fmt, experts)
        # default settings send no options records, so both sequence rules (tshark's RFC 7011,
        # nfdump's flow records only) give the same numbers: no expert message at all
        assert experts == [], (fmt, experts)
