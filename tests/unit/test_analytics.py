"""Traffic analytics (pyflow/analytics.py) on synthetic record batches: every metric, every
signal (fires, does not fire), the sliding window, the bounds; the collector and the settings."""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pyflow import records as rec
from pyflow.analytics import (
    INTERVAL_S,
    PROTOCOL_LABELS,
    TABLE_ROWS,
    WARMUP_INTERVALS,
    Analytics,
    CacheGroups,
    Detector,
    Table,
    format_address,
    group_sum,
    hll_add,
    hll_estimate,
)
from pyflow.config import SIGNALS, AnalyticsSettings, SettingError
from pyflow.metrics import AnalyticsCollector
from tests.unit.fakes import cache_entries

T0 = 1_000.0  # the clock (seconds) at the start of every scenario
WALL_MS = 1_700_000_000_000


def addrs(texts: list[str]) -> np.ndarray:
    return np.array([rec.addr_to_16(t) for t in texts], dtype="V16")


def v4(i: np.ndarray | int, net: int = 10) -> list[str]:
    """Distinct IPv4 addresses net.x.y.z for the numbers ``i``."""
    return [str(ipaddress.IPv4Address((net << 24) + int(n) + 1)) for n in np.atleast_1d(i)]


def records(src: list[str], dst: list[str], proto: int | np.ndarray = 6, sport: int | np.ndarray = 40000,
            dport: int | np.ndarray = 443, packets: int | np.ndarray = 10, nbytes: int | np.ndarray = 5000,
            duration_ms: int | np.ndarray = 500, nat_event: int = 0) -> np.ndarray:
    n = len(src)
    r = rec.empty(n)
    r["src_addr"], r["dst_addr"] = addrs(src), addrs(dst)
    r["protocol"], r["src_port"], r["dst_port"] = proto, sport, dport
    r["packets"], r["bytes"] = packets, nbytes
    r["start_ms"] = WALL_MS
    r["end_ms"] = WALL_MS + np.asarray(duration_ms)
    r["end_reason"] = rec.EndReason.IDLE
    r["ip_version"] = 4
    r["nat_event"] = nat_event
    return r


@dataclass
class Ordinary:
    """A few hundred flows from a few hundred hosts, every round: web, DNS, some pings and SSH."""

    hosts: int = 300
    seed: int = 1

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.pool = v4(np.arange(self.hosts), 10)
        self.servers = v4(np.arange(40), 93)

    def round(self, flows: int = 300) -> np.ndarray:
        rng = self.rng
        kind = rng.choice(4, flows, p=[0.6, 0.3, 0.05, 0.05])  # web, dns, ping, ssh
        src = [self.pool[i] for i in rng.integers(0, self.hosts, flows)]
        dst = [self.servers[i] for i in rng.integers(0, len(self.servers), flows)]
        proto = np.choose(kind, [6, 17, 1, 6])
        dport = np.choose(kind, [443, 53, 8 * 256, 22])
        sport = np.where(kind == 2, 0, rng.integers(32768, 60999, flows))
        packets = np.choose(kind, [rng.integers(8, 60, flows), 1, 4, rng.integers(20, 200, flows)])
        nbytes = np.choose(kind, [rng.integers(2_000, 60_000, flows), rng.integers(60, 120, flows), 336,
                                  rng.integers(3_000, 40_000, flows)])
        duration = np.choose(kind, [rng.integers(50, 4_000, flows), 0, 3_000, rng.integers(1_000, 60_000, flows)])
        return records(src, dst, proto, sport, dport, packets, nbytes, duration)


def run_ordinary(a: Analytics, seconds: float, start: float = T0, every: float = 2.0, seed: int = 1) -> float:
    """Feed ordinary traffic (a round every ``every`` s, in sweeps of 1 s); returns the clock after."""
    traffic = Ordinary(seed=seed)
    t = start
    while t < start + seconds:
        a.feed([traffic.round()] if int(t - start) % int(every) == 0 else [], t)
        t += 1.0
    return t


def scan(src: str, target: str, ports: range) -> np.ndarray:
    """One SYN to each port: 1 packet, 60 bytes, no duration."""
    n = len(ports)
    return records([src] * n, [target] * n, 6, 45000, np.array(list(ports)), 1, 60, 0)


def active(a: Analytics) -> set[str]:
    return {s for s, sig in a.view.signals.items() if sig.active}


# --------------------------------------------------------------------------
# counters, top talkers, ports, unique counts
# --------------------------------------------------------------------------


def test_protocol_counters_count_flows_packets_and_bytes_per_protocol() -> None:
    a = Analytics(AnalyticsSettings())
    protos = [6, 6, 17, 1, 58, 2, 132, 47, 50, 89]  # 89 (OSPF): other
    r = records(v4(np.arange(10)), v4(np.arange(10), 20), np.array(protos), packets=np.arange(1, 11),
                nbytes=np.arange(1, 11) * 100)
    nat = records(v4([1]), v4([2]), 6, nat_event=4)  # NAT events are not flows
    a.feed([r, nat], T0)
    a.feed([r[:1]], T0 + 1)
    flows, packets, nbytes = (dict(zip(("tcp", "udp", "icmp", "icmpv6", "igmp", "sctp", "gre", "esp", "other"),
                                       x, strict=True)) for x in a.totals)
    assert flows == {"tcp": 3, "udp": 1, "icmp": 1, "icmpv6": 1, "igmp": 1, "sctp": 1, "gre": 1, "esp": 1, "other": 1}
    assert packets["tcp"] == 1 + 2 + 1 and packets["other"] == 10
    assert nbytes["tcp"] == 100 + 200 + 100 and nbytes["esp"] == 900


def test_top_talkers_and_ports_over_the_window() -> None:
    a = Analytics(AnalyticsSettings(top=3))
    src = v4(np.arange(6))
    r = records(src, v4(np.arange(6), 20), nbytes=np.array([10, 60, 20, 50, 30, 40]) * 1000,
                sport=np.array([40000, 40001, 53, 40003, 40004, 40005]), dport=np.array([443, 443, 40000, 80, 22, 22]),
                proto=np.array([6, 6, 17, 6, 6, 6]))
    a.feed([r[:3]], T0)
    a.feed([r[3:]], T0 + 2)
    a.advance(T0 + INTERVAL_S)  # the interval ends: the view is made
    v = a.view
    # the top 3 by bytes, then the top 3 by flows not among them (one flow each: ties, by hash)
    assert v.talkers["src"][:3] == [(src[1], 60000.0), (src[3], 50000.0), (src[5], 40000.0)]
    assert 3 <= len(v.talkers["src"]) <= 6 and [x for x, _ in v.talkers["dst"]][:3] == v4([1, 3, 5], 20)
    many = records(["10.7.7.7"] * 50, v4(np.arange(50), 20), nbytes=40)  # 50 flows, 2 kB: top by flows
    a.feed([many], T0 + 6)
    a.advance(T0 + 2 * INTERVAL_S)
    assert a.view.talkers["src"][3] == ("10.7.7.7", 2000.0) and len(a.view.talkers["src"]) <= 6
    # service port: the lower one (UDP 53 -> 40000 is port 53)
    assert v.ports == [("tcp", 22, 70000.0), ("tcp", 443, 70000.0), ("tcp", 80, 50000.0)]  # ties: by key


def test_top_talkers_slide_out_of_the_window_and_are_bounded() -> None:
    a = Analytics(AnalyticsSettings(window_ns=30 * 10**9, top=5))
    heavy = v4([999], 172)[0]
    a.feed([records([heavy], v4([1]), nbytes=10**9)], T0)
    t = T0
    for i in range(40):  # 200 s of many small sources, a new set each interval
        t = T0 + INTERVAL_S * (i + 1)
        a.feed([records(v4(np.arange(100) + 100 * i), v4(np.arange(100), 30), nbytes=1000 + i)], t)
        v = a.view
        assert len(v.talkers["src"]) <= 10 and len(v.talkers["dst"]) <= 10 and len(v.ports) <= 5
        inside = t - T0 <= 30  # the heavy source's interval is still in the window
        assert (v.talkers["src"][0][0] == heavy) == inside, (i, v.talkers["src"][:2])
    a.advance(t + 100)  # nothing for longer than the window: no talker left
    assert a.view.talkers == {"src": [], "dst": []} and a.view.ports == []


def test_unique_counts_estimate_within_the_stated_error_and_slide() -> None:
    a = Analytics(AnalyticsSettings(window_ns=20 * 10**9))
    n = 20_000
    a.feed([records(v4(np.arange(n)), v4(np.arange(n) % 500, 20))], T0)
    a.advance(T0 + INTERVAL_S)
    assert abs(a.view.unique_sources - n) / n < 0.05  # 1.6 % standard error: 3 sigma
    assert abs(a.view.unique_destinations - 500) / 500 < 0.05
    a.feed([records(v4(np.arange(50), 40), v4(np.arange(50), 41))], T0 + 10)
    a.advance(T0 + 30)  # the first interval left the window
    assert abs(a.view.unique_sources - 50) <= 2 and abs(a.view.unique_destinations - 50) <= 2


def test_hll_small_and_empty() -> None:
    regs = np.zeros(4096, dtype=np.uint8)
    assert hll_estimate(regs) == 0.0
    hll_add(regs, np.array([1, 2, 3, 3, 3], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    assert round(hll_estimate(regs)) == 3


# --------------------------------------------------------------------------
# grouping and tables: exact, bounded
# --------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20_000), st.integers(1, 3_000), st.integers(0, 2**32))
def test_group_sum_is_exact(n: int, distinct: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 2**64, distinct, dtype=np.uint64)
    keys = pool[rng.integers(0, distinct, n)]
    w = rng.integers(0, 1000, n).astype(np.float64)
    k, sums, first = group_sum(keys, [w, np.ones(n)])
    want = Counter()
    count = Counter()
    for key, x in zip(keys.tolist(), w.tolist(), strict=True):
        want[key] += x
        count[key] += 1
    assert sorted(k.tolist()) == sorted(want)
    assert len(set(k.tolist())) == len(k)
    for key, s, c, i in zip(k.tolist(), sums[:, 0].tolist(), sums[:, 1].tolist(), first.tolist(), strict=True):
        assert s == want[key] and c == count[key] and keys[i] == key


def test_table_keeps_the_largest_of_each_column_when_full() -> None:
    t = Table(2, np.dtype(np.uint64), rows=100)
    keys = np.arange(1, 10_001, dtype=np.uint64)
    a = keys.astype(np.float64)  # largest: the last keys
    b = (10_001 - keys).astype(np.float64)  # largest: the first keys
    t.add(keys, keys, np.stack([a, b], axis=1))
    t.compact()
    assert len(t.keys) <= 200
    assert set(range(9901, 10001)) | set(range(1, 101)) == set(t.keys.tolist())
    assert t.keys[t.top(1, 0)[0]] == 10_000 and t.keys[t.top(1, 1)[0]] == 1


def test_analytics_memory_is_bounded_under_a_spoofed_flood() -> None:
    a = Analytics(AnalyticsSettings())
    rng = np.random.default_rng(3)
    for i in range(6):
        src = rng.integers(0, 2**32, 50_000)
        r = records([str(ipaddress.IPv4Address(int(x))) for x in src[:50]] * 1000, v4([1] * 50_000))
        r["src_addr"] = np.array([b"\0" * 10 + b"\xff\xff" + int(x).to_bytes(4, "big") for x in src], dtype="V16")
        a.feed([r], T0 + i)
    for iv in a._intervals:
        for table in (iv.src, iv.dst, iv.ports):
            table.compact()
            assert len(table.keys) <= 3 * a.rows


# --------------------------------------------------------------------------
# the signals
# --------------------------------------------------------------------------


def test_ordinary_traffic_fires_nothing() -> None:
    for seed, every in ((1, 2.0), (2, 1.0), (3, 5.0)):
        a = Analytics(AnalyticsSettings())
        traffic = Ordinary(seed=seed)
        t = T0
        fired: set[str] = set()
        for step in range(600):  # 10 minutes, sweeps every second
            a.feed([traffic.round()] if step % int(every) == 0 else [], t)
            fired |= active(a)
            t += 1.0
        assert a.view.warm
        assert fired == set(), (seed, {s: a.view.signals[s] for s in fired})


def test_a_port_scan_fires_within_15_s_with_the_scanner_in_the_talkers() -> None:
    a = Analytics(AnalyticsSettings())
    t = run_ordinary(a, 120)
    scanner = "10.66.6.6"
    fired_at: dict[str, float] = {}
    traffic = Ordinary(seed=9)
    start = t
    for second in range(4):  # 4,000 ports at 1,000 packets/s: their records come over 4 s
        ports = range(1 + 1000 * second, 1001 + 1000 * second)
        a.feed([scan(scanner, "10.0.0.1", ports), traffic.round() if second % 2 == 0 else rec.empty(0)], t)
        t += 1.0
    while t < start + 15:
        a.feed([traffic.round()] if int(t) % 2 == 0 else [], t)
        for s in active(a):
            fired_at.setdefault(s, t - start)
        t += 1.0
    assert "short_flows_many_destinations" in fired_at and "flow_rate" in fired_at, a.view.signals
    assert max(fired_at.values()) <= 15
    assert scanner in [addr for addr, _ in a.view.talkers["src"]]
    assert "many_sources_low_bytes" not in fired_at  # one source is not many


def test_new_entries_count_each_flow_once_as_it_starts() -> None:
    """Fed the cache's new entries, the analytics count flows as they start: a SYN scan fires at the
    sweep that first sees it, the scanner leads the talkers by flows at once, and its records, which
    leave an inactive timeout later, add bytes but count no flow again."""
    a = Analytics(AnalyticsSettings())
    traffic = Ordinary(seed=3)
    t = T0
    while t < T0 + 60:  # ordinary traffic: its flows counted from entries, its bytes from records
        r = traffic.round() if int(t - T0) % 2 == 0 else rec.empty(0)
        a.feed([r], t, [cache_entries(r, int(t * 1e9))])
        t += 1.0
    assert not active(a) and a.view.warm
    flows_before = a.view.signals["flow_rate"].value
    probes = scan("10.66.6.6", "10.0.0.1", range(1, 4001))
    a.feed([], t, [cache_entries(probes, int(t * 1e9))])  # one sweep sees all 4,000
    a.advance(t + INTERVAL_S)
    assert {"flow_rate", "short_flows_many_destinations"} <= active(a)
    assert a.view.signals["flow_rate"].value == 4000 / INTERVAL_S
    assert a.view.signals["short_flows_many_destinations"].value == 4000 / INTERVAL_S
    assert "10.66.6.6" in [x for x, _ in a.view.talkers["src"]]  # among the top N by flows
    t += 15.0  # the probes' records leave
    a.feed([probes], t, [])
    a.advance(t + INTERVAL_S)
    assert a.view.signals["flow_rate"].value == 0.0 < flows_before  # no flow counted twice
    assert a.view.signals["short_flows_many_destinations"].value == 0.0
    assert a.totals[0][PROTOCOL_LABELS.index("tcp")] >= 4000  # the mix still counts records


def test_the_agent_gives_each_entry_to_the_analytics_once() -> None:
    """Agent._sweep passes the entries first seen since the last sweep's instant, up to its own: not
    those from before the agent, not one created while a sweep reads (the next sweep's)."""
    from tests.unit.test_observe import CountingMeter, observed_agent
    from tests.unit.test_pace import one_map

    s = 10**9
    meter = CountingMeter(one_map({"pk": 1, "by": 60, "first": 990 * s, "last": 999 * s, "sport": 1}))
    agent, _ = observed_agent(meter, {})
    clock = agent.clocks.boot_ns.__self__  # type: ignore[attr-defined]
    seen: list[list[int]] = []
    real = agent.metrics.analyse  # type: ignore[union-attr]

    def analyse(batch: list[np.ndarray], new: list[tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        seen.append(sorted(int(p) for k, _ in new or () for p in k["src_port"]))
        real(batch, new)

    agent.metrics.analyse = analyse  # type: ignore[union-attr, method-assign]
    later = [(1000.5, 2), (1001.5, 3), (1003.5, 4)]  # created after the agent; 4 while the 2nd sweep reads
    for now, expect in ((1001, [2]), (1003, [3]), (1005, [4]), (1007, [])):
        clock.now = now * s
        flows = [{"pk": 1, "by": 60, "first": int(f * s), "last": int(f * s), "sport": p} for f, p in later
                 if f < now or (now == 1003 and p == 4)]
        meter.maps = one_map({"pk": 1, "by": 60, "first": 990 * s, "last": 999 * s, "sport": 1}, *flows)
        agent._sweep(False)
        assert seen[-1] == expect, (now, seen)
    a = agent.metrics.analytics  # type: ignore[union-attr]
    a.advance(1010.0)
    assert sum(iv.flows for iv in a._intervals) == 3  # B, C, D once each; not the entry from before


def test_many_sources_with_few_bytes_fire() -> None:
    a = Analytics(AnalyticsSettings())
    t = run_ordinary(a, 60)
    spoofed = v4(np.arange(3000), 77)  # 3,000 sources, one 40-byte SYN each, over 5 s
    fired = set()
    for i in range(10):
        part = spoofed[600 * i:600 * (i + 1)]
        a.feed([records(part, ["10.0.0.1"] * len(part), 6, 1234, 80, 1, 40, 0)], t)
        fired |= active(a)
        t += 1.0
    assert "many_sources_low_bytes" in fired, a.view.signals
    assert "short_flows_many_destinations" not in fired  # each reaches one endpoint


def test_one_source_far_above_normal_fires_single_source_rate() -> None:
    a = Analytics(AnalyticsSettings())
    t = run_ordinary(a, 60)
    # 500 MB in 10 s from one host: 50 MB/s
    a.feed([records(["10.9.9.9"], ["198.51.100.7"], 6, 50000, 22, 400_000, 500_000_000, 10_000)], t)
    a.advance(t + INTERVAL_S)
    sig = a.view.signals["single_source_rate"]
    assert sig.active and sig.value == pytest.approx(50e6), sig
    assert a.view.talkers["src"][0][0] == "10.9.9.9"


def test_an_icmp_sweep_fires_icmp_flows() -> None:
    a = Analytics(AnalyticsSettings())
    t = run_ordinary(a, 60)
    targets = v4(np.arange(1024), 192)  # a ping to each of 1,024 addresses over 4 s
    for i in range(4):
        a.feed([records(["10.5.5.5"] * 256, targets[256 * i:256 * (i + 1)], 1, 0, 8 * 256, 1, 84, 0)], t)
        t += 1.0
    a.advance(t + 1)
    assert "icmp_flows" in active(a), a.view.signals


def test_a_quiet_host_never_fires() -> None:
    """A burst far above a near-silent baseline, but below every floor: nothing fires."""
    a = Analytics(AnalyticsSettings())
    t = T0
    for step in range(120):
        a.feed([records(["10.1.1.1"], ["10.1.1.2"])] if step % 10 == 0 else [], t)
        t += 1.0
    fired: set[str] = set()
    top = 0.0
    for _ in range(10):  # 60 flows to 60 endpoints, 30 pings, a 5 MB/s copy: each below its floor
        a.feed([records(["10.1.1.1"] * 60, v4(np.arange(60), 20), 6, 40000, np.arange(60) + 1, 1, 60, 0),
                records(["10.1.1.1"] * 30, v4(np.arange(30), 21), 1, 0, 2048, 1, 84, 0),
                records(["10.1.1.1"], ["10.1.1.3"], 6, 40000, 22, 1000, 25_000_000, 5_000)], t)
        fired |= active(a)
        top = max(top, *(sig.score for sig in a.view.signals.values()))
        t += INTERVAL_S
    assert top > 6  # unusual, yet under the floors
    assert fired == set(), a.view.signals


def test_warm_up_learns_before_anything_fires() -> None:
    a = Analytics(AnalyticsSettings())
    a.advance(T0)
    a.advance(T0 + 60)  # a minute with no records: not part of the warm-up
    t = T0 + 60
    fired = set()
    for i in range(WARMUP_INTERVALS):  # a scan in every warm-up interval
        a.feed([scan("10.6.6.6", "10.0.0.1", range(1, 2001))], t)
        t += INTERVAL_S
        a.advance(t)
        fired |= active(a)
        assert a.view.warm == (i == WARMUP_INTERVALS - 1)
    assert fired == set() and t - (T0 + 60) <= 30


def test_detector_formula() -> None:
    d = Detector()
    for x in (100.0, 120.0, 80.0, 100.0, 110.0, 90.0):  # warm-up: score 0, plain mean
        assert d.update(x, 6.0, 50.0) == (0.0, False)
    assert d.mean == pytest.approx(100.0)
    spread = d.spread(50.0)
    assert spread == max(d.dev, 25.0, 5.0)
    score, on = d.update(100.0 + 7 * spread, 6.0, 50.0)
    assert score == pytest.approx(7.0) and on
    score, on = Detector(n=6, mean=1.0, dev=0.0).update(40.0, 6.0, 50.0)  # unusual but under the floor
    assert score == pytest.approx(39 / 5) and not on


# --------------------------------------------------------------------------
# the collector, the settings, the live cache's groups
# --------------------------------------------------------------------------


class _Holder:
    def __init__(self, a: Analytics | None) -> None:
        self.analytics = a


def scrape(collector: AnalyticsCollector) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    reg = CollectorRegistry()
    reg.register(collector)
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_collector_exposes_every_analytics_metric() -> None:
    clock = [T0]
    a = Analytics(AnalyticsSettings(top=2), clock=lambda: clock[0])
    t = run_ordinary(a, 60)
    a.feed([scan("10.66.6.6", "10.0.0.1", range(1, 3001))], t)
    clock[0] = t + INTERVAL_S  # a scrape closes the interval that ended (no sweep since)
    m = scrape(AnalyticsCollector(_Holder(a)))  # type: ignore[arg-type]
    names = {n for n, _ in m}
    for name in ("pyflow_traffic_flows_total", "pyflow_traffic_packets_total", "pyflow_traffic_bytes_total",
                 "pyflow_top_talker_bytes", "pyflow_top_port_bytes", "pyflow_unique_sources",
                 "pyflow_unique_destinations", "pyflow_anomaly_score", "pyflow_anomaly_active",
                 "pyflow_anomaly_value", "pyflow_anomaly_baseline", "pyflow_analytics_warm"):
        assert name in names, name
    assert m[("pyflow_traffic_flows_total", frozenset({("protocol", "tcp")}))] == a.totals[0][0]
    talkers = [dict(lbl) for n, lbl in m if n == "pyflow_top_talker_bytes"]
    assert len(talkers) <= 8 and {"direction": "src", "address": "10.66.6.6"} in talkers
    assert {t["direction"] for t in talkers} == {"src", "dst"}
    assert len([1 for n, _ in m if n == "pyflow_top_port_bytes"]) == 2
    signals = {dict(lbl)["signal"]: v for (n, lbl), v in m.items() if n == "pyflow_anomaly_active"}
    assert set(signals) == set(SIGNALS) and signals["short_flows_many_destinations"] == 1.0
    assert scrape(AnalyticsCollector(_Holder(None))) == {}  # analytics off: no series  # type: ignore[arg-type]


def test_settings_defaults_and_errors() -> None:
    s = AnalyticsSettings()
    assert s.enabled and s.window_ns == 60 * 10**9 and s.top == 10
    assert s.threshold("flow_rate") == 6.0 and s.floor("short_flows_many_destinations") == 20.0
    s = AnalyticsSettings(floors=(("icmp_flows", 5.0),))
    assert s.floor("icmp_flows") == 5.0 and s.floor("flow_rate") == 100.0
    for bad in (dict(top=0), dict(top=101), dict(window_ns=10**9), dict(floors=(("nope", 1.0),)),
                dict(thresholds=(("flow_rate", -1.0),))):
        with pytest.raises(SettingError):
            AnalyticsSettings(**bad)  # type: ignore[arg-type]


def test_cache_groups_by_source_destination_port_and_protocol() -> None:
    r = records(v4([1, 1, 2, 3]), v4([9, 8, 9, 9], 20), np.array([6, 6, 17, 1]), np.array([40000, 40001, 53, 0]),
                np.array([443, 443, 40000, 2048]), np.array([1, 2, 3, 4]), np.array([100, 200, 300, 400]))
    g = CacheGroups("src")
    g.add(r[:2], r["packets"][:2], r["bytes"][:2])
    g.add(r[2:], r["packets"][2:], r["bytes"][2:])
    assert g.top(10, 2) == [{"flows": 1, "packets": 4, "bytes": 400, "address": v4([3])[0]},
                            {"flows": 2, "packets": 3, "bytes": 300, "address": v4([1])[0]},
                            {"flows": 1, "packets": 3, "bytes": 300, "address": v4([2])[0]}]
    g = CacheGroups("dst")
    g.add(r, r["packets"], r["bytes"])
    assert g.top(1, 0) == [{"flows": 3, "packets": 8, "bytes": 800, "address": v4([9], 20)[0]}]
    g = CacheGroups("port")
    g.add(r, r["packets"], r["bytes"])
    assert g.top(10, 2) == [{"flows": 2, "packets": 3, "bytes": 300, "proto": 6, "port": 443},
                            {"flows": 1, "packets": 3, "bytes": 300, "proto": 17, "port": 53}]
    g = CacheGroups("proto")
    g.add(r, r["packets"], r["bytes"])
    assert [(x["proto"], x["flows"]) for x in g.top(10, 0)] == [(6, 2), (1, 1), (17, 1)]
    with pytest.raises(ValueError):
        CacheGroups("mac")


def test_format_address() -> None:
    assert format_address(rec.addr_to_16("192.0.2.1")) == "192.0.2.1"
    assert format_address(rec.addr_to_16("2001:db8::1")) == "2001:db8::1"


def test_table_rows_default_covers_top() -> None:
    assert Analytics(AnalyticsSettings(top=100)).rows >= max(TABLE_ROWS, 3200)


def test_analytics_table_and_flags(tmp_path: object) -> None:
    from pyflow.cli import build_parser, build_settings
    from pyflow.configfile import read_toml_text
    from pyflow.errors import ConfigError

    layer = read_toml_text('[analytics]\nenabled = "no"\nwindow = "2m"\ntop = 20\nicmp-flows-floor = 5\n'
                           'flow-rate-threshold = 4.5\n', "a.toml")
    args = build_parser().parse_args(["check", "--analytics-floor", "flow-rate=300", "--analytics-top", "7"])
    s = build_settings(layer, args).analytics
    assert (s.enabled, s.window_ns, s.top) == (False, 120 * 10**9, 7)
    assert s.floor("icmp_flows") == 5.0 and s.floor("flow_rate") == 300.0 and s.threshold("flow_rate") == 4.5
    for text, where in (('[analytics]\nwindow = "1s"\n', "a.toml:2"), ("[analytics]\ntop = 0\n", "a.toml:2"),
                        ('[analytics]\nflow-rate-floor = "x"\n', "a.toml:2"), ("[analytics]\nwindw = 1\n", "a.toml:2")):
        with pytest.raises(ConfigError, match=where):
            build_settings(read_toml_text(text, "a.toml"), build_parser().parse_args(["check"]))
    with pytest.raises(ConfigError, match="--analytics-threshold"):
        build_settings(None, build_parser().parse_args(["check", "--analytics-threshold", "flow_rat=3"]))
