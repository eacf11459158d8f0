"""Reading the whole flow cache: bcc's items_lookup_batch against raw batch reads into reused buffers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from bench.fill import synthetic_cache
from pyflow.kernel.bpfsys import map_update_batch
from pyflow.kernel.loader import FlowMeter, KernelSettings


@contextmanager
def filled_meter(n: int, now_ns: int) -> Iterator[FlowMeter]:
    """A loaded meter whose flow cache holds ``n`` synthetic entries."""
    with FlowMeter(KernelSettings(cache_entries=n)) as meter:
        meter.load()
        keys, values = synthetic_cache(n, now_ns)
        for lo in range(0, n, 65536):
            map_update_batch(meter.flows_fd, keys[lo:lo + 65536], values[lo:lo + 65536])
        yield meter


def run(sizes: list[int], repeat: int, median_time: Callable[[Callable[[], object], int], float]) -> None:
    print("## Reading the flow cache\n")
    print("| entries | bcc items_lookup_batch s | entries/s | pyflow MapBatchReader s | entries/s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        with filled_meter(n, 10**15) as meter:
            table = meter.table("flows")
            got = sum(1 for _ in table.items_lookup_batch())
            k, _ = meter.read_flows()
            assert got == n == len(k), (got, n, len(k))
            t_bcc = median_time(lambda t=table: sum(1 for _ in t.items_lookup_batch()), max(1, repeat // 2))
            t_raw = median_time(meter.read_flows, repeat)
            print(f"| {n:,} | {t_bcc:.4f} | {n / t_bcc:,.0f} | {t_raw:.4f} | {n / t_raw:,.0f} | {t_bcc / t_raw:.1f}x |")
    print()


def run_tick(sizes: list[int], repeat: int = 3) -> None:
    """One whole agent tick on a real map against one raw batch read of the same map (same run).

    The tick: the RCU barrier, a chunked read of both cache maps, the sweep, the records queued
    (no targets here).  The commit (the final entries deleted, the baseline saved) comes after
    the records have left, in its own column.  A third of the entries are idle-expired.
    The issue's target: a tick at most 1.5x one raw batch read, at 100k and 1M entries.
    """
    import statistics
    import time

    from pyflow.agent import Agent, boot_ns
    from pyflow.config import Settings
    from pyflow.kernel.abi import CacheMap

    print("## One agent tick on a real kernel map (a third of the entries idle-expired)\n")
    print("| entries | one raw batch read s | tick s | of which RCU barrier s | tick / read | commit s "
          "| (tick + commit) / read | deleted | records |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        reads, ticks, commits, barriers = [], [], [], []
        for _ in range(repeat):
            with filled_meter(n, boot_ns()) as meter:
                t0 = time.perf_counter()
                keys, _ = meter.read_map(CacheMap.FLOWS)
                reads.append(time.perf_counter() - t0)
                assert len(keys) == n
                agent = Agent(Settings(cache_entries=max(n, 16)), meter, [], log=lambda _m: None)
                recs = agent.tick()
                ticks.append(agent.stats.last_sweep_seconds)
                commits.append(agent.stats.last_commit_seconds)
                barriers.append(agent.stats.last_barrier_seconds)
        read, tick, commit = statistics.median(reads), statistics.median(ticks), statistics.median(commits)
        print(f"| {n:,} | {read:.3f} | {tick:.3f} | {statistics.median(barriers):.3f} | {tick / read:.2f}x "
              f"| {commit:.3f} | {(tick + commit) / read:.2f}x | {agent.stats.deleted:,} | {len(recs):,} |")
    print()
