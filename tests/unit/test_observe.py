"""Watching the agent never holds it up (issue 15, finding 1), root-free: a real Agent and its
metrics collector on an in-memory flow cache.

* a scrape takes no lock and reads no cache: it answers while a sweep holds the lock, and a
  sweep goes on while a scrape runs;
* the accounting gap keeps its meaning: received - not metered - metered (the kernel's counters,
  now) + metered - accounted (as of the last sweep), so packets metered since the sweep are
  accounted for, and packets lost from the cache show up at the next sweep.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from pyflow.agent import Agent, Clocks
from pyflow.config import Settings
from pyflow.kernel import abi
from pyflow.metrics import Metrics
from pyflow.sweep import Baseline, Horizon, SweepRules, sweep_chunk
from tests.unit.test_pace import FakeClock, FakeMeter, one_map
from tests.unit.test_sweep import cache

S = 10**9
IFINDEX = 3  # tests.unit.test_sweep.cache meters every flow on ifindex 3, ingress


@dataclass
class CountingMeter(FakeMeter):
    """FakeMeter with the kernel's per-interface counters, and a cache read that can be made to
    block for every thread but the one named ``sweeper``."""

    metered: int = 0
    not_ip: int = 0
    chunk_reads: int = 0
    sweeper: str = ""
    gate: threading.Event = field(default_factory=threading.Event)

    def read_chunks(self, chunk: int = 65536):  # type: ignore[no-untyped-def]
        self.chunk_reads += 1
        if self.sweeper and threading.current_thread().name != self.sweeper:
            assert self.gate.wait(10), "a blocked cache read was never released"
        yield from super().read_chunks(chunk)

    def read_flows(self) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self.read_chunks())
        return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])

    def read_iface_stats(self) -> dict[tuple[int, int], np.ndarray]:
        st = np.zeros((), dtype=abi.IFACE_STATS_DTYPE)
        st["counters"][abi.Counter.METERED] = self.metered
        st["counters"][abi.Counter.NOT_IP] = self.not_ip
        st["counters"][abi.Counter.PACKETS_SEEN] = self.metered + self.not_ip
        return {(IFINDEX, int(abi.Hook.XDP)): st}

    def flows_created(self) -> int:
        return 0


def observed_agent(meter: CountingMeter, rx: dict[int, int]) -> tuple[Agent, CollectorRegistry]:
    clock = FakeClock()
    metrics = Metrics(CollectorRegistry(), process=False)
    agent = Agent(Settings(interfaces=("eth0",), inactive_flow_timeout_ns=15 * S), meter, [],  # type: ignore[arg-type]
                  clocks=Clocks(clock.boot, clock.wall), log=lambda _m: None, metrics=metrics)
    metrics.attach(agent, interfaces=lambda: [("eth0", IFINDEX, "xdp", "native")], rx_packets=lambda: dict(rx))
    return agent, metrics.registry


def gap(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("pyflow_accounting_gap_packets", {"interface": "eth0"})


def two_flows() -> CountingMeter:
    # 1000 s now: the first flow is idle-expired (exported at the sweep), the second is live
    return CountingMeter(one_map({"pk": 3, "by": 300, "first": 0, "last": 100 * S},
                                 {"pk": 5, "by": 500, "first": 990 * S, "last": 999 * S}),
                         metered=8, not_ip=2)


def test_a_scrape_answers_while_a_sweep_holds_the_lock_and_reads_no_cache() -> None:
    meter = two_flows()
    agent, registry = observed_agent(meter, {IFINDEX: 10})
    agent.tick()
    reads = meter.chunk_reads
    got: list[bytes] = []
    with agent.lock:  # a long sweep
        scraper = threading.Thread(target=lambda: got.append(generate_latest(registry)))
        t0 = time.monotonic()
        scraper.start()
        scraper.join(3.0)
        alive = scraper.is_alive()
    scraper.join(10.0)
    assert not alive and time.monotonic() - t0 < 3.0, "the scrape waited for the agent's lock"
    assert meter.chunk_reads == reads, "a scrape read the flow cache"
    assert b"pyflow_accounting_gap_packets" in got[0] and gap(registry) == 0
    assert registry.get_sample_value("pyflow_flows_cached") == 1


def test_a_sweep_goes_on_while_a_scrape_runs() -> None:
    """Were a scrape to read the cache (here: a read that blocks for every thread but the sweeper's)
    under the lock, the sweep would wait for it."""
    meter = two_flows()
    agent, registry = observed_agent(meter, {IFINDEX: 10})
    meter.sweeper = "sweeper"
    sweeper = threading.Thread(target=agent.tick, name="sweeper")
    sweeper.start()
    sweeper.join(5.0)
    scrapers = [threading.Thread(target=generate_latest, args=(registry,)) for _ in range(4)]
    for s in scrapers:
        s.start()
    time.sleep(0.05)  # let the scrapers run (each would be stuck now, were it reading the cache)
    sweeper = threading.Thread(target=agent.tick, name="sweeper")
    t0 = time.monotonic()
    sweeper.start()
    sweeper.join(3.0)
    swept = not sweeper.is_alive()
    meter.gate.set()
    for s in [sweeper, *scrapers]:
        s.join(10.0)
    assert swept and time.monotonic() - t0 < 3.0, "the sweep waited for a scrape"
    assert agent.stats.sweeps == 2


def test_the_gap_counts_what_was_metered_since_the_last_sweep_and_losses_at_the_next() -> None:
    meter = two_flows()
    rx = {IFINDEX: 10}  # 8 metered + 2 not IP
    agent, registry = observed_agent(meter, rx)
    assert gap(registry) is None  # no sweep yet: no books to compare with
    agent.tick()
    assert agent.stats.exported_packets[IFINDEX] == 3 and gap(registry) == 0
    # the live flow gets 4 more packets after the sweep: the kernel counted them as metered
    k, v = meter.maps[abi.CacheMap.FLOWS]
    v["packets"][0] += 4
    meter.metered += 4
    rx[IFINDEX] += 4
    assert gap(registry) == 0  # in the books without a new sweep
    agent.tick()
    assert gap(registry) == 0
    # the kernel loses the live entry (9 packets) without a record: seen at the next sweep
    meter.maps[abi.CacheMap.FLOWS] = (k[:0], v[:0])
    assert gap(registry) == 0  # as of the last sweep
    agent.tick()
    assert gap(registry) == 9
    # packets the interface received and the kernel neither metered nor counted: at once
    rx[IFINDEX] += 2
    assert gap(registry) == 11


def test_a_new_meter_has_no_gap_until_its_first_sweep() -> None:
    meter = two_flows()
    agent, registry = observed_agent(meter, {IFINDEX: 10})
    agent.tick()
    assert gap(registry) == 0
    agent.meter = CountingMeter(one_map())  # type: ignore[assignment]  # what hand_over does, without the sweeps
    assert gap(registry) is None
    agent.tick()
    assert gap(registry) is not None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 40), st.integers(0, 40), st.integers(0, 3),
                          st.booleans(), st.booleans()), min_size=1, max_size=30),
       st.integers(0, 60), st.integers(0, 5))
def test_unsent_is_what_no_record_carries(rows: list[tuple[int, int, int, int, bool, bool]], now_s: int,
                                          evict_s: int) -> None:
    """Per chunk: packets in the records + unsent == packets not exported before, for every entry
    the sweep looks at (the books the accounting gap compares with the kernel's metered count)."""
    rules = SweepRules(active_ns=20 * S, inactive_ns=15 * S, end_idle_ns=2 * S)
    flows = [{"pk": pk, "by": pk * 100, "first": first * S, "last": (first + idle) * S,
              "flags": 0x11 if fin else 0x10, "id": i + 1} for i, (pk, first, idle, _, fin, _) in enumerate(rows)]
    keys, values = cache(*flows)
    # cut before with r[3] packets exported (a cut comes an active timeout after the first packet at the earliest)
    cut = [i for i, r in enumerate(rows) if r[3] and r[3] < r[0] and r[1] + 20 <= now_s]
    base = Baseline(np.array([i + 1 for i in cut], np.uint64), np.array([rows[i][3] for i in cut], np.uint64),
                    np.array([rows[i][3] * 100 for i in cut], np.uint64), np.array([rows[i][1] * S for i in cut],
                                                                               np.uint64))
    skip = np.array(sorted(i + 1 for i, r in enumerate(rows) if r[5]), np.uint64)
    r = sweep_chunk(keys, values, base, Horizon(now_s * S, now_s * S, evict_s * S), 0, rules, skip)
    assert r.unsent is not None and len(r.unsent) == len(values)
    looked = ~np.isin(values["flow_id"], skip)
    before = {i + 1: rows[i][3] for i in cut}
    expected = sum(int(v["packets"]) - before.get(int(v["flow_id"]), 0) for v in values[looked])
    assert int(r.records["packets"].sum()) + int(r.unsent.sum()) == expected
    assert not r.unsent[~looked].any()  # what waits for its delete is in records already
