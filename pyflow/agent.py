"""The agent: every sweep tick, read the flow cache, apply the rules, export.

Exact deletes (see docs/architecture.md): the kernel never writes an entry
that the sweep rules call expired; it spills those packets to a ring buffer
instead.  So the agent

1. reads the whole cache (one batch read) and picks the expired entries;
2. waits for an RCU grace period (``FlowMeter.barrier``): any program run
   that looked at such an entry before step 1 has finished;
3. re-reads those entries (their values are now final) and sweeps;
4. deletes them, and exports the records to every target;
5. turns spill events (packets of a flow that resumed meanwhile) into records.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pyflow import records as rec
from pyflow.config import Settings
from pyflow.export.target import ExportClock, Target
from pyflow.kernel import abi
from pyflow.kernel.bpfsys import map_delete_batch, map_lookup
from pyflow.kernel.loader import FlowMeter
from pyflow.records import EndReason
from pyflow.sweep import Baseline, SweepRules, expired, spill_records, sweep

if TYPE_CHECKING:
    from pyflow.enrich import Enricher
    from pyflow.host.conntrack import NatEventListener
    from pyflow.metrics import Metrics

REASON_LABELS = {EndReason.IDLE: "idle", EndReason.ACTIVE: "active", EndReason.END_OF_FLOW: "end_of_flow",
                 EndReason.FORCED: "forced", EndReason.LACK_OF_RESOURCES: "lack_of_resources"}


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class Clocks:
    """Injectable clocks: boot time (the kernel's) and wall time."""

    boot_ns: Callable[[], int] = boot_ns
    wall_ns: Callable[[], int] = time.time_ns


@dataclass
class AgentStats:
    sweeps: int = 0
    records: int = 0
    deleted: int = 0
    spill_events: int = 0
    nat_events: int = 0  # NAT event records (conntrack), not flows
    vanished: int = 0  # expired entries gone before the re-read (should stay 0)
    last_sweep_seconds: float = 0.0
    cached: int = 0  # entries in the cache after the last sweep
    records_by_reason: Tally[str] = field(default_factory=Tally)
    exported_packets: Tally[int] = field(default_factory=Tally)  # per ifindex, since start


class Agent:
    def __init__(self, settings: Settings, meter: FlowMeter, targets: Sequence[Target],
                 clocks: Clocks | None = None, log: Callable[[str], None] | None = None,
                 metrics: Metrics | None = None, enricher: Enricher | None = None,
                 nat_events: NatEventListener | None = None) -> None:
        self.settings = settings
        # host-derived fields (masks, gateways, NAT, AS) and conntrack's NAT events, when wanted
        self.enricher = enricher
        self.nat_events = nat_events
        self.meter = meter
        self.targets = list(targets)
        self.clocks = clocks or Clocks()
        self.rules = SweepRules(
            active_ns=settings.active_flow_timeout_ns,
            inactive_ns=settings.inactive_flow_timeout_ns,
            end_idle_ns=settings.end_idle_ns,
        )
        self.baseline = Baseline()
        self.stats = AgentStats()
        self._spilled: list[np.ndarray] = []
        self.metrics = metrics
        # held during a tick and while a scrape computes the accounting: both see
        # the cache, the baseline and the exported totals at one consistent point
        self.lock = threading.Lock()
        self.log = log or (lambda msg: print(f"pyflow: {msg}", file=sys.stderr))
        meter.open_spill(self._spilled.append)

    # -- one tick ----------------------------------------------------------------

    def _clock(self) -> tuple[int, int, ExportClock]:
        b = self.clocks.boot_ns()
        w = self.clocks.wall_ns()
        return b, w - b, ExportClock(unix_ns=w, uptime_ms=b // 10**6)

    def _reread(self, keys: np.ndarray, values: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Final values of the expired entries after the barrier; returns the vanished ones.

        A few entries are looked up one by one; many are taken from one more
        batch read of the whole cache, matched by flow id.
        """
        if len(idx) > max(64, len(values) // 16):
            return self._reread_batch(values, idx)
        fd = self.meter.flows_fd
        size = abi.FLOW_VALUE_DTYPE.itemsize
        alive = np.ones(len(idx), dtype=bool)
        for j, i in enumerate(idx):
            raw = map_lookup(fd, keys[i].tobytes(), size)
            if raw is None:
                alive[j] = False
                continue
            values[i] = np.frombuffer(raw, dtype=abi.FLOW_VALUE_DTYPE)[0]
        self.stats.vanished += int(np.count_nonzero(~alive))
        return idx[~alive]

    def _reread_batch(self, values: np.ndarray, idx: np.ndarray) -> np.ndarray:
        _, fresh = self.meter.read_flows()
        order = np.argsort(fresh["flow_id"])
        ids = fresh["flow_id"][order]
        want = values["flow_id"][idx]
        pos = np.minimum(np.searchsorted(ids, want), max(0, len(ids) - 1))
        found = (ids[pos] == want) if len(ids) else np.zeros(len(idx), dtype=bool)
        values[idx[found]] = fresh[order[pos[found]]]
        self.stats.vanished += int(np.count_nonzero(~found))
        return idx[~found]

    def tick(self, final: bool = False) -> np.ndarray:
        """One sweep; returns the records exported (also sent to every target)."""
        with self.lock:
            return self._tick(final)

    def _tick(self, final: bool) -> np.ndarray:
        t0 = time.perf_counter()
        keys_v, values_v = self.meter.read_flows()
        keys, values = keys_v.copy(), values_v.copy()
        now, wall_offset, clock = self._clock()
        if not final:
            cand = np.flatnonzero(expired(values, now, self.rules))
            if len(cand):
                self.meter.barrier()
                gone = self._reread(keys, values, cand)
                if len(gone):
                    keep = np.ones(len(values), dtype=bool)
                    keep[gone] = False
                    keys, values = keys[keep], values[keep]
        res = sweep(keys, values, self.baseline, now, wall_offset, self.rules, final=final)
        self.baseline = res.baseline
        if res.delete.any():
            self.stats.deleted += map_delete_batch(self.meter.flows_fd, keys[res.delete])

        self.meter.poll_spill()
        batch = res.records
        if self._spilled:
            events = np.concatenate(self._spilled)
            self._spilled.clear()
            self.stats.spill_events += len(events)
            batch = np.concatenate([batch, spill_records(events, wall_offset)])
        if self.enricher is not None and len(batch):
            if self.enricher.nat is not None:
                self.enricher.nat.refresh()  # the NAT'ed connections as they are now
            self.enricher.enrich(batch)
        if self.nat_events is not None:
            batch = np.concatenate([batch, self.nat_events.drain()])
        self.export(batch, clock, now)
        self._account(batch, len(keys) - int(np.count_nonzero(res.delete)), now, wall_offset)
        self.stats.last_sweep_seconds = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.sweep_duration.observe(self.stats.last_sweep_seconds)
        return batch

    def _account(self, batch: np.ndarray, cached: int, now_ns: int, wall_offset_ns: int) -> None:
        s = self.stats
        s.sweeps += 1
        events = batch["nat_event"] != 0
        s.nat_events += int(np.count_nonzero(events))
        batch = batch[~events]  # flow records only from here on
        s.records += len(batch)
        s.cached = cached
        if not len(batch):
            return
        reasons, counts = np.unique(batch["end_reason"], return_counts=True)
        for r, n in zip(reasons.tolist(), counts.tolist(), strict=True):
            s.records_by_reason[REASON_LABELS.get(EndReason(r), str(r))] += n
        # what each interface received: flows metered on ingress (the gap metric compares it
        # with the interface's own rx counter)
        ingress = batch[batch["direction"] == 0]
        idx, pk = np.unique(ingress["meter_ifindex"], return_inverse=True)
        sums = np.bincount(pk.reshape(-1), weights=ingress["packets"].astype(np.float64), minlength=len(idx))
        for ifindex, n in zip(idx.tolist(), sums.tolist(), strict=True):
            s.exported_packets[ifindex] += int(n)
        if self.metrics is not None:
            self._observe_lateness(batch, now_ns, wall_offset_ns)

    def _observe_lateness(self, batch: np.ndarray, now_ns: int, wall_offset_ns: int) -> None:
        """Seconds between a record's timeout and its export (idle and active records)."""
        assert self.metrics is not None
        now_ms = (now_ns + wall_offset_ns) / 1e6
        idle = batch["end_reason"] == EndReason.IDLE
        active = batch["end_reason"] == EndReason.ACTIVE
        late = np.concatenate([
            (now_ms - batch["end_ms"][idle]) / 1e3 - self.rules.inactive_ns / 1e9,
            (now_ms - batch["start_ms"][active]) / 1e3 - self.rules.active_ns / 1e9,
        ])
        for x in np.maximum(late, 0.0).tolist():
            self.metrics.export_lateness.observe(x)

    def accounted_packets(self) -> dict[int, int]:
        """Per ifindex: packets exported since start + still in the cache + spilled, not yet exported."""
        with self.lock:
            self.meter.poll_spill()
            total: Tally[int] = Tally(self.stats.exported_packets)
            keys, values = self.meter.read_flows()
            has, pos = self.baseline.join(values["flow_id"])
            base = np.where(has, self.baseline.packets[pos] if len(self.baseline) else 0, 0)
            pending = (values["packets"] - base.astype(np.uint64)).astype(np.float64)
            ingress = keys["direction"] == 0
            keys, pending = keys[ingress], pending[ingress]
            idx, inv = np.unique(keys["ifindex"], return_inverse=True)
            for ifindex, n in zip(idx.tolist(), np.bincount(inv.reshape(-1), weights=pending,
                                                            minlength=len(idx)).tolist(), strict=True):
                total[ifindex] += int(n)
            for ev in self._spilled:
                if ev["key"]["direction"][0] == 0:
                    total[int(ev["key"]["ifindex"][0])] += int(ev["packets"].sum())
            return dict(total)

    def export(self, batch: np.ndarray, clock: ExportClock, now_ns: int) -> None:
        for target in self.targets:
            try:
                target.export(batch, clock, now_ns)
            except Exception as exc:  # one broken target must not stop the others
                target.stats.send_errors["internal"] += 1
                self.log(f"target {target.name}: export failed: {exc!r}")

    # -- the loop ------------------------------------------------------------------

    def announce(self) -> None:
        """Send templates at once (collectors learn them before any data)."""
        now, _, clock = self._clock()
        self.export(rec.empty(0), clock, now)

    def run(self, stop: threading.Event, between: Callable[[], None] | None = None) -> None:
        """Sweep every ``sweep-interval`` until ``stop`` is set, then flush everything.

        ``between`` runs before every sweep (the runner applies a pending reload there).
        """
        self.announce()
        while not stop.wait(self.settings.sweep_interval_ns / 1e9):
            if between is not None:
                between()
            self.tick()
        self.flush()

    def hand_over(self, new_meter: FlowMeter) -> np.ndarray:
        """Move to ``new_meter`` without losing a count (call with ``lock`` held).

        The caller has already put the new program in the old one's place on
        every interface (atomic replace), so nothing writes the old maps once
        the RCU barrier has passed.  Everything left in them is exported --
        expired entries as usual, the rest as forced ends -- then the agent
        works on the new maps with a fresh baseline.  Returns what was exported.
        """
        old = self.meter
        old.barrier()
        done = [self._tick(False), self._tick(True)]
        self.meter = new_meter
        self.baseline = Baseline()
        self._spilled.clear()
        new_meter.open_spill(self._spilled.append)
        return np.concatenate(done)

    def flush(self) -> None:
        """Shutdown: detach (no more writers), then export everything still cached."""
        with self.lock:
            self.meter.detach_all()
        self.meter.barrier()
        self.tick()  # normal rules first: expired entries end as idle / end of flow
        self.tick(final=True)  # what remains leaves as a forced end
