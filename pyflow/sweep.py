"""The sweep: RouterOS's timeout rules as pure functions of (entries, state, clock).

Called once per sweep tick for each chunk of the kernel flow cache (both of
its maps, ``flows`` and ``resumed``, read in chunks so memory stays bounded
whatever cache-entries is).  It decides, for every entry, whether a record
leaves now and why:

* idle:   idle for ``inactive-flow-timeout`` -> export the last delta and
  delete the entry (end reason *idle*);
* end:    TCP FIN or RST seen and idle for ``end-idle`` -> export, delete
  (end reason *end of flow*);
* lack of resources: last seen before the map's ``evict_before`` threshold
  (the agent's early export of a nearly full map) -> export, delete;
* active: open for ``active-flow-timeout`` since the record began -> export
  the delta since the last export and KEEP the entry (end reason *active*).

An entry leaves (is exported and deleted) only once it is **final**: the
kernel stopped writing it when it expired, and every program run that could
still have written it has ended.  A tick starts with an RCU barrier; an entry
whose expiry instant came before the barrier began is final in any read made
after it (docs/architecture.md, "Exact deletes").  One expiring between the
barrier and the read waits for the next tick.

Kernel counters are cumulative and never reset; what was already exported is
remembered here, per kernel flow id, in a ``Baseline`` (only for flows that
were cut by the active timeout).  Everything is vectorised with numpy.

Clocks are arguments: times are CLOCK_BOOTTIME (the kernel's
``bpf_ktime_get_boot_ns``) and ``wall_offset_ns`` converts them to Unix time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pyflow import records as rec
from pyflow.records import EndReason

TCP_FIN = 0x01
TCP_RST = 0x04
NS_PER_MS = 1_000_000
#: Share of cache-entries at which the cache is relieved early ...
HIGH_WATER = 0.90
#: ... and the share it is brought back down to (lack-of-resources records) ...
LOW_WATER = 0.75
#: ... or lower, to make room for a surge of new flows, but never below this share;
FLOOR_WATER = 0.25
#: a surge counts once the map is at least this full (below, a burst that fits is not cut short).
SURGE_FROM = 0.50


@dataclass(frozen=True)
class SweepRules:
    """The timeouts, in nanoseconds."""

    active_ns: int
    inactive_ns: int
    end_idle_ns: int

    def __post_init__(self) -> None:
        if self.inactive_ns <= 0 or self.active_ns <= 0 or self.end_idle_ns <= 0:
            raise ValueError("timeouts must be positive")


def _empty_u64() -> np.ndarray:
    return np.zeros(0, dtype=np.uint64)


@dataclass(frozen=True)
class Baseline:
    """What was already exported of flows cut by the active timeout.

    Arrays sorted by ``ids`` (the kernel's per-entry ``flow_id``):
    cumulative packets and bytes at the last export, and when the next
    record of that flow began (the cut time, boot clock).
    """

    ids: np.ndarray = field(default_factory=_empty_u64)
    packets: np.ndarray = field(default_factory=_empty_u64)
    bytes: np.ndarray = field(default_factory=_empty_u64)
    start_ns: np.ndarray = field(default_factory=_empty_u64)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_rows(cls, rows: np.ndarray) -> Baseline:
        """From rows with fields id, packets, bytes, start_ns, sorted by id (the kernel's exported table)."""
        return cls(*(np.asarray(rows[name], dtype=np.uint64) for name in ("id", "packets", "bytes", "start_ns")))

    def changes(self, new: Baseline, row_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """What turns this baseline into ``new``: the ids gone, and ``new``'s rows that are new or
        changed (as ``row_dtype`` rows: id, packets, bytes, start_ns)."""
        gone = self.ids[~np.isin(self.ids, new.ids, assume_unique=True)] if len(self) else _empty_u64()
        changed = np.ones(len(new), dtype=bool)
        if len(self) and len(new):
            has, pos = self.join(new.ids)
            changed = ~(has & (self.packets[pos] == new.packets) & (self.bytes[pos] == new.bytes)
                        & (self.start_ns[pos] == new.start_ns))
        rows = np.zeros(int(np.count_nonzero(changed)), dtype=row_dtype)
        for name, column in (("id", new.ids), ("packets", new.packets), ("bytes", new.bytes),
                             ("start_ns", new.start_ns)):
            rows[name] = column[changed]
        return gone, rows

    def join(self, flow_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each flow id: (has a baseline?, index into the baseline arrays)."""
        if len(self.ids) == 0:
            return np.zeros(len(flow_ids), dtype=bool), np.zeros(len(flow_ids), dtype=np.intp)
        pos = np.searchsorted(self.ids, flow_ids)
        pos = np.minimum(pos, len(self.ids) - 1)
        return self.ids[pos] == flow_ids, pos

    def updated(self, drop_ids: np.ndarray, cut_ids: np.ndarray, cut_packets: np.ndarray,
                cut_bytes: np.ndarray, cut_start_ns: np.ndarray) -> Baseline:
        """Without the flows ``drop_ids`` (gone from the cache), with the rows of flows just cut."""
        if not len(drop_ids) and not len(cut_ids):
            return self
        gone = np.concatenate([np.asarray(drop_ids, dtype=np.uint64), np.asarray(cut_ids, dtype=np.uint64)])
        keep = ~np.isin(self.ids, gone) if len(self.ids) else np.zeros(0, dtype=bool)
        ids = np.concatenate([self.ids[keep], np.asarray(cut_ids, dtype=np.uint64)])
        order = np.argsort(ids, kind="stable")
        return Baseline(ids[order],
                        np.concatenate([self.packets[keep], np.asarray(cut_packets, dtype=np.uint64)])[order],
                        np.concatenate([self.bytes[keep], np.asarray(cut_bytes, dtype=np.uint64)])[order],
                        np.concatenate([self.start_ns[keep], np.asarray(cut_start_ns, dtype=np.uint64)])[order])


def member(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``ids`` that are in ``sorted_ids`` (sorted, unique): a binary search each, no sort of ``ids``."""
    if not len(sorted_ids):
        return np.zeros(len(ids), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[pos] == ids


@dataclass(frozen=True)
class Horizon:
    """The instants one tick decides against (boot clock, ns).

    ``final_ns``: when the tick's RCU barrier began; an entry that expired
    before it is final.  ``now_ns``: after the barrier, before the read;
    active-timeout cuts are due against it.  ``evict_ns``: the map's
    ``evict_before`` threshold as it was before the barrier (0: none); an
    entry last seen before it is final too (lack of resources).
    """

    final_ns: int
    now_ns: int
    evict_ns: int = 0


NEVER = np.iinfo(np.int64).max


@dataclass(frozen=True)
class ChunkResult:
    records: np.ndarray  # RECORD_DTYPE
    delete: np.ndarray  # indices into the chunk: final entries, to delete once exported
    cuts: Baseline  # flows cut by the active timeout in this chunk: their new baseline rows
    drop_ids: np.ndarray  # flow ids that leave the cache (their baseline rows go)
    next_due_ns: int  # earliest instant an entry that stays falls due (NEVER: none)
    stay: np.ndarray | None = None  # bool mask over the chunk: entries that stay (not leaving, not skipped)
    # per entry of the chunk: packets in no record yet once this sweep's records are out (0 for the
    # entries leaving now and those skipped, whose packets are in records already); None: all 0
    unsent: np.ndarray | None = None


def expiry_ns(values: np.ndarray, rules: SweepRules) -> np.ndarray:
    """When each entry expires for the kernel: last seen + the inactive timeout (end-idle after FIN/RST).

    The kernel applies the same two thresholds (-DINACTIVE_NS, -DEND_IDLE_NS)
    and never writes an entry past them: that is what makes deleting it exact.
    """
    ended = (values["tcp_flags"] & (TCP_FIN | TCP_RST)) != 0
    limit = np.where(ended, np.int64(rules.end_idle_ns), np.int64(rules.inactive_ns))
    return values["last_seen_ns"].astype(np.int64) + limit


def _baseline_of(values: np.ndarray, baseline: Baseline) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per entry: packets and bytes already exported, and when its current record began."""
    if not len(baseline):
        zero = np.zeros(len(values), dtype=np.uint64)
        return zero, zero, values["first_seen_ns"].astype(np.uint64)
    has, pos = baseline.join(values["flow_id"])
    base_pk = np.where(has, baseline.packets[pos] if len(baseline) else 0, 0).astype(np.uint64)
    base_by = np.where(has, baseline.bytes[pos] if len(baseline) else 0, 0).astype(np.uint64)
    start = np.where(has, baseline.start_ns[pos] if len(baseline) else 0, values["first_seen_ns"])
    return base_pk, base_by, start.astype(np.uint64)


def sweep_chunk(keys: np.ndarray, values: np.ndarray, baseline: Baseline, horizon: Horizon,
                wall_offset_ns: int, rules: SweepRules, skip_ids: np.ndarray | None = None,
                final: bool = False) -> ChunkResult:
    """Apply the timeout rules to one chunk of the cache.

    ``skip_ids`` (sorted): flows already exported and waiting for their
    delete (the agent commits after the records have left), ignored here.
    ``final`` (agent shutdown) exports every other entry's remaining delta
    with end reason *forced* and deletes nothing.

    Only *candidates* get the full work: entries that leave now, or that may
    be due for an active-timeout cut (first seen an active timeout ago: an
    entry cut before was first seen at least that long ago, so every other
    one has no baseline and its record began at its first packet).
    """
    look = np.ones(len(values), dtype=bool)
    if skip_ids is not None and len(skip_ids):
        look = ~member(skip_ids, values["flow_id"])
    if final:
        idx = np.flatnonzero(look)
        return _final(keys[idx], values[idx], baseline, wall_offset_ns)
    expiry = expiry_ns(values, rules)
    last = values["last_seen_ns"].astype(np.int64)
    gone = look & ((expiry <= horizon.final_ns) | (last < horizon.evict_ns))
    first_active = values["first_seen_ns"].astype(np.int64) + rules.active_ns
    cand = np.flatnonzero(look & (gone | (first_active <= horizon.now_ns)))
    r = _candidates(keys[cand], values[cand], baseline, horizon, wall_offset_ns, rules, expiry[cand])
    stay = look & ~gone
    others = stay.copy()
    others[cand] = False  # the candidates' own due instants come from _candidates
    due = np.minimum(expiry[others], first_active[others])
    next_due = min(int(due.min()) if len(due) else NEVER, r.next_due_ns)
    unsent = np.where(others, values["packets"], 0).astype(np.uint64)  # no baseline: never cut
    if r.unsent is not None:
        unsent[cand] = r.unsent
    return ChunkResult(r.records, cand[r.delete], r.cuts, r.drop_ids, next_due, stay, unsent)


def _final(keys: np.ndarray, values: np.ndarray, baseline: Baseline, wall_offset_ns: int) -> ChunkResult:
    """Every entry's remaining delta, as a forced end (shutdown, or the old maps of a reload)."""
    base_pk, base_by, rec_start = _baseline_of(values, baseline)
    d_pk = values["packets"] - base_pk
    idx = np.flatnonzero(d_pk > 0)
    out = _records(keys[idx], values[idx], d_pk[idx], (values["bytes"] - base_by)[idx], rec_start[idx],
                   EndReason.FORCED, wall_offset_ns)
    return ChunkResult(out, np.zeros(0, dtype=np.intp), Baseline(), np.zeros(0, dtype=np.uint64), NEVER)


def _candidates(keys: np.ndarray, values: np.ndarray, baseline: Baseline, horizon: Horizon, wall_offset_ns: int,
                rules: SweepRules, expiry: np.ndarray) -> ChunkResult:
    """The rules on entries that may leave or be cut now (``expiry``: theirs)."""
    base_pk, base_by, rec_start = _baseline_of(values, baseline)
    d_pk = values["packets"] - base_pk
    d_by = values["bytes"] - base_by
    fresh = d_pk > 0
    timed_out = expiry <= horizon.final_ns
    evicted = values["last_seen_ns"].astype(np.int64) < horizon.evict_ns
    gone = timed_out | evicted
    waiting = ~gone & (expiry <= horizon.now_ns)  # expired after the barrier: next tick
    active_at = rec_start.astype(np.int64) + rules.active_ns
    cut = ~gone & ~waiting & fresh & (active_at <= horizon.now_ns)
    reason = np.full(len(values), EndReason.ACTIVE, dtype=np.uint8)
    reason[evicted] = EndReason.LACK_OF_RESOURCES
    ended = (values["tcp_flags"] & (TCP_FIN | TCP_RST)) != 0
    reason[timed_out] = np.where(ended[timed_out], EndReason.END_OF_FLOW, EndReason.IDLE)
    idx = np.flatnonzero((gone & fresh) | cut)
    out = _records(keys[idx], values[idx], d_pk[idx], d_by[idx], rec_start[idx], reason[idx], wall_offset_ns)
    c = np.flatnonzero(cut)
    cuts = Baseline(values["flow_id"][c].astype(np.uint64), values["packets"][c].astype(np.uint64),
                    values["bytes"][c].astype(np.uint64), np.full(len(c), horizon.now_ns, dtype=np.uint64))
    due = np.where(cut, np.int64(horizon.now_ns) + rules.active_ns, expiry)
    # an entry with nothing new is due for a cut only once packets come (a later tick sees them)
    due = np.where(fresh & ~cut, np.minimum(due, active_at), due)
    next_due = int(due[~gone].min()) if (~gone).any() else NEVER
    unsent = np.where(gone | cut, np.uint64(0), d_pk)
    return ChunkResult(out, np.flatnonzero(gone), cuts, values["flow_id"][gone].astype(np.uint64), next_due,
                       None, unsent)


def _records(k: np.ndarray, v: np.ndarray, d_pk: np.ndarray, d_by: np.ndarray, rec_start: np.ndarray,
             reason: np.ndarray | int, wall_offset_ns: int) -> np.ndarray:
    """Records of entries (keys ``k``, values ``v``) carrying the deltas ``d_pk``/``d_by``."""
    out = rec.empty(len(k))
    _key_columns(out, k)
    for name in _DETAIL_COLUMNS:
        out[name] = v[name]
    # where the packets came in and leave: the kernel's answer (XDP / TC ingress:
    # the metered interface and the fib's out-interface; TC egress: the skb's
    # ingress interface and the metered one)
    out["ifindex"] = v["in_ifindex"]
    out["egress_ifindex"] = v["out_ifindex"]
    out["tcp_flags"] = v["tcp_flags"] & 0xFF
    out["packets"] = d_pk
    out["bytes"] = d_by
    start = np.minimum(rec_start, v["last_seen_ns"])
    out["start_ms"] = (start.astype(np.int64) + wall_offset_ns) // NS_PER_MS
    out["end_ms"] = (v["last_seen_ns"].astype(np.int64) + wall_offset_ns) // NS_PER_MS
    out["end_reason"] = reason
    return out


def relief_threshold(last_seen_ns: np.ndarray, capacity: int, high: float = HIGH_WATER,
                     low: float = LOW_WATER, incoming: int = 0, floor: float = FLOOR_WATER) -> int | None:
    """The ``evict_before`` instant that relieves a nearly full map, or None.

    None while the map holds fewer than ``high`` x ``capacity`` entries; from
    there, an instant such that the entries last seen before it (the idle
    longest) are enough to bring it down to ``low`` x ``capacity``: set as the
    map's threshold, they become final for the next tick, which exports them
    with end reason *lack of resources*.

    ``incoming``: the entries a surge of new flows is expected to create before
    the next relief can take effect, counted once the map holds SURGE_FROM x
    ``capacity`` (a burst into a map that will hold it is not cut short).  The
    map is relieved once it would be at ``high`` with them, down to ``low`` x
    ``capacity`` less them, and never below ``floor`` x ``capacity``.
    """
    n = len(last_seen_ns)
    if not 0 < floor <= low <= high <= 1:
        raise ValueError("need 0 < floor <= low <= high <= 1")
    if n < SURGE_FROM * capacity:
        incoming = 0
    if n == 0 or n + max(0, incoming) < int(np.ceil(high * capacity)):
        return None
    take = n - max(int(floor * capacity), int(low * capacity) - max(0, incoming))
    if take <= 0:
        return None
    kth = np.partition(last_seen_ns, take - 1)[take - 1]
    return int(kth) + 1


_KEY_COLUMNS = ("src_addr", "dst_addr", "src_port", "dst_port", "protocol", "ip_version", "tos", "direction",
                "vlan_id", "inner_vlan_id")
# first-packet detail and min/max pairs, same names in the kernel value and the record
_DETAIL_COLUMNS = ("src_mac", "dst_mac", "ttl_min", "ttl_max", "length_min", "length_max",
                   "ip_header_length", "tcp_seq", "tcp_ack", "tcp_window", "udp_length", "igmp_type",
                   "flow_label", "next_hop")


def _key_columns(out: np.ndarray, keys: np.ndarray) -> None:
    for name in _KEY_COLUMNS:
        out[name] = keys[name]
    out["meter_ifindex"] = keys["ifindex"]
    icmp = (keys["protocol"] == 1) | (keys["protocol"] == 58)
    # ICMP type/code ride in the key's dst port (type * 256 + code)
    out["icmp_type"] = np.where(icmp, keys["dst_port"] >> 8, 0)
    out["icmp_code"] = np.where(icmp, keys["dst_port"] & 0xFF, 0)
