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


def run_tick(sizes: list[int]) -> None:
    """One whole agent tick on a real map: batch read, barrier, re-read, sweep, batch delete (no targets)."""
    from pyflow.agent import Agent, boot_ns
    from pyflow.config import Settings

    print("## One agent tick on a real kernel map (a third of the entries idle-expired)\n")
    print("| entries | tick s | deleted | records | entries/s |")
    print("|---:|---:|---:|---:|---:|")
    for n in sizes:
        with filled_meter(n, boot_ns()) as meter:
            agent = Agent(Settings(cache_entries=max(n, 16)), meter, [], log=lambda _m: None)
            recs = agent.tick()
            t = agent.stats.last_sweep_seconds
            print(f"| {n:,} | {t:.3f} | {agent.stats.deleted:,} | {len(recs):,} | {n / t:,.0f} |")
    print()
