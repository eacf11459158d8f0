"""Traffic analytics against a real agent (issue 18): quiet traffic fires nothing; a one-source scan
of 4,000 TCP ports at about 1,000 packets/s fires `short_flows_many_destinations` and `flow_rate`
within 15 s of its start, with the scanner among the source talkers.

Host a sends crafted frames (spoofed sources, fine inside the test namespaces) to host b, where
`pyflow run` meters b's interface with the default timeouts (inactive 15 s, sweep-interval 10 s):
the bound is the one the README states for the defaults.  /metrics is scraped from inside b and
parsed with prometheus_client's parser.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP

from tests.integration.collect import Tap
from tests.integration.netns import Pair, udp_socket_in
from tests.integration.procs import pyflow_in
from tests.integration.reliability import send_frames, wait_until
from tests.integration.test_end_to_end import eth
from tests.integration.test_metrics import METRICS, scrape, value

SCANNER = "10.66.6.6"
SCAN_PORTS = 4000
SCAN_GAP = 0.001  # seconds between probes: about 1,000 packets/s (sendpkts sleeps between frames)
DETECT_S = 15.0  # the bound, from the scan's first probe
SOURCES = 240  # quiet traffic: this many source addresses, one new flow each per round
ROUNDS = 16  # ... one round every QUIET_S / ROUNDS s
QUIET_S = 48.0  # the quiet sender's span; the scan starts once the signals are warm (30 s)


def quiet_frames(pair: Pair) -> list:
    """ROUNDS rounds of SOURCES flows (new source ports each round: clients), a few packets each:
    DNS-like UDP and HTTPS-like TCP, of a few hundred bytes."""
    e = eth(pair)
    frames = []
    for r in range(ROUNDS):
        for i in range(SOURCES):
            src = str(ipaddress.IPv4Address("10.77.0.1") + i)
            sport = 20000 + r * SOURCES + i
            if i % 3:
                frames += [e / IP(src=src, dst=pair.b_v4) / UDP(sport=sport, dport=53) / (b"q" * 40)]
            else:
                frames += [e / IP(src=src, dst=pair.b_v4) / TCP(sport=sport, dport=443, flags="PA") / (b"h" * 300)] * 2
    return frames


def scan_frames(pair: Pair) -> list:
    e = eth(pair)
    return [e / IP(src=SCANNER, dst=pair.b_v4) / TCP(sport=45000, dport=p, flags="S") for p in range(1, SCAN_PORTS + 1)]


def active(m: dict) -> set[str]:
    return {dict(lbl)["signal"] for (n, lbl), v in m.items() if n == "pyflow_anomaly_active" and v == 1.0}


def src_talkers(m: dict) -> set[str]:
    return {dict(lbl)["address"] for (n, lbl), _ in m.items()
            if n == "pyflow_top_talker_bytes" and dict(lbl)["direction"] == "src"}


def sender(pair: Pair, frames: list[bytes], gap: float, errors: list[BaseException],
           first: list[float] | None = None) -> threading.Thread:
    """Send ``frames`` from a thread in host a, ``gap`` s apart (the first one's time into ``first``)."""
    def body() -> None:
        try:
            send_frames(pair.a, pair.a_if, frames, gap, None if first is None else first.append)
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


def test_quiet_traffic_fires_nothing_and_a_scan_fires_within_15_s(pair: Pair, tmp_path: Path) -> None:
    quiet = [bytes(f) for f in quiet_frames(pair)]  # built before the agent starts: no delay later
    probes = [bytes(f) for f in scan_frames(pair)]
    errors: list[BaseException] = []
    tap = Tap(udp_socket_in(pair.b))
    try:
        with pyflow_in(pair.b, "--interface", pair.b_if, "--metrics-address", METRICS,
                       "--target", f"127.0.0.1:{tap.port}/ipfix") as flow:
            quiet_sender = sender(pair, quiet, QUIET_S / len(quiet), errors)
            # quiet phase: until the signals are warm (25-30 s after the first sweep that saw traffic,
            # which is up to one sweep-interval, 10 s, in) and one more interval has been scored
            deadline = time.monotonic() + 75
            warm_at = None
            while True:
                m = scrape(pair.b)
                assert not active(m), (active(m), flow.output())
                if warm_at is None and value(m, "pyflow_analytics_warm") == 1.0:
                    warm_at = time.monotonic()
                if warm_at is not None and time.monotonic() - warm_at > 6:
                    break
                assert time.monotonic() < deadline and not errors, (errors, flow.output())
                time.sleep(0.5)
            assert value(m, "pyflow_unique_sources") >= SOURCES * 0.9  # the quiet sources, estimated
            assert SCANNER not in src_talkers(m)

            first: list[float] = []
            scan_sender = sender(pair, probes, SCAN_GAP, errors, first)
            wait_until("the scan's first probe", lambda: bool(first) or bool(errors), timeout=10)
            started = first[0]  # the moment the scan's first probe left host a
            fired: dict[str, float] = {}
            while not ({"short_flows_many_destinations", "flow_rate"} <= set(fired) and SCANNER in src_talkers(m)):
                assert time.monotonic() - started < DETECT_S + 2 and not errors, (fired, errors, flow.output())
                time.sleep(0.25)
                m = scrape(pair.b)
                for s in active(m):
                    fired.setdefault(s, time.monotonic() - started)
            scan_sender.join(30)
            quiet_sender.join(30)
            assert not errors, errors
    finally:
        tap.close()
    print(f"seconds from the scan's start to active: {fired}")  # shown with pytest -s
    assert max(fired.values()) <= DETECT_S, fired
    assert "many_sources_low_bytes" not in fired and "icmp_flows" not in fired  # one source, TCP only
