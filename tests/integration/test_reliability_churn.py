"""Conservation under churn: thousands of flows, 1 s timeouts, gaps right around the timeout.

Host a sends raw frames (AF_PACKET, paced) of FLOWS distinct 5-tuples -- IPv4
UDP and TCP, IPv6 UDP -- to host b for SECONDS.  Each flow sends a burst,
pauses 0.9-1.1 s (just before, at or just after its 1 s inactive timeout) and
resumes, again and again; a tenth of them never pause long and are cut by the
1 s active timeout instead.  pyflow meters b's interface with
``--active-flow-timeout 1s --inactive-flow-timeout 1s`` and exports to four
nfcapd at once: NetFlow v1, v5, v9 and IPFIX.

Afterwards, for every version, nfdump's records of every flow add up to
exactly the packets and bytes sent in it (v1 and v5 carry no IPv6: those
flows are counted as not representable, exactly as many records as v9
carries), b's interface received every frame sent, and no collector saw a
sequence error, a bad packet or a full socket buffer.

``PYFLOW_CHURN_SECONDS`` / ``PYFLOW_CHURN_FLOWS`` make it longer and bigger
(``make soak``); the default is the CI run.
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from tests.integration.netns import Pair, veth_pair
from tests.integration.procs import nfdump_records, pyflow_in, wait_drained
from tests.integration.reliability import link_stats, nfcapd, schedule, send_schedule, udp_drops_in

SECONDS = float(os.environ.get("PYFLOW_CHURN_SECONDS", "20"))
FLOWS = int(os.environ.get("PYFLOW_CHURN_FLOWS", "4000"))
VERSIONS = {"1": 21101, "5": 21105, "9": 21109, "ipfix": 21110}
GAPS = (0.9, 0.95, 0.98, 1.0, 1.02, 1.05, 1.1)

FlowKey = tuple[str, str, int, int, int]  # src, dst, protocol, src port, dst port


@pytest.fixture
def pair() -> Iterator[Pair]:
    with veth_pair("ch") as p:
        yield p


def make_flows(pair: Pair, n: int) -> tuple[list[bytes], list[FlowKey], list[int]]:
    """n distinct flows: (frame, key, IP bytes per packet), a quarter TCP, a fifth IPv6."""
    e = Ether(src=pair.macs["a"], dst=pair.macs["b"])
    frames, keys, sizes = [], [], []
    for i in range(n):
        sport = 1024 + i
        size = 20 + (i * 37) % 400
        if i % 5 == 4:
            src = f"fd00:200::{i:x}"
            pkt = e / IPv6(src=src, dst=pair.b_v6) / UDP(sport=sport, dport=5000 + i % 7) / (b"6" * size)
            keys.append((src, pair.b_v6, 17, sport, 5000 + i % 7))
            sizes.append(40 + 8 + size)
        elif i % 4 == 3:
            src = f"10.200.{i // 250}.{i % 250 + 1}"
            pkt = e / IP(src=src, dst=pair.b_v4) / TCP(sport=sport, dport=443, flags="PA") / (b"t" * size)
            keys.append((src, pair.b_v4, 6, sport, 443))
            sizes.append(20 + 20 + size)
        else:
            src = f"10.200.{i // 250}.{i % 250 + 1}"
            pkt = e / IP(src=src, dst=pair.b_v4) / UDP(sport=sport, dport=53) / (b"u" * size)
            keys.append((src, pair.b_v4, 17, sport, 53))
            sizes.append(20 + 8 + size)
        frames.append(bytes(pkt))
    return frames, keys, sizes


def make_schedule(n: int, seconds: float, seed: int = 7) -> np.ndarray:
    """Bursts of 1-4 packets; between them a pause around the 1 s timeout (or, for a tenth of
    the flows, short pauses: those live on and are cut by the 1 s active timeout)."""
    rng = np.random.default_rng(seed)
    at, frame = [], []
    for i in range(n):
        steady = i % 10 == 0
        k = int(seconds / (0.1 if steady else 0.88)) + 2
        gaps = rng.uniform(0.1, 0.3, k) if steady else rng.choice(GAPS, k) + rng.uniform(-0.01, 0.01, k)
        t = rng.uniform(0, 1.0) + np.concatenate([[0.0], np.cumsum(gaps[:-1])])
        t = t[t < seconds]
        at.append(t)
        frame.append(np.full(len(t), i, dtype=np.int32))
    times = np.concatenate(at)
    return schedule(times, np.concatenate(frame), rng.integers(1, 5, len(times)))


def nfdump_totals(flowdir: Path) -> tuple[dict[FlowKey, tuple[int, int]], int]:
    """(per flow: packets and bytes, summed over its records; number of records)."""
    totals: dict[FlowKey, list[int]] = {}
    rows = nfdump_records(flowdir)
    proto = {"TCP": 6, "UDP": 17}
    for r in rows:
        key = (str(ipaddress.ip_address(r["sa"])), str(ipaddress.ip_address(r["da"])), proto.get(r["pr"], -1),
               int(r["sp"]), int(r["dp"]))
        t = totals.setdefault(key, [0, 0])
        t[0] += int(r["ipkt"])
        t[1] += int(r["ibyt"])
    return {k: (v[0], v[1]) for k, v in totals.items()}, len(rows)


def test_every_packet_of_thousands_of_churning_flows_is_exported_once(pair: Pair, tmp_path: Path) -> None:
    frames, keys, sizes = make_flows(pair, FLOWS)
    bursts = make_schedule(FLOWS, SECONDS)
    packets = np.bincount(bursts["frame"], weights=bursts["count"], minlength=FLOWS).astype(np.int64).tolist()
    want = {keys[i]: (packets[i], packets[i] * sizes[i]) for i in range(FLOWS) if packets[i]}
    want_v4 = {k: v for k, v in want.items() if ":" not in k[0]}
    total_packets = sum(v[0] for v in want.values())

    result: list[tuple[int, float]] = []
    failure: list[BaseException] = []

    def sender() -> None:
        try:
            result.append(send_schedule(pair.a, pair.a_if, frames, bursts, timeout=SECONDS + 60))
        except BaseException as exc:
            failure.append(exc)

    targets = [arg for v, port in VERSIONS.items() for arg in ("--target", f"127.0.0.1:{port}/{v}")]
    t0 = time.monotonic()
    with ExitStack() as stack:
        collectors = {v: stack.enter_context(nfcapd(pair.b, tmp_path, port)) for v, port in VERSIONS.items()}
        with pyflow_in(pair.b, "--interface", pair.b_if, "--active-flow-timeout", "1s",
                       "--inactive-flow-timeout", "1s", "--sweep-interval", "250ms", "--control-socket", "",
                       *targets) as flow:
            flow.wait_for_line(f"metering {pair.b_if}")
            rx0 = link_stats(pair.b, pair.b_if)
            th = threading.Thread(target=sender)
            th.start()
            th.join(SECONDS + 90)
            assert not th.is_alive(), "the sender did not finish"
            assert not failure, failure[0]
            sent, late = result[0]
            rx1 = link_stats(pair.b, pair.b_if)
            assert flow.stop() == 0, flow.output()
        log = flow.output()
        wait_drained(pair.b, list(VERSIONS.values()))
        drops = {v: udp_drops_in(pair.b, port) for v, port in VERSIONS.items()}
    elapsed = time.monotonic() - t0

    assert sent == total_packets
    # b's interface got every frame a sent (none lost on the veth): what it got is what was sent
    assert rx1["rx_packets"] - rx0["rx_packets"] == sent, (rx0, rx1)
    assert drops == dict.fromkeys(VERSIONS, 0), drops
    assert "Traceback" not in log, log

    stats = {m.group(1): (int(m.group(2)), int(m.group(3)))
             for m in re.finditer(r"127\.0\.0\.1:(\d+)/\S+: (\d+) records in \d+ datagrams, (\d+) not rep", log)}
    got, records = {}, {}
    for v in VERSIONS:
        got[v], records[v] = nfdump_totals(collectors[v].flowdir)
        assert "Sequence Errors: 0, Bad Packets: 0" in collectors[v].summary(), (v, collectors[v].proc.output())
    ipv6_records = sum(1 for k in got["9"] if ":" in k[0])  # flows; the records are counted below
    for v, port in VERSIONS.items():
        expect = want_v4 if v in ("1", "5") else want
        missing = {k: (expect[k], got[v].get(k)) for k in expect if got[v].get(k) != expect[k]}
        assert not missing, (v, len(missing), list(missing.items())[:10])
        assert set(got[v]) == set(expect), (v, set(got[v]) - set(expect))
        assert stats[str(port)][0] == records[v], (v, stats, records)
    # v1/v5 get the same batches, minus the IPv6 records: as many as v9 and IPFIX carry
    v6_in_v9 = records["9"] - records["5"]
    assert ipv6_records > 0 and v6_in_v9 > 0
    assert stats[str(VERSIONS["5"])][1] == stats[str(VERSIONS["1"])][1] == v6_in_v9
    assert stats[str(VERSIONS["9"])][1] == stats[str(VERSIONS["ipfix"])][1] == 0
    assert records["9"] == records["ipfix"]
    print(f"{FLOWS} flows, {sent} packets over {SECONDS:.0f}s (sender at most {late * 1000:.0f} ms late), "
          f"{records['ipfix']} records per version, {elapsed:.1f}s in all")
