"""A nearly full cache is relieved early: the idle-longest entries leave with end reason 5.

The real program and the real agent on a 64-entry cache, packets through
BPF_PROG_TEST_RUN.  A sweep that finds a map over its high-water mark raises
the map's ``evict_before`` threshold above its idlest entries; the kernel
writes them no more (their flows go on in the other map), and the next sweep
exports and deletes them exactly like idle entries, which the hammer test
checks under concurrent updates.

``PYFLOW_RELIEF_SECONDS`` makes the hammer test longer (``make soak``).
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from pyflow.agent import Agent
from pyflow.config import Settings
from pyflow.kernel import abi, bpfsys
from pyflow.kernel.loader import FlowMeter, KernelSettings
from pyflow.records import EndReason
from pyflow.sweep import SweepRules
from tests.bpf.conftest import xdp_ctx
from tests.bpf.test_reliability_race import Keep

pytestmark = pytest.mark.root

CACHE = 64
SECONDS = float(os.environ.get("PYFLOW_RELIEF_SECONDS", "5"))


def _meter(settings: KernelSettings, bpf_dir: Path = abi.BPF_DIR) -> Iterator[FlowMeter]:
    with FlowMeter(settings, bpf_dir=bpf_dir) as meter:
        meter.load()
        yield meter


@pytest.fixture
def meter(_require_root: None) -> Iterator[FlowMeter]:
    yield from _meter(KernelSettings(cache_entries=CACHE))


def agent_on(meter: FlowMeter) -> tuple[Agent, Keep]:
    target = Keep()
    logs: list[str] = []
    agent = Agent(Settings(interfaces=("lo",), cache_entries=CACHE), meter, [target],  # type: ignore[list-item]
                  log=logs.append)
    agent.logs = logs  # type: ignore[attr-defined]
    return agent, target


def frame(sport: int, payload: int = 10) -> bytes:
    return bytes(Ether() / IP(src="192.0.2.1", dst="198.51.100.1") / UDP(sport=sport, dport=53) / (b"r" * payload))


def run(meter: FlowMeter, pkt: bytes, n: int = 1) -> None:
    assert meter.prog_fd is not None
    for _ in range(n):
        assert bpfsys.prog_test_run(meter.prog_fd, pkt, ctx=xdp_ctx(pkt)).retval == 2


def totals(records: np.ndarray) -> collections.Counter[int]:
    c: collections.Counter[int] = collections.Counter()
    for port, n in zip(records["src_port"].tolist(), records["packets"].tolist(), strict=True):
        c[port] += n
    return c


def test_relief_takes_the_idle_longest_down_to_low_water(meter: FlowMeter) -> None:
    agent, target = agent_on(meter)
    sent: collections.Counter[int] = collections.Counter()
    # 40 flows, cut once by a (very short) active timeout: 2 packets each already exported
    for i in range(40):
        run(meter, frame(30000 + i), 2)
        sent[30000 + i] += 2
    agent.rules = SweepRules(active_ns=1, inactive_ns=15 * 10**9, end_idle_ns=2 * 10**9)
    time.sleep(0.001)
    first = agent.tick()
    assert len(first) == 40 and set(first["end_reason"].tolist()) == {EndReason.ACTIVE}
    agent.rules = SweepRules(active_ns=30 * 60 * 10**9, inactive_ns=15 * 10**9, end_idle_ns=2 * 10**9)
    # one more packet each, oldest first, then 18 new flows: 58 entries = 90.6 % of 64
    for i in range(58):
        run(meter, frame(30000 + i))
        sent[30000 + i] += 1
    assert len(agent.tick()) == 0  # over the high-water mark: the threshold goes up ...
    assert any("lack of resources" in line for line in agent.logs)  # type: ignore[attr-defined]
    batch = agent.tick()  # ... and the next sweep takes the entries below it out
    relief = batch[batch["end_reason"] == EndReason.LACK_OF_RESOURCES]
    # down to 75 % (48 entries): the 10 idle the longest left, each with what the cut had not exported
    assert sorted(relief["src_port"].tolist()) == [30000 + i for i in range(10)]
    assert relief["packets"].tolist() == [1] * 10
    assert relief["bytes"].tolist() == [20 + 8 + 10] * 10
    assert len(batch) == 10
    keys, _ = meter.read_flows()
    assert len(keys) == 48 == agent.stats.cached
    assert agent.stats.evicted == 10
    # the flows that left start new entries; nothing is lost or counted twice
    run(meter, frame(30000))
    sent[30000] += 1
    agent.tick()
    agent.tick(final=True)
    assert totals(target.records()) == sent


def test_below_high_water_nothing_leaves_early(meter: FlowMeter) -> None:
    agent, _ = agent_on(meter)
    for i in range(57):  # 89 % of 64
        run(meter, frame(31000 + i))
    assert len(agent.tick()) == 0
    assert len(meter.read_flows()[0]) == 57 and agent.stats.evicted == 0


def hammer(meter: FlowMeter, flows: int, seconds: float) -> tuple[int, Agent, Keep, dict[abi.Counter, int]]:
    """Two threads run packets of ``flows`` flows at random as fast as they can on the small
    cache while the agent sweeps back to back; then the final flush.  (packets run, agent,
    target, counter deltas)"""
    agent, target = agent_on(meter)
    frames = [frame(32000 + i, payload=i % 50) for i in range(flows)]
    assert meter.prog_fd is not None
    fd = meter.prog_fd
    before = meter.read_counters()
    stop = threading.Event()
    ran = [0, 0]

    def runner(n: int) -> None:
        rng = random.Random(n)
        while not stop.is_set():
            pkt = frames[rng.randrange(flows)]
            bpfsys.prog_test_run(fd, pkt, ctx=xdp_ctx(pkt))
            ran[n] += 1

    threads = [threading.Thread(target=runner, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            agent.tick()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    agent.tick()
    agent.tick(final=True)
    after = meter.read_counters()
    return sum(ran), agent, target, {c: after[c] - before[c] for c in abi.Counter}


def test_relief_under_fire_is_exact(meter: FlowMeter) -> None:
    """More hot flows than both maps hold, both always over their high-water mark, relief every
    other sweep: exported + refused (by reason) == run, and exported == what the kernel put in
    flow entries, to the packet."""
    total, agent, target, moved = hammer(meter, flows=1500, seconds=SECONDS)
    records = target.records()
    exported = int(records["packets"].sum())
    reasons = collections.Counter(records["end_reason"].tolist())
    refused = sum(moved[c] for c in abi.NOT_METERED_REASONS)
    print(f"{total} packets, {agent.stats.evicted} entries taken out early in {agent.stats.sweeps} sweeps, "
          f"{refused} refused ({ {abi.NOT_METERED_REASONS[c]: moved[c] for c in abi.NOT_METERED_REASONS} }), "
          f"{moved[abi.Counter.RESUMED]} in the resume map, records by reason {dict(reasons)}")
    assert agent.stats.evicted > 200 and reasons[EndReason.LACK_OF_RESOURCES] > 200
    assert exported + refused == total == moved[abi.Counter.PACKETS_SEEN]
    assert exported == moved[abi.Counter.METERED] + moved[abi.Counter.RESUMED]
