"""Exact deletes under fire: the resume map and the RCU barrier, provoked on purpose.

The real program and the real agent (pyflow.agent.Agent, with a target that
keeps what it is given) on one kernel map, no interface attached: runner
threads feed packets through BPF_PROG_TEST_RUN (ctypes drops the GIL for the
syscall, so they run in parallel with each other and with the agent) and time
every packet of a flow to land right at its inactive timeout (300 ms here) --
just before, exactly at, or just after the instant the kernel stops writing
the entry (the flow goes on in the resume map) and the agent starts deleting -- while the agent sweeps every few
milliseconds.  Flows also carry FIN (the shorter end-idle rule) and outlive
the active timeout (cuts with a baseline).

Afterwards, for every flow: packets run == packets exported + still cached
(both maps), and after the final flush, packets (and bytes) run == packets
(and bytes) exported.  The test also checks the race was really met: packets
in the resume map and deletes at the edge, thousands of times.

``PYFLOW_RACE_SECONDS`` makes it longer (``make soak``).
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from pyflow.agent import Agent
from pyflow.config import Settings
from pyflow.kernel import abi, bpfsys
from pyflow.kernel.loader import FlowMeter, KernelSettings
from pyflow.records import EndReason
from pyflow.sweep import SweepRules
from tests.bpf.conftest import _meter, xdp_ctx

pytestmark = pytest.mark.root

MS = 10**6
# Timeouts far above the longest sweep (up to ~0.1 s here, the RCU barrier under load): a flow
# whose entries in both maps expire before the agent took either out is "sweep_behind", not this test.
INACTIVE_NS = 300 * MS
END_IDLE_NS = 200 * MS
ACTIVE_NS = 800 * MS
SECONDS = float(os.environ.get("PYFLOW_RACE_SECONDS", "6"))
RUNNERS = 3
FLOWS_PER_RUNNER = 24


class Keep:
    """A target that keeps every record batch it is given (and sends each at once)."""

    name = "keep"

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.stats = type("S", (), {"send_errors": collections.Counter()})()
        self.waiting = False

    def export(self, batch: np.ndarray, clock: Any, now_ns: int) -> None:
        if len(batch):
            self.batches.append(batch.copy())

    def enqueue(self, batch: np.ndarray, number: int) -> None:
        self.export(batch, None, 0)

    def pump(self, clock: Any, sent: Any = None, paced: bool = True) -> int | None:
        return None

    def sent_through(self) -> int | None:
        return None

    def records(self) -> np.ndarray:
        from pyflow import records as rec

        return np.concatenate(self.batches) if self.batches else rec.empty(0)


@pytest.fixture(scope="module")
def fast_meter(_require_root: None) -> Iterator[FlowMeter]:
    """Timeouts of tens of milliseconds: expiry happens all the time."""
    yield from _meter(KernelSettings(cache_entries=4096, inactive_timeout_ns=INACTIVE_NS, end_idle_ns=END_IDLE_NS))


def make_agent(meter: FlowMeter, target: Keep) -> Agent:
    settings = Settings(interfaces=("lo",), cache_entries=meter.settings.cache_entries)
    agent = Agent(settings, meter, [target], log=lambda _msg: None)  # type: ignore[list-item]
    # the agent's rules must be the kernel's (pyflow run derives both from one Settings)
    agent.rules = SweepRules(active_ns=ACTIVE_NS, inactive_ns=INACTIVE_NS, end_idle_ns=END_IDLE_NS)
    return agent


def clear(meter: FlowMeter) -> None:
    for which in abi.CacheMap:
        keys, _ = meter.read_map(which)
        for k in [k.tobytes() for k in keys]:
            bpfsys.map_delete(meter.cache_fd(which), k)


def flow_frames(runner: int) -> list[tuple[int, bytes, bytes]]:
    """(source port, packet, FIN packet or b'') of one runner's flows: UDP, and TCP that ends with FIN."""
    out = []
    for i in range(FLOWS_PER_RUNNER):
        sport = 10000 + runner * 1000 + i
        if i % 4 == 3:
            pkt = bytes(Ether() / IP(src="192.0.2.1", dst="198.51.100.1") / TCP(sport=sport, dport=443, flags="A")
                        / (b"t" * (i % 7)))
            fin = bytes(Ether() / IP(src="192.0.2.1", dst="198.51.100.1") / TCP(sport=sport, dport=443, flags="FA"))
        else:
            pkt = bytes(Ether() / IP(src="192.0.2.1", dst="198.51.100.1") / UDP(sport=sport, dport=53)
                        / (b"u" * (10 + i)))
            fin = b""
        out.append((sport, pkt, fin))
    return out


def ip_bytes(pkt: bytes) -> int:
    return int.from_bytes(pkt[16:18], "big")  # IPv4 total length of an untagged frame


def test_packets_at_the_inactive_timeout_are_never_lost(fast_meter: FlowMeter) -> None:
    meter = fast_meter
    clear(meter)
    target = Keep()
    agent = make_agent(meter, target)
    assert meter.prog_fd is not None
    fd = meter.prog_fd
    run_pk: collections.Counter[int] = collections.Counter()
    run_by: collections.Counter[int] = collections.Counter()
    counters_before = meter.read_counters()
    stop = threading.Event()
    errors: list[BaseException] = []

    def runner(n: int) -> None:
        rng = random.Random(n)
        flows = flow_frames(n)
        pk: collections.Counter[int] = collections.Counter()
        by: collections.Counter[int] = collections.Counter()
        # when each flow's next packet is due: right around its timeout after the last one
        due = [time.monotonic() + rng.uniform(0, 0.3) for _ in flows]
        ended = [False] * len(flows)
        try:
            while not stop.is_set():
                i = min(range(len(flows)), key=due.__getitem__)
                wait = due[i] - time.monotonic()
                if wait > 0:
                    stop.wait(wait)
                sport, pkt, fin = flows[i]
                # a FIN now and then: the flow then ends after END_IDLE_NS instead
                send = fin if fin and rng.random() < 0.2 else pkt
                burst = rng.choice((1, 1, 1, 2, 5))
                for _ in range(burst):
                    res = bpfsys.prog_test_run(fd, send, ctx=xdp_ctx(send))
                    assert res.retval == 2  # XDP_PASS
                pk[sport] += burst
                by[sport] += burst * ip_bytes(send)
                ended[i] = send is fin
                limit = END_IDLE_NS if ended[i] else INACTIVE_NS
                # -1.5 ms .. +1.5 ms around the edge, and now and then well inside (an active flow)
                jitter = rng.uniform(-1.5, 1.5) * MS if rng.random() < 0.85 else -rng.uniform(0.3, 0.9) * limit
                due[i] = time.monotonic() + (limit + jitter) / 1e9
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)
        finally:
            with lock:
                run_pk.update(pk)
                run_by.update(by)

    lock = threading.Lock()
    threads = [threading.Thread(target=runner, args=(n,)) for n in range(RUNNERS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + SECONDS
    sweeps = 0
    longest = 0.0
    try:
        while time.monotonic() < deadline and not errors:
            agent.tick()
            longest = max(longest, agent.stats.last_sweep_seconds)
            sweeps += 1
            time.sleep(random.uniform(0, 0.004))
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors[0]
    assert not any(t.is_alive() for t in threads)

    # packets run == exported + still cached (both maps), flow by flow
    exported = target.records()
    got: collections.Counter[int] = collections.Counter()
    for port, n in zip(exported["src_port"].tolist(), exported["packets"].tolist(), strict=True):
        got[port] += n
    keys, values = meter.read_flows()
    has, pos = agent.baseline.join(values["flow_id"])
    base = np.where(has, agent.baseline.packets[pos] if len(agent.baseline) else 0, 0).astype(np.uint64)
    for port, n in zip(keys["src_port"].tolist(), (values["packets"] - base).tolist(), strict=True):
        got[port] += n
    assert dict(got) == dict(run_pk)

    # the final flush exports the rest: then every packet and byte has been exported, once
    agent.tick()
    agent.tick(final=True)
    exported = target.records()
    pk_out: collections.Counter[int] = collections.Counter()
    by_out: collections.Counter[int] = collections.Counter()
    for port, n, b in zip(exported["src_port"].tolist(), exported["packets"].tolist(), exported["bytes"].tolist(),
                          strict=True):
        pk_out[port] += n
        by_out[port] += b
    assert dict(pk_out) == dict(run_pk)
    assert dict(by_out) == dict(run_by)

    # the kernel agrees: every packet run went into a flow entry, none lost or refused
    after = meter.read_counters()
    moved = {c: after[c] - counters_before[c] for c in abi.Counter if after[c] != counters_before[c]}
    total = sum(run_pk.values())
    assert all(moved.get(c, 0) == 0 for c in abi.NOT_METERED_REASONS), moved
    assert moved[abi.Counter.METERED] + moved.get(abi.Counter.RESUMED, 0) == total == moved[abi.Counter.PACKETS_SEEN]

    # and the race was really run: expiries at the edge, flows going on in the resume map
    s = agent.stats
    reasons = collections.Counter(exported["end_reason"].tolist())
    print(f"{total} packets in {s.sweeps} sweeps: {s.deleted} deletes, {moved.get(abi.Counter.RESUMED, 0)} packets "
          f"in the resume map, records by reason {dict(reasons)}, longest sweep {longest * 1e3:.1f} ms")
    assert s.deleted >= 400 * SECONDS / 6, s
    assert moved.get(abi.Counter.RESUMED, 0) > 0, "no packet met an expired entry: the race was not provoked"
    assert reasons[EndReason.IDLE] > 0 and reasons[EndReason.END_OF_FLOW] > 0 and reasons[EndReason.ACTIVE] > 0
