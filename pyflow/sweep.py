"""The sweep: RouterOS's timeout rules as one pure function of (entries, now).

Called once per sweep tick with a snapshot of the kernel flow cache.  It
decides, for every entry, whether a record leaves now and why:

* idle:   ``now - last_seen >= inactive-flow-timeout``  -> export the last
  delta and delete the entry (end reason *idle*);
* end:    TCP FIN or RST seen and idle for ``end-idle`` -> export, delete
  (end reason *end of flow*);
* active: open for ``active-flow-timeout`` since the record began -> export
  the delta since the last export and KEEP the entry (end reason *active*).

Kernel counters are cumulative and never reset; what was already exported is
remembered here, per kernel flow id, in a ``Baseline`` (only for flows that
were cut by the active timeout).  Everything is vectorised with numpy: a
sweep of a million entries is a handful of array operations.

A nearly full cache is relieved early (RouterOS exports flows early when
the cache is full): when it holds ``HIGH_WATER`` of ``cache-entries`` or
more, the entries idle the longest are taken out of it until it holds
``LOW_WATER``, each exported with end reason *lack of resources*
(``relief_victims`` picks them, ``final_records`` turns their last values
into records; the agent takes them out of the kernel map).

Clocks are arguments: ``now_ns`` is CLOCK_BOOTTIME (the kernel's
``bpf_ktime_get_boot_ns``) and ``wall_offset_ns`` converts it to Unix time.
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
#: ... and the share it is brought back down to (lack-of-resources records).
LOW_WATER = 0.75


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

    def join(self, flow_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each flow id: (has a baseline?, index into the baseline arrays)."""
        if len(self.ids) == 0:
            return np.zeros(len(flow_ids), dtype=bool), np.zeros(len(flow_ids), dtype=np.intp)
        pos = np.searchsorted(self.ids, flow_ids)
        pos = np.minimum(pos, len(self.ids) - 1)
        return self.ids[pos] == flow_ids, pos


@dataclass(frozen=True)
class SweepResult:
    records: np.ndarray  # RECORD_DTYPE
    delete: np.ndarray  # bool mask over the swept entries: delete from the kernel map
    baseline: Baseline


def expired(values: np.ndarray, now_ns: int, rules: SweepRules) -> np.ndarray:
    """Entries the kernel will no longer write (idle, or ended and idle).

    The kernel applies the same two thresholds (-DINACTIVE_NS, -DEND_IDLE_NS)
    and sends packets of such entries to the spill ring instead, which is
    what makes deleting them exact.
    """
    idle = np.int64(now_ns) - values["last_seen_ns"].astype(np.int64)
    ended = (values["tcp_flags"] & (TCP_FIN | TCP_RST)) != 0
    return (idle >= rules.inactive_ns) | (ended & (idle >= rules.end_idle_ns))


def sweep(
    keys: np.ndarray,
    values: np.ndarray,
    baseline: Baseline,
    now_ns: int,
    wall_offset_ns: int,
    rules: SweepRules,
    final: bool = False,
) -> SweepResult:
    """Apply the timeout rules to one snapshot of the cache.

    ``final`` (agent shutdown) exports every entry's remaining delta with end
    reason *forced* and deletes nothing.
    """
    n = len(values)
    flow_id = values["flow_id"]
    has, pos = baseline.join(flow_id)
    base_pk = np.where(has, baseline.packets[pos] if len(baseline) else 0, 0).astype(np.uint64)
    base_by = np.where(has, baseline.bytes[pos] if len(baseline) else 0, 0).astype(np.uint64)
    rec_start = np.where(has, baseline.start_ns[pos] if len(baseline) else 0, values["first_seen_ns"])
    rec_start = rec_start.astype(np.uint64)

    d_pk = values["packets"] - base_pk
    d_by = values["bytes"] - base_by
    fresh = d_pk > 0

    reason = np.zeros(n, dtype=np.uint8)
    if final:
        delete = np.zeros(n, dtype=bool)
        reason[:] = EndReason.FORCED
        export = fresh
    else:
        gone = expired(values, now_ns, rules)
        ended = (values["tcp_flags"] & (TCP_FIN | TCP_RST)) != 0
        age = np.int64(now_ns) - rec_start.astype(np.int64)
        active_due = ~gone & (age >= rules.active_ns) & fresh
        reason[gone] = EndReason.IDLE
        reason[gone & ended] = EndReason.END_OF_FLOW
        reason[active_due] = EndReason.ACTIVE
        delete = gone
        export = (gone & fresh) | active_due

    idx = np.flatnonzero(export)
    out = _records(keys[idx], values[idx], d_pk[idx], d_by[idx], rec_start[idx], reason[idx], wall_offset_ns)

    if final:
        return SweepResult(out, delete, baseline)

    # Baseline for the next sweep: flows that stay and were ever cut.
    cut = active_due
    keep = ~delete & (has | cut)
    new_pk = np.where(cut, values["packets"], base_pk)[keep]
    new_by = np.where(cut, values["bytes"], base_by)[keep]
    new_start = np.where(cut, np.uint64(now_ns), rec_start)[keep]
    ids = flow_id[keep]
    order = np.argsort(ids, kind="stable")
    nb = Baseline(ids[order], new_pk[order], new_by[order], new_start[order])
    return SweepResult(out, delete, nb)


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


def relief_victims(last_seen_ns: np.ndarray, capacity: int, high: float = HIGH_WATER,
                   low: float = LOW_WATER) -> np.ndarray:
    """Which entries leave a nearly full cache early: indices into ``last_seen_ns``.

    None while the cache holds fewer than ``high`` x ``capacity`` entries;
    from there, the entries idle the longest (oldest ``last_seen_ns`` first),
    as many as it takes to bring the cache down to ``low`` x ``capacity``.
    """
    n = len(last_seen_ns)
    if not 0 < low <= high <= 1:
        raise ValueError("need 0 < low <= high <= 1")
    if n == 0 or n < int(np.ceil(high * capacity)):
        return np.zeros(0, dtype=np.intp)
    keep = int(low * capacity)
    take = n - keep
    if take <= 0:
        return np.zeros(0, dtype=np.intp)
    part = np.argpartition(last_seen_ns, take - 1)[:take] if take < n else np.arange(n)
    return part[np.argsort(last_seen_ns[part], kind="stable")]


def final_records(keys: np.ndarray, values: np.ndarray, baseline: Baseline, wall_offset_ns: int,
                  reason: int) -> tuple[np.ndarray, Baseline]:
    """The last records of entries that have left the cache (``values``: their final values).

    Each exports what its entry holds beyond what was already exported (the
    baseline of a flow cut by the active timeout), with end reason ``reason``;
    an entry with nothing new gives no record.  Returns the records and the
    baseline without those flows.
    """
    flow_id = values["flow_id"]
    has, pos = baseline.join(flow_id)
    base_pk = np.where(has, baseline.packets[pos] if len(baseline) else 0, 0).astype(np.uint64)
    base_by = np.where(has, baseline.bytes[pos] if len(baseline) else 0, 0).astype(np.uint64)
    rec_start = np.where(has, baseline.start_ns[pos] if len(baseline) else 0, values["first_seen_ns"])
    d_pk = values["packets"] - base_pk
    d_by = values["bytes"] - base_by
    idx = np.flatnonzero(d_pk > 0)
    out = _records(keys[idx], values[idx], d_pk[idx], d_by[idx], rec_start[idx].astype(np.uint64), reason,
                   wall_offset_ns)
    if not has.any():
        return out, baseline
    stay = ~np.isin(baseline.ids, flow_id[has])
    nb = Baseline(baseline.ids[stay], baseline.packets[stay], baseline.bytes[stay], baseline.start_ns[stay])
    return out, nb


_KEY_COLUMNS = ("src_addr", "dst_addr", "src_port", "dst_port", "protocol", "ip_version", "tos", "direction")
# first-packet detail and min/max pairs, same names in the kernel value and the record
_DETAIL_COLUMNS = ("src_mac", "dst_mac", "vlan_id", "ttl_min", "ttl_max", "length_min", "length_max",
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


def spill_records(events: np.ndarray, wall_offset_ns: int) -> np.ndarray:
    """Aggregate spill events (packets of expired entries) per flow key into records.

    They are the first packets of a flow that resumed after an idle gap,
    caught while its old entry was being expired; the flow goes on in a new
    kernel entry, so the record's end reason is *active*.
    """
    if len(events) == 0:
        return rec.empty(0)
    keys = events["key"]
    uniq, inverse = np.unique(keys.view(np.dtype((np.void, keys.dtype.itemsize))), return_inverse=True)
    inverse = inverse.reshape(-1)
    m = len(uniq)
    out = rec.empty(m)
    first_idx = np.full(m, len(events), dtype=np.intp)
    np.minimum.at(first_idx, inverse, np.arange(len(events)))
    k = keys[first_idx]
    _key_columns(out, k)
    # what a spill event does not carry (first-packet detail, the out-interface)
    # stays zero; the in-interface of an ingress flow is the metered one
    out["ifindex"] = np.where(k["direction"] == 0, k["ifindex"], 0)
    out["egress_ifindex"] = np.where(k["direction"] == 1, k["ifindex"], 0)
    out["packets"] = np.bincount(inverse, weights=events["packets"].astype(np.float64), minlength=m).astype(np.uint64)
    lmin = np.full(m, 0xFFFF, dtype=np.uint16)
    lmax = np.zeros(m, dtype=np.uint16)
    tmin = np.full(m, 0xFF, dtype=np.uint8)
    tmax = np.zeros(m, dtype=np.uint8)
    np.minimum.at(lmin, inverse, events["length_min"])
    np.maximum.at(lmax, inverse, events["length_max"])
    np.minimum.at(tmin, inverse, events["ttl"])
    np.maximum.at(tmax, inverse, events["ttl"])
    out["length_min"], out["length_max"], out["ttl_min"], out["ttl_max"] = lmin, lmax, tmin, tmax
    by = np.zeros(m, dtype=np.uint64)
    np.add.at(by, inverse, events["bytes"])
    out["bytes"] = by
    flags = np.zeros(m, dtype=np.uint64)
    np.bitwise_or.at(flags, inverse, events["tcp_flags"].astype(np.uint64))
    out["tcp_flags"] = flags & 0xFF
    first = np.full(m, np.iinfo(np.int64).max, dtype=np.int64)
    last = np.zeros(m, dtype=np.int64)
    ts = events["ts_ns"].astype(np.int64)
    np.minimum.at(first, inverse, ts)
    np.maximum.at(last, inverse, ts)
    out["start_ms"] = (first + wall_offset_ns) // NS_PER_MS
    out["end_ms"] = (last + wall_offset_ns) // NS_PER_MS
    out["end_reason"] = EndReason.ACTIVE
    return out
