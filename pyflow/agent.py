"""The agent: sweep the flow cache when flows fall due, queue their records, send them paced.

Exact deletes (see docs/architecture.md, "Exact deletes"): the kernel never
writes an entry that has expired (idle, ended, or below its map's
``evict_before`` threshold); a flow that goes on meanwhile gets a new entry in
the other cache map.  So one tick

1. notes the boot clock and waits for an RCU grace period (``barrier``):
   every program run that began before has ended;
2. reads both cache maps in chunks (memory stays at one chunk) and applies
   the rules (``sweep.sweep_chunk``): an entry that expired before the
   barrier began is final, exported and later deleted; one open for the
   active timeout is cut (exported, kept);
3. queues the records on every target as one *batch*.

Targets send at their own pace (``Target.pump``).  Only when every target has
sent a batch does the kernel forget it (``FlowMeter.commit``: delete the final
entries, save the baseline); until then its entries are skipped by later
ticks.  An agent killed at any point leaves what was not committed for the
next one, which exports it again: never lost, at worst sent twice.  A batch
still queued after half the shortest timeout (``hold_ns``) is committed all the
same: its entries must leave the kernel before a flow that resumed meanwhile
expires in the resume map too; a kill in that window loses what was queued.

When a map is nearly full (``sweep.HIGH_WATER``), its ``evict_before``
threshold is raised above its idlest entries, which the next tick (at once)
exports with end reason *lack of resources*.

The loop (``run``) sweeps when the earliest cached flow falls due (its idle or
active timeout), at least every ``sweep-interval``, and in between sends what
the targets' pace allows.
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import numpy as np

from pyflow import records as rec
from pyflow.config import Settings
from pyflow.export.context import ExportClock
from pyflow.export.target import Target
from pyflow.kernel.abi import FLOW_KEY_DTYPE, METERED_COUNTERS, CacheMap, Hook
from pyflow.kernel.cache import EXPORTED_ROW_DTYPE
from pyflow.log import log as pyflow_log
from pyflow.records import EndReason
from pyflow.sweep import (
    HIGH_WATER,
    LOW_WATER,
    NEVER,
    SURGE_FROM,
    Baseline,
    Horizon,
    SweepRules,
    member,
    relief_threshold,
    sweep_chunk,
)

if TYPE_CHECKING:
    from pyflow.enrich import Enricher
    from pyflow.host.conntrack import NatEventListener

class CacheScanner(Iterable[tuple[CacheMap, np.ndarray, np.ndarray]], AbstractContextManager[object], Protocol):
    """A read of both cache maps in chunks, by a reader of its own (observers': ``pyflow flows``)."""


class FlowCache(Protocol):
    """The kernel's flow cache as the agent uses it (pyflow.kernel.loader.FlowMeter is the real one;
    tests/unit/fakes.py has an in-memory one): nothing about syscalls."""

    def read_exported(self) -> np.ndarray: ...  # rows of EXPORTED_ROW_DTYPE, sorted by flow id

    def read_chunks(self, chunk: int = ...) -> Iterator[tuple[CacheMap, np.ndarray, np.ndarray]]: ...

    def barrier(self) -> None: ...  # an RCU grace period: no program still writes what was read before

    def commit(self, deletes: dict[CacheMap, np.ndarray], gone: np.ndarray, rows: np.ndarray) -> int: ...

    def capacity(self, which: CacheMap) -> int: ...

    def evict_threshold(self, which: CacheMap) -> int: ...

    def set_evict_threshold(self, which: CacheMap, ns: int) -> None: ...

    def fin_events(self) -> int: ...  # flows that saw their first FIN/RST, ever (per-CPU sum)

    def flows_created(self) -> int: ...  # entries the kernel created, ever (per-CPU sum)

    def read_iface_stats(self) -> dict[tuple[int, int], np.ndarray]: ...

    def scan(self, chunk: int = ...) -> CacheScanner: ...

    def detach_all(self) -> None: ...


Cache = TypeVar("Cache", bound=FlowCache)


class SweepObserver(Protocol):
    """What the agent reports as it goes (pyflow.metrics.Metrics is the real one; tests pass fakes)."""

    def sweep_took(self, seconds: float) -> None: ...

    def records_left(self, lateness_seconds: np.ndarray, target: str) -> None: ...

    # one sweep's records and the cache entries it saw first, (keys, values) in parts (traffic analytics)
    def analyse(self, batch: Sequence[np.ndarray],
                new: Sequence[tuple[np.ndarray, np.ndarray]] | None = None) -> None: ...


REASON_LABELS = {EndReason.IDLE: "idle", EndReason.ACTIVE: "active", EndReason.END_OF_FLOW: "end_of_flow",
                 EndReason.FORCED: "forced", EndReason.LACK_OF_RESOURCES: "lack_of_resources"}
#: The shortest time between two sweeps, on top of SWEEP_GAP_FACTOR times the last one's own
#: duration: a large cache where something falls due all the time (a burst expiring over a
#: second or two) is swept with at most a third of one core.
MIN_SWEEP_GAP_NS = 50_000_000
SWEEP_GAP_FACTOR = 2
#: The hooks whose packets are what an interface received (ingress flow entries, the accounting gap).
INGRESS_HOOKS = (int(Hook.XDP), int(Hook.TC_INGRESS))
#: How often the loop looks at the kernel's counts of flows that saw their first FIN or RST and
#: of entries created (a surge of new flows that fills the cache).
FIN_POLL_NS = 250_000_000
#: What a sweep costs per cache entry, about (docs/benchmarks.md: a tick on 1 M entries, ~1 s): how
#: long the sweeps of a relief will take on a map that a surge is filling, before one has.
SWEEP_NS_PER_ENTRY = 1_000
#: How long a clean stop goes on sending at the targets' pace before it sends the rest at once.
FLUSH_PACED_NS = 5_000_000_000


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
    nat_events: int = 0  # NAT event records (conntrack), not flows
    evicted: int = 0  # entries exported early from a nearly full map (lack of resources)
    fill_sweeps: int = 0  # sweeps brought forward because new entries may have filled the flows map
    last_sweep_seconds: float = 0.0  # the sweep: barrier, read, rules, records queued
    last_commit_seconds: float = 0.0  # the last commit: final entries deleted, baseline saved
    last_barrier_seconds: float = 0.0  # of the last sweep, waiting for the RCU grace period
    cached: int = 0  # entries in the cache after the last sweep (both maps; not those about to leave)
    cached_resumed: int = 0  # of which in the resume map
    pending_commits: int = 0  # sweeps whose records some target has not sent yet
    records_by_reason: Tally[str] = field(default_factory=Tally)
    exported_packets: Tally[int] = field(default_factory=Tally)  # per ifindex, since start


@dataclass(frozen=True)
class Observed:
    """What the last sweep saw, for observers (metrics scrapes, ``pyflow status``): made once per
    sweep and never changed, so that reading it takes no lock and no look at the cache.

    ``accounted`` and ``metered`` (per ifindex, for the accounting gap; None when the agent has no
    metrics): packets in the ingress records queued since start plus those in the cache in no
    record yet, as of this sweep's read; and the kernel's metered counters (XDP and TC ingress)
    read just before it.  Their difference is what went missing between the kernel and the
    records (docs/metrics.md, "Accounting gap").
    """

    meter: object = None  # the meter whose cache was read (None: no sweep yet)
    sweeps: int = 0
    cached: int = 0  # entries in both maps after the sweep (not those about to leave)
    cached_resumed: int = 0  # of which in the resume map
    boot_ns: int = 0  # when the sweep read the cache (boot clock)
    accounted: Mapping[int, int] | None = None
    metered: Mapping[int, int] | None = None


@dataclass
class Pending:
    """One sweep's records on their way: what the kernel forgets once every target has sent them."""

    batch: int
    meter: FlowCache
    deletes: dict[CacheMap, np.ndarray]
    ids: np.ndarray  # flow ids of the entries to delete (later sweeps skip them)
    old: Baseline
    new: Baseline
    since_ns: int  # when the sweep queued it (boot clock)


@dataclass
class _FinWatch:
    """The kernel's count of flows that saw their first FIN/RST, as of the last sweep's barrier."""

    count: int = 0
    polled_ns: int = 0  # the last look that found it unchanged (at first: the barrier's start)
    due_ns: int = NEVER  # once it moved: when such a flow may fall due at the earliest


@dataclass
class _FillWatch:
    """The room the last sweep left in the flows map below its high water, against the kernel's
    count of entries created since that sweep's barrier (an upper bound on what has filled it)."""

    created: int = 0  # the kernel's count at the barrier
    room: int = NEVER  # entries that may be created before the map may be at high water
    polled_ns: int = 0
    seen: int = 0  # the count at the last look
    due_ns: int = NEVER  # once the room may be used up before a relief could take effect: now
    since_ns: int = 0  # the barrier's instant
    cached: int = 0  # entries the sweep left in the flows map
    leaving: float = 0.0  # entries per ns that left the flows map (the sweep's final ones / its span)
    rate: float = 0.0  # entries created per ns between the last two looks


@dataclass
class _Tick:
    """What one sweep gathers chunk by chunk."""

    records: list[np.ndarray] = field(default_factory=list)
    deletes: dict[CacheMap, list[np.ndarray]] = field(default_factory=lambda: {m: [] for m in CacheMap})
    cuts: list[Baseline] = field(default_factory=list)
    drops: list[np.ndarray] = field(default_factory=list)
    staying: dict[CacheMap, list[np.ndarray]] = field(default_factory=lambda: {m: [] for m in CacheMap})
    next_due_ns: int = NEVER
    unsent: Tally[int] | None = None  # per ifindex (ingress): packets in the cache in no record (when observed)
    new: list[tuple[np.ndarray, np.ndarray]] | None = None  # entries first seen since the last sweep (analytics)


def _cat(parts: Sequence[np.ndarray], dtype: np.dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _new_entries(out: list[tuple[np.ndarray, np.ndarray]], keys: np.ndarray, values: np.ndarray,
                 since_ns: int, until_ns: int) -> None:
    """Copies of the entries first seen in [since_ns, until_ns): the last sweep's instant to this
    one's (an entry created while this sweep reads is the next one's)."""
    first = values["first_seen_ns"]
    sel = (first >= since_ns) & (first < until_ns)
    if sel.any():
        out.append((keys[sel], values[sel]))


def _per_ifindex(ifindex: np.ndarray, packets: np.ndarray) -> Iterator[tuple[int, int]]:
    """(ifindex, sum of its packets); one interface (the usual chunk) without a sort."""
    if not len(ifindex):
        return
    lo, hi = int(ifindex.min()), int(ifindex.max())
    if lo == hi:
        yield lo, int(packets.sum(dtype=np.uint64))
        return
    idx, inv = np.unique(ifindex, return_inverse=True)
    sums = np.bincount(inv.reshape(-1), weights=packets.astype(np.float64), minlength=len(idx))
    yield from zip(idx.tolist(), (int(n) for n in sums.tolist()), strict=True)


class AgentView(Protocol):
    """What observers (metrics, the control socket) read of the agent: Agent is the real one, tests pass fakes."""

    @property
    def settings(self) -> Settings: ...

    @property
    def meter(self) -> FlowCache: ...

    @property
    def observed(self) -> Observed: ...

    @property
    def stats(self) -> AgentStats: ...

    @property
    def targets(self) -> list[Target]: ...

    @property
    def clocks(self) -> Clocks: ...

    @property
    def lock(self) -> threading.Lock: ...  # held only to copy references (the control socket's flows)

    @property
    def baseline(self) -> Baseline: ...


class Agent(Generic[Cache]):
    def __init__(self, settings: Settings, meter: Cache, targets: Sequence[Target],
                 clocks: Clocks | None = None, log: Callable[[str], None] | None = None,
                 metrics: SweepObserver | None = None, enricher: Enricher | None = None,
                 nat_events: NatEventListener | None = None) -> None:
        self.settings = settings
        # host-derived fields (masks, gateways, NAT, AS) and conntrack's NAT events, when wanted
        self.enricher = enricher
        self.nat_events = nat_events
        self.meter = meter
        self.targets = list(targets)
        self.clocks = clocks or Clocks()
        # The exporter's boot instant (wall ms), fixed for the session: every header's sysUptime is
        # measured from it (ExportClock), so collectors derive the same boot time from each one.  The
        # host's boot by default; the earlier agent's when its session goes on (export.session).
        self.boot_unix_ms = (self.clocks.wall_ns() - self.clocks.boot_ns()) // 10**6
        self.rules = SweepRules(
            active_ns=settings.active_flow_timeout_ns,
            inactive_ns=settings.inactive_flow_timeout_ns,
            end_idle_ns=settings.end_idle_ns,
        )
        # what earlier agents already exported of the flows in this meter's cache (pinned maps)
        self.baseline = Baseline.from_rows(meter.read_exported())
        self.stats = AgentStats()
        # a nearly full map is relieved down to low_water x its size
        self.high_water = HIGH_WATER
        self.low_water = LOW_WATER
        self._evict = {m: meter.evict_threshold(m) for m in CacheMap}
        self._relief_logged_ns: int | None = None
        self._relieved = 0  # entries of the flows map the last relief set leaving (the next sweep's)
        self._batch = 0
        self._pending: collections.deque[Pending] = collections.deque()
        self._skip = np.zeros(0, dtype=np.uint64)  # sorted flow ids of the pending deletes
        self.next_due_ns = 0  # when the next sweep is due (boot clock)
        self._earliest_ns = 0  # no sweep before this (MIN_SWEEP_GAP_NS after the last one)
        self._fin = _FinWatch()
        self._fill = _FillWatch()
        # the last sweep's instant: an entry first seen from it to the next sweep's is new to that one
        # (the traffic analytics count each flow once, as it starts); none from before this agent
        self._swept_ns = self.clocks.boot_ns()
        self.metrics = metrics
        # held during a tick and while targets send; observers take it only to copy a few
        # references (pyflow flows: the meter's maps, the baseline), never to read the cache
        self.lock = threading.Lock()
        # what the last sweep saw: replaced (never changed) at the end of every sweep
        self.observed = Observed()
        self.log = log or pyflow_log

    # -- clocks ----------------------------------------------------------------------

    def _clock(self) -> tuple[int, int, ExportClock]:
        b = self.clocks.boot_ns()
        w = self.clocks.wall_ns()
        return b, w - b, ExportClock.at(w, self.boot_unix_ms)

    def _export_clock(self) -> tuple[ExportClock, int]:
        b, _, clock = self._clock()
        return clock, b

    # -- one sweep ---------------------------------------------------------------------

    def tick(self, final: bool = False) -> np.ndarray:
        """One sweep, its records sent at once (whatever the pace) and committed; returns them."""
        with self.lock:
            batch = self._sweep(final)
            self._drain(paced=False)
            return _cat(batch, rec.RECORD_DTYPE)

    def _sweep(self, final: bool) -> list[np.ndarray]:
        """Sweep both cache maps once and queue the records on every target; returns them (in parts:
        half a million records are 95 MB, not copied into one array)."""
        t0 = time.perf_counter()
        meter = self.meter
        evict = dict(self._evict)  # thresholds in force before this barrier
        final_ns = self.clocks.boot_ns()
        self._fin = _FinWatch(meter.fin_events(), final_ns)
        created = meter.flows_created()
        since, self._swept_ns = self._swept_ns, final_ns
        tb = time.perf_counter()
        meter.barrier()
        self.stats.last_barrier_seconds = time.perf_counter() - tb
        now, wall_offset, _ = self._clock()
        observe = self.metrics is not None
        metered = self._metered() if observe else None
        t = _Tick(unsent=Tally() if observe else None,
                  new=[] if observe and self.settings.analytics.enabled else None)
        for which, keys, values in meter.read_chunks():
            horizon = Horizon(final_ns, now, evict[which])
            r = sweep_chunk(keys, values, self.baseline, horizon, wall_offset, self.rules, self._skip, final)
            t.records.append(r.records)
            if len(r.delete):
                t.deletes[which].append(keys[r.delete].copy())
                t.drops.append(r.drop_ids)
            t.cuts.append(r.cuts)
            t.next_due_ns = min(t.next_due_ns, r.next_due_ns)
            if t.new is not None:
                _new_entries(t.new, keys, values, since, final_ns)
            if r.stay is not None:  # the skip list was looked up once, in sweep_chunk
                t.staying[which].append(values["last_seen_ns"][r.stay].copy())
            if t.unsent is not None and r.unsent is not None:
                sel = (keys["direction"] == 0) & (r.unsent > 0)
                t.unsent.update(dict(_per_ifindex(keys["ifindex"][sel], r.unsent[sel])))
        batch = self._queue(t, meter)
        cached = {m: sum(len(a) for a in t.staying[m]) for m in CacheMap}
        # the flows map's final entries, but for those the last relief sent: what leaves of itself
        finals = max(0, sum(len(d) for d in t.deletes[CacheMap.FLOWS]) - self._relieved)
        leaving = finals / max(FIN_POLL_NS, final_ns - self._fill.since_ns)
        relieved = self._relieve(t, now, self._incoming(created, final_ns, leaving)) if not final else {}
        for which, leaving in relieved.items():
            cached[which] -= leaving
        self._relieved = relieved.get(CacheMap.FLOWS, 0)
        self.next_due_ns = t.next_due_ns
        self._fill = self._fill_watch(created, final_ns, cached[CacheMap.FLOWS], leaving)
        self.stats.cached_resumed = cached[CacheMap.RESUMED]
        for part in batch:
            self._account(part)
        self.stats.sweeps += 1
        self.stats.cached = sum(cached.values())
        self._publish(meter, now, t.unsent, metered)
        self.stats.last_sweep_seconds = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.sweep_took(self.stats.last_sweep_seconds)
            self.metrics.analyse(batch, t.new)  # traffic analytics ([analytics]), after the sweep's own time
        return batch

    def _queue(self, t: _Tick, meter: FlowCache) -> list[np.ndarray]:
        """The sweep's records (host fields added, NAT events joined) onto every target, as one batch."""
        cuts = [c for c in t.cuts if len(c)]
        drops = _cat(t.drops, np.dtype(np.uint64))
        new = self.baseline.updated(
            drops, _cat([c.ids for c in cuts], np.dtype(np.uint64)),
            _cat([c.packets for c in cuts], np.dtype(np.uint64)), _cat([c.bytes for c in cuts], np.dtype(np.uint64)),
            _cat([c.start_ns for c in cuts], np.dtype(np.uint64)))
        batch = self._host_fields([r for r in t.records if len(r)])
        self._batch += 1
        deletes = {m: _cat(parts, FLOW_KEY_DTYPE) for m, parts in t.deletes.items() if parts}
        if deletes or new is not self.baseline:  # something for the kernel to forget
            self._pending.append(Pending(self._batch, meter, deletes, drops, self.baseline, new,
                                         self.clocks.boot_ns()))
        self.baseline = new
        if len(drops):  # flow ids are unique, and a skipped entry is never dropped again: no overlap
            self._skip = np.sort(np.concatenate([self._skip, drops]))
        for target in self.targets:
            for part in batch:
                target.enqueue(part, self._batch)
        return batch

    def _host_fields(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        """Routing, NAT and AS fields added to the flow records; NAT event records appended."""
        events = self.nat_events.drain() if self.nat_events is not None else rec.empty(0)
        if self.enricher is not None and self.enricher.nat is not None:
            self.enricher.nat.learn(events)  # connections that came and went since the last refresh
        if self.enricher is not None and batch:
            if self.enricher.nat is not None:
                self.enricher.nat.refresh()  # the NAT'ed connections as they are now
            for part in batch:
                self.enricher.enrich(part)
        return [*batch, events] if len(events) else batch

    def _relieve(self, t: _Tick, now_ns: int, incoming: int) -> dict[CacheMap, int]:
        """Raise a nearly full map's ``evict_before`` above its idlest entries; the next sweep
        (due at once) exports them with end reason *lack of resources* (docs/reliability.md).
        Returns how many entries of each map are now leaving."""
        out = {}
        for which in CacheMap:
            last = _cat(t.staying[which], np.dtype(np.uint64))
            capacity = self.meter.capacity(which)
            ahead = incoming if which == CacheMap.FLOWS else 0  # new flows start in the flows map
            cut = relief_threshold(last, capacity, self.high_water, self.low_water, ahead)
            if cut is None:
                continue
            cut = max(cut, self._evict[which])  # it only ever rises
            self.meter.set_evict_threshold(which, cut)
            self._evict[which] = cut
            leaving = int(np.count_nonzero(last < cut))
            out[which] = leaving
            self.stats.evicted += leaving
            t.next_due_ns = min(t.next_due_ns, now_ns)
            if self._relief_logged_ns is None or now_ns - self._relief_logged_ns >= 60 * 10**9:
                self._relief_logged_ns = now_ns
                surge = " and filling fast" if len(last) < self.high_water * capacity else ""
                self.log(f"{which.name.lower()} map {100 * len(last) / capacity:.0f}% full ({len(last):,} of "
                         f"{capacity:,} entries){surge}: exporting the {leaving:,} idle the longest early (lack of "
                         "resources); raise cache-entries if this goes on")
        return out

    # -- sending and committing -----------------------------------------------------------

    def pump(self, paced: bool = True) -> int | None:
        """Send what every target's pace allows now, commit what all have sent; when to pump again."""
        wake: int | None = None
        for target in self.targets:
            try:
                if not target.waiting:  # templates on their timer (v9-template-timeout) with nothing to send
                    clock, now = self._export_clock()
                    target.export(rec.empty(0), clock, now)
                nxt = target.pump(self._export_clock, functools.partial(self._sent, target), paced)
            except Exception as exc:  # one broken target must not stop the others
                target.stats.send_errors["internal"] += 1
                target.discard()
                self.log(f"target {target.name}: export failed: {exc!r}")
                continue
            if nxt is not None:
                wake = nxt if wake is None else min(wake, nxt)
        self._commit_ready()
        return wake

    def _drain(self, paced: bool, deadline_ns: int | None = None) -> None:
        """Send everything queued (at the targets' pace until ``deadline_ns``), and commit it."""
        while any(t.waiting for t in self.targets):
            wake = self.pump(paced)
            if wake is None:
                break
            now = self.clocks.boot_ns()
            if deadline_ns is not None and now >= deadline_ns:
                paced = False
                continue
            time.sleep(max(0.0, (wake - now) / 1e9))
        self._commit_ready()

    def hold_ns(self) -> int:
        """How long a batch's entries wait in the kernel for its records to leave, at most: half the
        shortest timeout.  Longer, and a flow that resumed meanwhile could see its entries in both
        maps expire before either is taken out (sweep_behind)."""
        return min(self.rules.inactive_ns, self.rules.end_idle_ns) // 2

    def _commit_ready(self) -> None:
        """The kernel forgets the batches every target has sent, or that have waited ``hold_ns``
        (in order; their records still leave, from the queues)."""
        done = [s for t in self.targets if (s := t.sent_through()) is not None]
        upto = min(done) if done else self._batch
        oldest = self.clocks.boot_ns() - self.hold_ns()
        while self._pending and (self._pending[0].batch <= upto or self._pending[0].since_ns <= oldest):
            p = self._pending.popleft()
            t0 = time.perf_counter()
            self.stats.deleted += p.meter.commit(p.deletes, *p.old.changes(p.new, EXPORTED_ROW_DTYPE))
            self.stats.last_commit_seconds = time.perf_counter() - t0
            if not self._pending:
                self._skip = self._skip[:0]  # every pending entry is gone
            elif len(p.ids):
                self._skip = self._skip[~member(np.sort(p.ids), self._skip)]
        self.stats.pending_commits = len(self._pending)

    def _sent(self, target: Target, records: np.ndarray, now_ns: int) -> None:
        """Export lateness, measured as records leave for a target: seconds past their timeout."""
        if self.metrics is None or not len(records):
            return
        _, wall_offset, _ = self._clock()
        now_ms = (now_ns + wall_offset) / 1e6
        idle = records["end_reason"] == EndReason.IDLE
        active = records["end_reason"] == EndReason.ACTIVE
        late = np.concatenate([
            (now_ms - records["end_ms"][idle]) / 1e3 - self.rules.inactive_ns / 1e9,
            (now_ms - records["start_ms"][active]) / 1e3 - self.rules.active_ns / 1e9,
        ])
        self.metrics.records_left(np.maximum(late, 0.0), target.name)

    def _account(self, part: np.ndarray) -> None:
        """Tallies of one part of a sweep's records (column by column: no copies of whole rows)."""
        s = self.stats
        flows = part["nat_event"] == 0
        s.nat_events += len(part) - int(np.count_nonzero(flows))
        s.records += int(np.count_nonzero(flows))
        reasons = np.bincount(part["end_reason"][flows], minlength=len(EndReason) + 1)
        for r in np.flatnonzero(reasons).tolist():
            s.records_by_reason[REASON_LABELS.get(EndReason(r), str(r))] += int(reasons[r])
        # what each interface received: flows metered on ingress (the gap metric compares it
        # with the interface's own rx counter)
        ingress = flows & (part["direction"] == 0)
        ifindex = part["meter_ifindex"][ingress]
        if not len(ifindex):
            return
        idx, pk = np.unique(ifindex, return_inverse=True)
        sums = np.bincount(pk.reshape(-1), weights=part["packets"][ingress].astype(np.float64), minlength=len(idx))
        for i, n in zip(idx.tolist(), sums.tolist(), strict=True):
            s.exported_packets[i] += int(n)

    def _metered(self) -> dict[int, int]:
        """Per ifindex: the kernel's count of packets added to ingress flow entries (XDP, TC ingress)."""
        out: Tally[int] = Tally()
        for (ifindex, hook), st in self.meter.read_iface_stats().items():
            if hook in INGRESS_HOOKS:
                out[ifindex] += sum(int(st["counters"][c]) for c in METERED_COUNTERS)
        return dict(out)

    def _publish(self, meter: FlowCache, now_ns: int, unsent: Tally[int] | None,
                 metered: dict[int, int] | None) -> None:
        """The sweep's ``Observed``, in place of the last one (one reference assignment: atomic)."""
        accounted = None
        if unsent is not None:
            total = Tally(self.stats.exported_packets)
            total.update(unsent)
            accounted = MappingProxyType(dict(total))
        self.observed = Observed(meter, self.stats.sweeps, self.stats.cached, self.stats.cached_resumed, now_ns,
                                 accounted, None if metered is None else MappingProxyType(metered))

    def export(self, batch: np.ndarray, clock: ExportClock, now_ns: int) -> None:
        """Send ``batch`` to every target at once, outside the queues (templates at start)."""
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
        """Sweep when flows fall due and send at the targets' pace until ``stop`` is set, then flush.

        ``between`` runs before every sweep (the runner applies a pending reload there).
        """
        self.announce()
        wake: int | None = None
        while not stop.is_set():
            now = self.clocks.boot_ns()
            due = min(self.next_due_ns, max(min(self._fin_due(now), self._fill_due(now)), self._earliest_ns))
            if now >= due:
                if between is not None:
                    between()
                with self.lock:
                    self._sweep(False)
                self.next_due_ns = self._next_sweep_ns(self.next_due_ns)
                due = self.next_due_ns
            with self.lock:
                wake = self.pump()
            until = min(due, self.clocks.boot_ns() + FIN_POLL_NS, NEVER if wake is None else wake)
            stop.wait(max(0.0, (until - self.clocks.boot_ns()) / 1e9))
        self.flush()

    def _fin_due(self, now_ns: int) -> int:
        """When a flow that saw its first FIN or RST after the last sweep may fall due at the
        earliest (NEVER: none did).  Its end-idle timeout starts at that packet, after the last
        look that found the kernel's count unchanged."""
        watch = self._fin
        if watch.due_ns != NEVER or now_ns - watch.polled_ns < FIN_POLL_NS:
            return watch.due_ns
        with self.lock:
            count = self.meter.fin_events()
        if count == watch.count:
            watch.polled_ns = now_ns
        else:
            watch.due_ns = watch.polled_ns + self.rules.end_idle_ns
        return watch.due_ns

    def _fill_watch(self, created: int, barrier_ns: int, cached: int, leaving: float) -> _FillWatch:
        """What the loop watches after a sweep: the room it left below the flows map's high water."""
        return _FillWatch(created, int(self.high_water * self.meter.capacity(CacheMap.FLOWS)) - cached, barrier_ns,
                          created, since_ns=barrier_ns, cached=cached, leaving=leaving)

    def _relief_horizon_ns(self, entries: int) -> int:
        """How long a relief decided now takes to make room and the next one can come: one look, and
        two sweeps with their gaps, each as long as the last one, or SWEEP_NS_PER_ENTRY x ``entries``."""
        sweep_ns = max(int(self.stats.last_sweep_seconds * 1e9), SWEEP_NS_PER_ENTRY * entries)
        return FIN_POLL_NS + 2 * (MIN_SWEEP_GAP_NS + (SWEEP_GAP_FACTOR + 1) * sweep_ns)

    def _fill_due(self, now_ns: int) -> int:
        """Now, once the entries the kernel created since the last sweep may fill the flows map to its
        high water, or, from half full (SURGE_FROM), they and those a surge at the rate of the last
        look (less the rate entries left) adds before a relief could take effect; NEVER until then.
        A surge of new flows gets relief (docs/reliability.md, "A full cache") before the cache is
        full, not a sweep-interval later."""
        watch = self._fill
        if watch.due_ns != NEVER or now_ns - watch.polled_ns < FIN_POLL_NS:
            return watch.due_ns
        with self.lock:
            created = self.meter.flows_created()
        watch.rate = (created - watch.seen) / max(1, now_ns - watch.polled_ns)
        watch.polled_ns, watch.seen, new = now_ns, created, created - watch.created
        ahead = max(0.0, watch.rate - watch.leaving) * self._relief_horizon_ns(watch.cached + new)
        surge_from = SURGE_FROM * self.meter.capacity(CacheMap.FLOWS)
        if new >= watch.room or (watch.cached + new >= surge_from and new + ahead >= watch.room):
            watch.due_ns = now_ns
            self.stats.fill_sweeps += 1
        return watch.due_ns

    def _incoming(self, created: int, barrier_ns: int, leaving: float) -> int:
        """In a sweep a surge brought forward (0 in any other), the entries it may add to the flows map
        before a relief decided now takes effect and the next one can: the rate they were created at
        (since the last sweep, or between the last two looks if faster) less ``leaving``, the rate
        entries left (this sweep's final ones, per ns), over ``_relief_horizon_ns``."""
        watch = self._fill
        if watch.due_ns == NEVER:
            return 0
        span = max(FIN_POLL_NS, barrier_ns - watch.since_ns)
        rate = max(watch.rate, (created - watch.created) / span) - leaving
        return max(0, int(rate * self._relief_horizon_ns(watch.cached + created - watch.created)))

    def _next_sweep_ns(self, due_ns: int) -> int:
        """When to sweep next: when the earliest flow falls due, at least every sweep-interval, and not
        sooner than MIN_SWEEP_GAP_NS plus SWEEP_GAP_FACTOR times the last sweep's own duration after it."""
        now = self.clocks.boot_ns()
        self._earliest_ns = now + MIN_SWEEP_GAP_NS + int(SWEEP_GAP_FACTOR * self.stats.last_sweep_seconds * 1e9)
        return max(self._earliest_ns, min(due_ns, now + self.sweep_interval_ns()))

    def sweep_interval_ns(self) -> int:
        """The longest time between sweeps: the inactive or active timeout, or sweep-interval if shorter.

        An entry the last sweep did not see (created since) falls due at the earliest its
        inactive or active timeout after that sweep; one that saw its first FIN or RST since, its
        end-idle timeout after it, which the kernel's count tells (``_fin_due``); the entries
        the sweep saw, at the due instant it returned.  So the loop is on time for every entry
        without reading the whole cache every end-idle timeout.
        """
        r = self.rules
        return min(self.settings.sweep_interval_ns, r.inactive_ns, r.active_ns)

    def hand_over(self, new_meter: Cache) -> np.ndarray:
        """Move to ``new_meter`` without losing a count (call with ``lock`` held).

        The caller has already put the new program in the old one's place on
        every interface (atomic replace), so nothing writes the old maps once
        the RCU barrier has passed.  Everything left in them is exported --
        expired entries as usual, the rest as forced ends -- and sent at once,
        then the agent works on the new maps with their baseline (empty for a
        new program; what an earlier agent exported, for one it left pinned).
        Returns what was exported.
        """
        done = [*self._sweep(False), *self._sweep(True)]
        self._drain(paced=False)
        self.meter = new_meter
        self.baseline = Baseline.from_rows(new_meter.read_exported())
        self._evict = {m: new_meter.evict_threshold(m) for m in CacheMap}
        self.next_due_ns = 0
        return _cat(done, rec.RECORD_DTYPE)

    def flush(self) -> None:
        """Shutdown: detach (no more writers), export everything still cached, send it all."""
        with self.lock:
            self.meter.detach_all()
            self._sweep(False)  # normal rules first: expired entries end as idle / end of flow
            self._sweep(True)  # what remains leaves as a forced end
            self._drain(paced=True, deadline_ns=self.clocks.boot_ns() + FLUSH_PACED_NS)
