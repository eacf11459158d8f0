"""Traffic analytics (pyflow/analytics.py): its CPU per million records, and as a share of the agent's
CPU at 100k records/s (issue 18: at most 5 %).  CPU only: no kernel, no network.

The records are what the sweep makes of a synthetic cache (bench.fill), in two mixes: *typical*
(sources drawn from 5,000 addresses, destinations from 2,000) and *distinct* (every record a new
source: a spoofed flood, the worst case for the per-address tables).  A simulated 30 s at 100k
records/s is fed in sweeps of 50,000 records every 0.5 s on a fake clock, so the figure includes
every interval's close (window merge, top lists, signals).  As the agent does, each sweep also
hands over as many new cache entries (the same flows as they start: at a steady 100k records/s
about as many flows start as end), from which the analytics count the flows.  The agent's side, measured on the same
records: the sweep (``sweep_chunk``) and the IPFIX encode, which is less than the agent really
spends (no map read, no delete, no send): the share is an upper bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from bench.fill import synthetic_cache
from bench.sweep_export import CLOCK, NOW, sweep
from pyflow.analytics import Analytics
from pyflow.config import AnalyticsSettings
from pyflow.export import ipfix
from tests.unit.fakes import cache_entries

RATE = 100_000
SECONDS = 30
SWEEP_S = 0.5


def _records(mix: str) -> np.ndarray:
    keys, values = synthetic_cache(400_000, NOW)
    recs = sweep(keys, values, final=True)
    if mix == "typical":
        rng = np.random.default_rng(5)
        pool = np.array([b"\0" * 10 + b"\xff\xff" + int(x).to_bytes(4, "big") for x in range(0x0A000001, 0x0A000001
                                                                                               + 5000)], dtype="V16")
        recs["src_addr"] = pool[rng.integers(0, 5000, len(recs))]
        recs["dst_addr"] = pool[rng.integers(0, 2000, len(recs))]
    return recs


def _cpu(fn: Callable[[], object]) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def analytics_cpu(recs: np.ndarray) -> tuple[float, int]:
    """CPU seconds for SECONDS simulated at RATE records/s, and the records fed."""
    a = Analytics(AnalyticsSettings())
    per = int(RATE * SWEEP_S)
    fed = 0
    keys, values = cache_entries(recs, NOW)

    def go() -> None:
        nonlocal fed
        t = 1000.0
        for i in range(int(SECONDS / SWEEP_S)):
            lo = (i * per) % (len(recs) - per)
            a.feed([recs[lo:lo + per]], t, [(keys[lo:lo + per], values[lo:lo + per])])
            fed += per
            t += SWEEP_S
        a.advance(t + 5)

    return _cpu(go), fed


def agent_cpu(recs: np.ndarray) -> float:
    """CPU seconds of the agent's sweep + IPFIX encode per record (lower bound of its work)."""
    keys, values = synthetic_cache(400_000, NOW)
    t_sweep = min(_cpu(lambda: sweep(keys, values, final=True)) for _ in range(3)) / len(recs)
    t_enc = min(_cpu(lambda: ipfix.encode(recs, ipfix.IpfixState(), CLOCK, True, 1472)) for _ in range(3)) / len(recs)
    return t_sweep + t_enc


def run(repeat: int) -> None:
    print(f"## Traffic analytics ({RATE:,} records/s for {SECONDS} s, sweeps of {int(RATE * SWEEP_S):,} every "
          f"{SWEEP_S} s)\n")
    print("analytics = the records and as many new cache entries (flows counted as they start); agent = sweep + "
          "IPFIX encode of the same records (no map read, delete or send: less than the agent spends, so the share "
          "is an upper bound)\n")
    print("| mix | analytics CPU s per million records | agent CPU s per million records | analytics at 100k "
          "records/s, % of one core | share of agent + analytics CPU |")
    print("|---|---:|---:|---:|---:|")
    for mix in ("typical", "distinct"):
        recs = _records(mix)
        runs = [analytics_cpu(recs) for _ in range(max(1, min(repeat, 3)))]
        cpu, fed = sorted(runs)[len(runs) // 2]
        per_m = cpu / fed * 1e6
        agent_m = agent_cpu(recs) * 1e6
        core = per_m * RATE / 1e6 * 100
        share = per_m / (per_m + agent_m) * 100
        print(f"| {mix} | {per_m:.3f} | {agent_m:.3f} | {core:.1f} % | {share:.1f} % |")
    print()
