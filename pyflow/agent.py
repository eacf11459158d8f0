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

When the cache is nearly full (``sweep.HIGH_WATER`` of cache-entries) after
that, the entries idle the longest leave at once, down to ``sweep.LOW_WATER``,
exported with end reason *lack of resources* (``_relieve``): frozen by the
kernel's ``evict_before`` threshold and deleted like expired entries where the
program has it (exact), else taken with BPF_MAP_LOOKUP_AND_DELETE_ELEM (one
window of tens of nanoseconds left).  See docs/reliability.md, "A full cache".
"""

from __future__ import annotations

import errno
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
from pyflow.kernel.bpfsys import (
    BpfError,
    map_delete,
    map_lookup,
    map_lookup_and_delete_many,
    map_update_batch,
)
from pyflow.kernel.loader import FlowMeter
from pyflow.records import EndReason
from pyflow.sweep import (
    HIGH_WATER,
    LOW_WATER,
    SweepRules,
    expired,
    final_records,
    relief_victims,
    spill_records,
    sweep,
)

if TYPE_CHECKING:
    from pyflow.enrich import Enricher
    from pyflow.host.conntrack import NatEventListener
    from pyflow.metrics import Metrics

ENOTSUPP = 524  # the kernel's own "operation not supported" (not in errno)
ZERO_KEY = b"\0\0\0\0"  # key 0 of an array map
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
    evicted: int = 0  # entries taken out of a nearly full cache early (lack of resources; also in deleted)
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
        # what earlier agents already exported of the flows in this meter's cache (pinned maps)
        self.baseline = meter.load_baseline()
        self.stats = AgentStats()
        self._spilled: list[np.ndarray] = []
        # a nearly full cache is relieved down to low_water x cache-entries (see _relieve)
        self.high_water = HIGH_WATER
        self.low_water = LOW_WATER
        self._atomic_take = True  # BPF_MAP_LOOKUP_AND_DELETE_ELEM works on this kernel (hash maps: 5.14+)
        self._relief_logged_ns: int | None = None
        self._evict_meter: FlowMeter | None = None  # the meter _evict_fd was looked up in
        self._evict_fd: int | None = None
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
        before = self.baseline
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
        cached = len(keys) - int(np.count_nonzero(res.delete))
        batch = res.records
        delete_keys = keys[res.delete]
        if not final:
            stay = ~res.delete
            early, taken, frozen = self._relieve(keys[stay], values[stay], now, wall_offset)
            cached -= taken
            if len(early):
                batch = np.concatenate([batch, early])
            if len(frozen):  # final by the kernel's threshold: deleted with the expired ones
                delete_keys = np.concatenate([delete_keys, frozen])

        self.meter.poll_spill()
        if self._spilled:
            events = np.concatenate(self._spilled)
            self._spilled.clear()
            self.stats.spill_events += len(events)
            batch = np.concatenate([batch, spill_records(events, wall_offset)])
        events = self.nat_events.drain() if self.nat_events is not None else rec.empty(0)
        if self.enricher is not None and self.enricher.nat is not None:
            self.enricher.nat.learn(events)  # connections that came and went since the last refresh
        if self.enricher is not None and len(batch):
            if self.enricher.nat is not None:
                self.enricher.nat.refresh()  # the NAT'ed connections as they are now
            self.enricher.enrich(batch)
        if len(events):
            batch = np.concatenate([batch, events])
        self.export(batch, clock, now)
        # Only now does the kernel forget what was just exported: the expired entries, the
        # baseline of cut flows, the spill events read.  An agent killed before this line leaves
        # all of it to the next one, which exports it (docs/architecture.md, "Pinning and restart").
        self.stats.deleted += self.meter.commit(delete_keys, before, self.baseline)
        self._account(batch, cached, now, wall_offset)
        self.stats.last_sweep_seconds = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.sweep_duration.observe(self.stats.last_sweep_seconds)
        return batch

    def _relieve(self, keys: np.ndarray, values: np.ndarray, now_ns: int,
                 wall_offset_ns: int) -> tuple[np.ndarray, int, np.ndarray]:
        """Early export of a nearly full cache: (records, entries leaving, keys left to delete).

        ``keys``/``values``: the entries that stay after the sweep.  From
        ``high_water`` x cache-entries on, the entries idle the longest leave
        the cache until it holds ``low_water`` x cache-entries, exported with
        end reason *lack of resources* (what an active-timeout cut already
        exported is not sent again: the baseline).  Packets of those flows
        arriving afterwards start new entries.

        Two ways, by what the kernel program offers (docs/reliability.md):

        * its ``evict_before`` threshold (exact): the kernel treats an entry
          last seen before it as expired, exactly like an idle one (never
          written; its packets are spilled).  The agent sets it just above the
          victims' last-seen times, waits for the RCU barrier and re-reads
          them: their values are final (one whose last-seen moved past the
          threshold is no longer idle-longest and stays).  They are deleted
          with the expired entries, after the export (the third value).
        * without it: BPF_MAP_LOOKUP_AND_DELETE_ELEM, which copies the value
          and unlinks the entry under the bucket lock in one step.  One
          window is left: a program run that found the entry just before the
          unlink and adds its packet just after the copy loses that packet
          (tens of nanoseconds, on the idlest flows of the cache).
        """
        capacity = self.meter.settings.cache_entries
        victims = relief_victims(values["last_seen_ns"], capacity, self.high_water, self.low_water)
        if not len(victims):
            return rec.empty(0), 0, keys[:0]
        threshold = self._evict_threshold()
        if threshold is not None:
            vkeys, finals = self._freeze(keys, values, victims, threshold)
            later = vkeys
        else:
            vkeys = np.ascontiguousarray(keys[victims])
            found, finals = self._take(vkeys)
            self.stats.vanished += len(vkeys) - int(np.count_nonzero(found))
            vkeys, finals = vkeys[found], finals[found]
            self.stats.deleted += len(vkeys)
            later = keys[:0]
        taken = len(vkeys)
        self.stats.evicted += taken
        out, self.baseline = final_records(vkeys, finals, self.baseline, wall_offset_ns, EndReason.LACK_OF_RESOURCES)
        if self._relief_logged_ns is None or now_ns - self._relief_logged_ns >= 60 * 10**9:
            self._relief_logged_ns = now_ns
            self.log(f"flow cache {100 * len(values) / capacity:.0f}% full ({len(values):,} of {capacity:,} "
                     f"entries): exported the {taken:,} idle the longest early (lack of resources); "
                     "raise cache-entries if this goes on")
        return out, taken, later

    def _evict_threshold(self) -> int | None:
        """The fd of the kernel program's ``evict_before`` array, or None if it has none."""
        if self._evict_meter is not self.meter:
            self._evict_meter = self.meter
            maps = getattr(self.meter, "maps", None)
            if isinstance(maps, dict):
                self._evict_fd = maps.get("evict_before")
            else:
                try:
                    self._evict_fd = int(self.meter.table("evict_before").map_fd)
                except KeyError:
                    self._evict_fd = None
        return self._evict_fd

    def _freeze(self, keys: np.ndarray, values: np.ndarray, victims: np.ndarray,
                fd: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact way: the kernel's threshold above the victims, barrier, re-read.
        Returns the keys and final values of the entries now frozen (the kernel never writes
        them again); the caller deletes them."""
        last = values["last_seen_ns"]
        cut = int(last[victims[-1]]) + 1  # victims come idle-longest first
        raw = map_lookup(fd, ZERO_KEY, 8)
        old = int.from_bytes(raw, sys.byteorder) if raw is not None else 0
        cut = max(cut, old)  # it only ever rises: everything last seen before the old one is gone
        cand = np.flatnonzero(last < cut)  # the victims, and any entry last seen at the same instant
        map_update_batch(fd, np.zeros(1, dtype=np.uint32), np.array([cut], dtype=np.uint64))
        self.meter.barrier()  # every run that may not have seen the threshold has ended
        vkeys = np.ascontiguousarray(keys[cand])
        vvals = values[cand].copy()
        gone = self._reread(vkeys, vvals, np.arange(len(cand)))
        alive = np.ones(len(cand), dtype=bool)
        alive[gone] = False
        # last seen at or after the threshold: written by a run before the barrier, not idle; it stays
        final = alive & (vvals["last_seen_ns"] < cut)
        return vkeys[final], vvals[final]

    def _take(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Take these entries out of the flow map, with their values: (found, values)."""
        fd = self.meter.flows_fd
        if self._atomic_take:
            try:
                return map_lookup_and_delete_many(fd, keys, abi.FLOW_VALUE_DTYPE)
            except BpfError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP):
                    raise
                self._atomic_take = False
                self.log("this kernel cannot take hash map entries out atomically (Linux < 5.14): the early "
                         "export of a full cache reads, then deletes (a packet counted in between is lost)")
        size = abi.FLOW_VALUE_DTYPE.itemsize
        found = np.zeros(len(keys), dtype=bool)
        values = np.zeros(len(keys), dtype=abi.FLOW_VALUE_DTYPE)
        for i in range(len(keys)):
            raw = map_lookup(fd, keys[i].tobytes(), size)
            if raw is not None and map_delete(fd, keys[i].tobytes()):
                values[i] = np.frombuffer(raw, dtype=abi.FLOW_VALUE_DTYPE)[0]
                found[i] = True
        return found, values

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
        The sweep runs at least twice per inactive-flow-timeout, so an idle flow leaves
        within 1.5 timeouts of its last packet (with 1 s: 1.5 s, not 2 s).
        """
        self.announce()
        while not stop.wait(self.sweep_seconds()):
            if between is not None:
                between()
            self.tick()
        self.flush()

    def sweep_seconds(self) -> float:
        """The time between sweeps: sweep-interval, but at most half the inactive-flow-timeout."""
        return min(self.settings.sweep_interval_ns, self.settings.inactive_flow_timeout_ns // 2) / 1e9

    def hand_over(self, new_meter: FlowMeter) -> np.ndarray:
        """Move to ``new_meter`` without losing a count (call with ``lock`` held).

        The caller has already put the new program in the old one's place on
        every interface (atomic replace), so nothing writes the old maps once
        the RCU barrier has passed.  Everything left in them is exported --
        expired entries as usual, the rest as forced ends -- then the agent
        works on the new maps with their baseline (empty for a new program;
        what an earlier agent exported, for one it left pinned).  Returns what
        was exported.
        """
        old = self.meter
        old.barrier()
        done = [self._tick(False), self._tick(True)]
        self.meter = new_meter
        self.baseline = new_meter.load_baseline()
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
