"""Paced export and the sweep's commit protocol, root-free: a fake clock, a fake meter, real targets.

* a target never sends more than ``max-rate`` records a second (plus one step), in the order
  queued, and its queue is bounded, what does not fit counted;
* the agent's tick on an in-memory meter: final entries are exported once, deleted only after
  every target has sent them (or after ``hold_ns``), skipped by the sweeps in between; an
  entry that expired after the barrier began waits for the next sweep; relief raises the map's
  threshold and the next sweep exports below it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from pyflow.agent import Agent, Clocks
from pyflow.config import Settings, TargetSettings
from pyflow.export import target as target_mod
from pyflow.export.context import ExportClock
from pyflow.export.registry import encoder_for
from pyflow.export.target import Target
from pyflow.kernel import abi
from pyflow.records import EndReason
from tests.unit.fakes import MemoryFlowCache as FakeMeter
from tests.unit.test_sweep import cache
from tests.unit.test_target import batch

S = 10**9
MS = 10**6


@dataclass
class FakeClock:
    now: int = 1000 * S

    def boot(self) -> int:
        return self.now

    def wall(self) -> int:
        return self.now + 1_700_000_000 * S

    def export(self) -> tuple[ExportClock, int]:
        return ExportClock(unix_ns=self.wall(), uptime_ms=self.now // MS), self.now


class Sent(Target):
    """A real target whose datagrams are kept instead of sent (no socket)."""

    def __init__(self, rate: int) -> None:
        super().__init__(TargetSettings("192.0.2.9", version="9", max_rate=rate), encoder_for("9"))
        self.datagrams: list[bytes] = []

    def _send(self, dgram: bytes) -> None:
        self.datagrams.append(dgram)
        self.stats.datagrams += 1


def v9_count(msg: bytes) -> int:
    """Records announced in a NetFlow v9 header (templates included: v9 counts all)."""
    return int.from_bytes(msg[2:4], "big")


def test_a_paced_target_keeps_to_its_rate() -> None:
    clock = FakeClock()
    t = Sent(rate=10_000)
    t.enqueue(batch(30_000), 1)
    sent_at: list[tuple[int, int]] = []
    while t.waiting and clock.now < 1010 * S:
        nxt = t.pump(clock.export, lambda recs, now: sent_at.append((now, len(recs))))
        if nxt is not None:
            assert nxt > clock.now
            clock.now = nxt
    elapsed = (clock.now - 1000 * S) / S
    assert sum(n for _, n in sent_at) == 30_000 and t.stats.records == 30_000
    # 30,000 records at 10,000 a second: about 3 s, never faster than the rate (plus one step)
    assert 2.9 <= elapsed <= 3.2, elapsed
    assert t.backlog == 0 and t.sent_through() is None


def test_an_unpaced_target_sends_at_once() -> None:
    clock = FakeClock()
    t = Sent(rate=0)
    t.enqueue(batch(5000), 1)
    assert t.pump(clock.export) is None
    assert t.stats.records == 5000 and not t.waiting


def test_no_burst_bigger_than_a_step() -> None:
    """Between two pumps at the same instant nothing more goes: tokens do not pile up."""
    clock = FakeClock()
    t = Sent(rate=100_000)
    t.enqueue(batch(20_000), 1)
    t.pump(clock.export)
    first = t.stats.datagrams
    t.pump(clock.export)
    assert t.stats.datagrams == first
    clock.now += 3600 * S  # an hour idle saves no more than one step
    t.pump(clock.export)
    step = target_mod.PACE_STEP_NS * 100_000 // S
    assert t.stats.datagrams - first <= step // 10 + 2


def test_sent_through_follows_the_batches() -> None:
    clock = FakeClock()
    t = Sent(rate=1000)
    assert t.sent_through() is None
    t.enqueue(batch(10), 1)
    t.enqueue(batch(3000), 2)
    assert t.sent_through() == 0
    for _ in range(20):
        nxt = t.pump(clock.export)
        clock.now = nxt or clock.now
    assert t.sent_through() == 1  # batch 1 out, batch 2 still going


def test_the_queue_is_bounded_and_counts_what_it_drops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(target_mod, "QUEUE_LIMIT", 1000)
    t = Sent(rate=10)
    t.enqueue(batch(700), 1)
    t.enqueue(batch(700), 2)
    assert t.queued == 1000 and t.stats.queue_dropped == 400


# -- the agent's tick on an in-memory meter -----------------------------------------------


def agent_on(meter: FakeMeter, targets: list[Target], clock: FakeClock) -> Agent:
    settings = Settings(interfaces=("lo",), inactive_flow_timeout_ns=15 * S)
    agent = Agent(settings, meter, targets, clocks=Clocks(clock.boot, clock.wall),  # type: ignore[arg-type]
                  log=lambda _m: None)
    return agent


def one_map(*flows: dict) -> dict[abi.CacheMap, tuple[np.ndarray, np.ndarray]]:
    k, v = cache(*flows)
    return {abi.CacheMap.FLOWS: (k, v), abi.CacheMap.RESUMED: (k[:0], v[:0])}


@dataclass
class NewFlows:
    """Adds live entries to a fake meter's flows map, as the kernel creates them (ids and source
    ports of their own; ``age_ms(id)``: how long ago each was last seen)."""

    meter: FakeMeter
    clock: FakeClock
    next_id: int = 1

    def add(self, n: int, age_ms: Callable[[int], int] = lambda _i: 0) -> None:
        ids = range(self.next_id, self.next_id + n)
        self.next_id += n
        k, v = self.meter.maps[abi.CacheMap.FLOWS]
        nk, nv = cache(*({"pk": 1, "by": 10, "first": self.clock.now, "last": self.clock.now - age_ms(i) * MS,
                          "id": i, "sport": i} for i in ids))
        self.meter.maps[abi.CacheMap.FLOWS] = (np.concatenate([k, nk]), np.concatenate([v, nv]))


def test_final_entries_leave_once_and_are_deleted_after_every_target_sent_them() -> None:
    clock = FakeClock()
    meter = FakeMeter(one_map({"pk": 3, "by": 300, "first": 0, "last": 100 * S},  # idle-expired
                              {"pk": 1, "by": 100, "first": 0, "last": 999 * S}))  # still live
    slow, fast = Sent(rate=100), Sent(rate=0)
    slow.enqueue(batch(150), 0)  # a second and a half of records ahead of the sweep's
    agent = agent_on(meter, [slow, fast], clock)
    first = agent._sweep(False)
    assert sum(len(p) for p in first) == 1 and meter.barriers == 1
    agent.pump()
    assert meter.commits == []  # the slow target has not sent it yet: the entry stays in the kernel
    again = agent._sweep(False)  # and is not exported twice meanwhile
    assert sum(len(p) for p in again) == 0
    for _ in range(1000):
        nxt = agent.pump()
        if not slow.waiting:
            break
        clock.now = nxt or clock.now + MS
    assert meter.commits == [1]
    assert len(meter.maps[abi.CacheMap.FLOWS][0]) == 1
    assert fast.stats.records == 1 and slow.stats.records == 151
    assert 1.4 * S <= clock.now - 1000 * S <= 1.7 * S


def test_a_batch_waits_at_most_hold_ns() -> None:
    clock = FakeClock()
    meter = FakeMeter(one_map({"pk": 3, "by": 300, "first": 0, "last": 100 * S}))
    stuck = Sent(rate=1)
    stuck.enqueue(batch(10_000), 0)  # far behind: hours of records at 1 a second
    agent = agent_on(meter, [stuck], clock)
    agent._sweep(False)
    agent.pump()
    assert meter.commits == []
    clock.now += agent.hold_ns()
    agent.pump()
    assert meter.commits == [1]  # deleted; its record still leaves from the queue


def test_an_entry_expiring_after_the_barrier_began_waits_for_the_next_sweep() -> None:
    clock = FakeClock()
    expires = clock.now + 5 * MS  # during the barrier
    meter = FakeMeter(one_map({"pk": 2, "by": 200, "first": 0, "last": expires - 15 * S}))
    t = Sent(rate=0)
    agent = agent_on(meter, [t], clock)
    real_barrier = meter.barrier

    def slow_barrier() -> None:
        real_barrier()
        clock.now += 10 * MS  # the grace period takes 10 ms

    meter.barrier = slow_barrier  # type: ignore[method-assign]
    assert sum(len(p) for p in agent._sweep(False)) == 0
    assert agent.next_due_ns == expires
    assert sum(len(p) for p in agent._sweep(False)) == 1


def test_relief_raises_the_threshold_and_the_next_sweep_exports_below_it() -> None:
    clock = FakeClock()
    flows = [{"pk": 1, "by": 10, "first": 0, "last": clock.now - (100 - i) * MS, "id": i + 1} for i in range(95)]
    meter = FakeMeter(one_map(*flows), capacity_=100)
    t = Sent(rate=0)
    agent = agent_on(meter, [t], clock)
    assert sum(len(p) for p in agent._sweep(False)) == 0
    cut = meter.evict[abi.CacheMap.FLOWS]
    assert cut > 0 and agent.next_due_ns <= clock.now  # due at once
    assert agent.stats.cached == 75
    out = np.concatenate(agent._sweep(False))
    assert len(out) == 20 and set(out["end_reason"].tolist()) == {EndReason.LACK_OF_RESOURCES}
    agent.pump()
    assert len(meter.maps[abi.CacheMap.FLOWS][0]) == 75


def test_a_flow_that_saw_fin_since_the_sweep_brings_the_next_one_forward() -> None:
    """Without FIN events the loop sweeps an inactive timeout apart; a first FIN or RST seen since the
    last sweep (the kernel's count moved) makes the next sweep come an end-idle timeout after the
    last look that found the count unchanged."""
    from pyflow.agent import FIN_POLL_NS
    from pyflow.sweep import NEVER

    clock = FakeClock()
    meter = FakeMeter(one_map({"pk": 1, "by": 10, "first": clock.now, "last": clock.now}))
    agent = agent_on(meter, [Sent(rate=0)], clock)
    agent._sweep(False)
    assert agent.sweep_interval_ns() == 10 * S  # min(sweep-interval 10s, inactive 15s, active 30m)
    swept_at = clock.now
    clock.now += FIN_POLL_NS
    assert agent._fin_due(clock.now) == NEVER  # nothing moved: this look is the new mark
    looked = clock.now
    meter.fins += 1
    clock.now += FIN_POLL_NS
    assert agent._fin_due(clock.now) == looked + agent.rules.end_idle_ns
    assert looked > swept_at
    agent._sweep(False)
    assert agent._fin_due(clock.now + FIN_POLL_NS) == NEVER  # the sweep saw it


def test_a_surge_of_new_flows_brings_the_next_sweep_forward() -> None:
    """The last sweep left 50 of 100 entries: room for 40 below the 90 % high water.  Every
    FIN_POLL_NS the loop reads the kernel's count of entries created; once those created since the
    sweep, plus those the last look's rate adds before a relief could take effect (one look and two
    50 ms gaps: 0.35 s here), reach the room, the next sweep is now, and it relieves the map."""
    from pyflow.agent import FIN_POLL_NS
    from pyflow.sweep import NEVER

    clock = FakeClock()
    meter = FakeMeter(one_map(), capacity_=100)
    flows = NewFlows(meter, clock)

    def add(n: int) -> None:
        flows.add(n, age_ms=lambda i: 100 - i % 100)

    add(50)
    agent = agent_on(meter, [Sent(rate=0)], clock)
    assert sum(len(p) for p in agent._sweep(False)) == 0
    agent.stats.last_sweep_seconds = 0.0
    for n, since_sweep in ((10, 10), (10, 20), (5, 25)):  # 10+14, 20+14, 25+7: below 40
        add(n)
        clock.now += FIN_POLL_NS
        assert agent._fill_due(clock.now) == NEVER, since_sweep
    add(10)
    clock.now += FIN_POLL_NS // 2
    assert agent._fill_due(clock.now) == NEVER  # not looked at yet: one look per FIN_POLL_NS
    clock.now += FIN_POLL_NS // 2
    assert agent._fill_due(clock.now) == clock.now  # 35 since the sweep, 40 a second: 35 + 14
    assert agent.stats.fill_sweeps == 1
    # 85 of 100, and 40 a second coming (10 in the last look's 250 ms): within the time a relief
    # takes (one look and two sweeps with their 50 ms gaps: 0.35 s here) about 14 more, so the
    # threshold rises now, down to 75 - 14 = 61 entries, not just to 75
    agent.stats.last_sweep_seconds = 0.0
    assert sum(len(p) for p in agent._sweep(False)) == 0
    assert agent.next_due_ns <= clock.now and agent._fill_due(clock.now + FIN_POLL_NS) == NEVER
    out = np.concatenate(agent._sweep(False))
    assert 23 <= len(out) <= 25 and set(out["end_reason"].tolist()) == {EndReason.LACK_OF_RESOURCES}


def test_a_burst_into_a_map_under_half_full_waits_for_the_room_itself() -> None:
    """Below half full the loop does not look ahead: a burst that the map will hold does not bring
    the sweep forward (nor cut its flows short); from half full it does."""
    from pyflow.agent import FIN_POLL_NS
    from pyflow.sweep import NEVER

    clock = FakeClock()
    meter = FakeMeter(one_map(), capacity_=1000)

    add = NewFlows(meter, clock).add

    add(100)
    agent = agent_on(meter, [Sent(rate=0)], clock)
    agent._sweep(False)
    agent.stats.last_sweep_seconds = 0.0  # room: 900 - 100 = 800
    for n in (350, 100):  # 1,400 a second: 450 + ~500 ahead, but 450 < 500; then 550, and 400 a second
        add(n)
        clock.now += FIN_POLL_NS
        assert agent._fill_due(clock.now) == NEVER, n
    add(300)  # 850 cached, 1,200 a second: 750 + ~420 ahead >= 800
    clock.now += FIN_POLL_NS
    assert agent._fill_due(clock.now) == clock.now


def test_steady_churn_is_not_a_surge() -> None:
    """30 entries created a second, and 30 going idle: the map stays at 85 % and nothing leaves
    early (were the rate of creation taken alone, 10 more would seem to come before a relief
    could take effect, and the map would look 95 % full)."""
    from pyflow.agent import FIN_POLL_NS

    clock = FakeClock()
    meter = FakeMeter(one_map(), capacity_=100)

    add = NewFlows(meter, clock).add

    add(85)
    agent = agent_on(meter, [Sent(rate=0)], clock)
    assert sum(len(p) for p in agent._sweep(False)) == 0
    agent.stats.last_sweep_seconds = 0.0
    for round_ in range(5):
        meter.maps[abi.CacheMap.FLOWS][1]["last_seen_ns"][:30] = clock.now - 20 * S  # the 30 oldest go idle
        add(30)  # ... and 30 new come, in a second
        clock.now += 4 * FIN_POLL_NS
        agent._fill_due(clock.now)
        out = np.concatenate(agent._sweep(False))
        assert len(out) == 30 and set(out["end_reason"].tolist()) == {EndReason.IDLE}, round_
        agent.pump()
        agent.stats.last_sweep_seconds = 0.0
    assert agent.stats.evicted == 0 and agent.stats.cached == 85


def test_hand_over_exports_the_old_cache_to_the_end_and_goes_on_with_the_new() -> None:
    """A reload's new program: everything in the old maps leaves (expired entries as usual, live ones
    as forced ends), is sent at once, and the agent then sweeps the new cache with its own baseline."""
    clock = FakeClock()
    old = FakeMeter(one_map({"pk": 3, "by": 300, "first": 0, "last": 100 * S},  # idle-expired
                            {"pk": 5, "by": 500, "first": 0, "last": 999 * S}))  # live
    new = FakeMeter(one_map({"pk": 2, "by": 200, "first": 990 * S, "last": 999 * S, "sport": 7}))
    fast = Sent(rate=0)
    agent = agent_on(old, [fast], clock)
    done = agent.hand_over(new)
    assert sorted(int(r["packets"]) for r in done) == [3, 5]
    assert sorted(int(r["end_reason"]) for r in done) == [EndReason.IDLE, EndReason.FORCED]
    assert fast.stats.records == 2 and not fast.waiting  # sent at once, not paced
    assert agent.meter is new and old.barriers >= 1
    assert sum(len(p) for p in agent._sweep(False)) == 0  # the new cache's entry is live
    clock.now += 60 * S  # the new cache's entry goes idle and leaves from the new maps
    assert sum(int(r["packets"]) for p in agent._sweep(False) for r in p) == 2
