"""Wire fidelity across a kill -9 take-over: every collector sees one clean session.

Host a sends IPv4 and IPv6 flows (TCP ending with FIN, UDP left to go idle) to
host b; pyflow meters b's interface with default export settings and sends
every version (1, 5, 9, IPFIX) to its own nfcapd and its own nfacctd (not v1:
nfacctd drops v1), while tshark captures every datagram.  Mid-traffic the
agent is SIGKILLed; a new one takes the pinned instance over and goes on
with the export session.  Then: no tshark expert warning, no nfcapd
sequence error, no nfacctd warning, exact totals everywhere, one source port
per target, and the same exporter boot time derived from every v1/v5/v9
header of both agents.
"""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.utils import rdpcap

from tests.integration.netns import Pair
from tests.integration.procs import PYFLOW, nfacctd_in, nfcapd_in, tshark_capture_in
from tests.integration.test_end_to_end import eth, send
from tests.integration.test_formats import nfdump_totals, only_v4, pmacct_totals, tshark_decode
from tests.integration.test_restart import agent, sender, sweeps_after

VERSIONS = {"1": 0, "5": 1, "9": 2, "ipfix": 3}
NFACCTD_VERSIONS = {v: i for v, i in VERSIONS.items() if v != "1"}
NFCAPD_BASE, NFACCTD_BASE = 20500, 20600

Key = tuple[str, str, int, int]


def traffic(pair: Pair, first_port: int, n: int) -> tuple[list[Any], dict[Key, tuple[int, int]]]:
    """``n`` flows, every other one IPv6: a third TCP ending with FIN, the rest UDP (they go idle)."""
    e = eth(pair)
    frames, expected = [], {}
    for i in range(n):
        port = first_port + i
        l3 = (IPv6(src=pair.a_v6, dst=pair.b_v6) if i % 2 else IP(src=pair.a_v4, dst=pair.b_v4))
        if i % 3 == 0:
            flow = [e / l3 / TCP(sport=port, dport=80, flags=f) / (b"t" * size)
                    for f, size in (("S", 0), ("PA", 120), ("PA", 80), ("FA", 0))]
            proto = 6
        else:
            flow = [e / l3 / UDP(sport=port, dport=53) / (b"u" * (60 + i % 50))] * 3
            proto = 17
        frames += flow
        src, dst = (pair.a_v6, pair.b_v6) if i % 2 else (pair.a_v4, pair.b_v4)
        expected[(src, dst, proto, port)] = (len(flow), sum(len(f[l3.__class__]) for f in flow))
    return frames, expected


def status(ctl: str) -> dict[str, Any]:
    res = subprocess.run([PYFLOW, "status", "--socket", ctl, "--json"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def derived_boot_ms(payload: bytes) -> int | None:
    """The exporter's boot time as nfdump derives it from a v1/v5/v9 header (None: IPFIX)."""
    version = struct.unpack_from("!H", payload)[0]
    if version == 9:
        uptime, secs = struct.unpack_from("!II", payload, 4)
        return secs * 1000 - uptime
    if version in (1, 5):
        uptime, secs, nsecs = struct.unpack_from("!III", payload, 4)
        return secs * 1000 + nsecs // 10**6 - uptime
    return None


def test_one_clean_session_per_collector_across_a_kill_9_take_over(pair: Pair, tmp_path: Path) -> None:
    before, expected = traffic(pair, 43000, 90)
    flows_before = len(expected)
    during, more = traffic(pair, 44000, 90)
    expected.update(more)
    ctl = str(tmp_path / "ctl.sock")
    ports = {v: [NFCAPD_BASE + i] + ([NFACCTD_BASE + i] if v in NFACCTD_VERSIONS else []) for v, i in VERSIONS.items()}
    targets = [a for v, ps in ports.items() for p in ps for a in ("--target", f"127.0.0.1:{p}/{v}")]
    args = ("--inactive-flow-timeout", "2s", "--metrics-address", "", "--control-socket", ctl, *targets)
    pcap = tmp_path / "wire.pcap"
    first = second = None
    with ExitStack() as stack:
        nfcapds = {v: stack.enter_context(nfcapd_in(pair.b, tmp_path, NFCAPD_BASE + i)) for v, i in VERSIONS.items()}
        nfacctds = {v: stack.enter_context(nfacctd_in(pair.b, tmp_path, NFACCTD_BASE + i))
                    for v, i in NFACCTD_VERSIONS.items()}
        capture = stack.enter_context(tshark_capture_in(pair.b, pcap, [p for ps in ports.values() for p in ps]))
        try:
            first = agent("nsenter", pair, *args)
            first.wait_for_line("exporting to", timeout=60)
            send(pair, before, tmp_path, "before")
            sweeps_after(ctl, 1)
            # the first flows have left (FIN, idle): the collectors know the session
            deadline = time.monotonic() + 30
            while (done := status(ctl)["agent"])["records"] < flows_before:
                assert time.monotonic() < deadline, f"only {done} exported within 30 s"
                sweeps_after(ctl, done["sweeps"] + 1)
            running = sender(pair, during, tmp_path, "during", 0.03)  # 9 s: outlasts a 2 s sweep and the status calls
            # kill between sweeps (docs/architecture.md, "Pinning and restart"), mid-traffic
            sweeps_after(ctl, status(ctl)["agent"]["sweeps"] + 1)
            sent_by_first = {t["port"]: t["datagrams"] for t in status(ctl)["targets"]}
            first.p.kill()
            first.p.wait(10)
            assert running.poll() is None, "the traffic ended before the kill"
            second = agent("nsenter", pair, *args)
            second.wait_for_line("exporting to", timeout=60)
            assert running.wait(60) == 0
            assert second.stop(signal.SIGTERM) == 0, second.output()
        finally:
            for proc in (first, second):
                if proc is not None:
                    proc.stop(signal.SIGKILL)
        log = second.output()
        sent = {int(m.group(1)): sent_by_first[int(m.group(1))] + int(m.group(2))
                for m in re.finditer(r"127\.0\.0\.1:(\d+)/\S+: \d+ records in (\d+) datagrams", log)}
        for v, i in NFACCTD_VERSIONS.items():
            nfacctds[v].wait_received(sent[NFACCTD_BASE + i])
        capture.wait_captured(sum(sent.values()))
    # every collector has stopped and written what it got

    assert "taking over the kernel program pinned at" in log, log
    assert "going on with the earlier agent's export session" in log, log
    for v in VERSIONS:
        want = only_v4(expected) if v in ("1", "5") else expected
        assert "Sequence Errors: 0, Bad Packets: 0" in nfcapds[v].summary(), (v, nfcapds[v].proc.output())
        assert nfdump_totals(nfcapds[v].flowdir) == want, (v, nfcapds[v].proc.output(), log)
        if v in nfacctds:
            pm = nfacctds[v]
            assert pmacct_totals(pm.totals()) == want, (v, pm.proc.output())
            assert not [ln for ln in pm.proc.lines if re.search(r"WARN|ERROR", ln)], (v, pm.proc.output())
        for port in ports[v]:
            totals, experts, headers = tshark_decode(pcap, port)
            assert experts == [], (v, port, experts)
            assert len(headers) == sent[port] and totals == want, (v, port)

    by_port: dict[int, set[int]] = {}
    boots: dict[int, set[int]] = {}
    for pkt in rdpcap(str(pcap)):
        udp = pkt[UDP]
        by_port.setdefault(udp.dport, set()).add(udp.sport)
        boot = derived_boot_ms(bytes(udp.payload))
        if boot is not None:
            boots.setdefault(udp.dport, set()).add(boot)
    assert all(len(s) == 1 for s in by_port.values()), by_port  # one source port per target, both agents
    assert len(boots) == 5 and len(set.union(*boots.values())) == 1, boots  # one boot instant, every header
    print(f"{sum(sent.values())} datagrams to 7 collectors across the take-over; derived boot time "
          f"{next(iter(set.union(*boots.values())))} ms in every v1/v5/v9 header")
