"""Traffic analytics from the records the agent exports: the mix, the top talkers, unique
addresses and five anomaly signals (the RouterOS guide's collector dashboards), computed in
the agent for its metrics endpoint (docs/metrics.md, "Traffic analytics").

The agent also hands over, each sweep, the cache entries first seen since the sweep before
(``feed(..., new=...)``): once it does, flows are counted from them, as they start (each flow
once: flows, ICMP flows, flows per address, short-flow endpoints), and the records add bytes,
packets and rates only.  Fed records alone (``new`` None), the records count the flows too.

Pure: ``Analytics`` is fed record batches (``pyflow.records.RECORD_DTYPE``) and the time, does no
I/O and keeps no per-record Python objects; every step is a numpy pass over columns.

Time is cut into *intervals* of INTERVAL_S (5 s).  Each interval keeps, per batch fed to it:

* per source address: bytes, flows, a rate (the sum over its flows of bytes / max(duration, interval)),
  and the distinct ``address:port`` endpoints it reached with short flows (duration at most
  SHORT_FLOW_MS; counted distinct within one sweep's batch, summed over the interval's batches);
* per destination address: bytes and flows; per (protocol, service port) of TCP, UDP and SCTP: bytes
  (the service port is the lower of the two ports);
* HyperLogLog registers (2**HLL_P of them: standard error 1.04 / sqrt(4096) = 1.6 %) of the
  sources, of the destinations, and of the sources of low-byte flows (at most LOW_BYTES each);
* flows, ICMP/ICMPv6 flows.

Per-address tables are cut to the largest TABLE_ROWS rows of each column when they grow past
it, so memory is bounded whatever the traffic: an address cut from an interval loses that
interval's share (at most the smallest kept value of it).  When an interval ends:

* the window (the last ``window / INTERVAL_S`` intervals) is merged: the top N sources and
  destinations by bytes and the top N by flows (at most 2N each), the top N ports by bytes,
  the unique sources and destinations (register max);
* the five signals are measured on the interval that ended and scored against a learned
  baseline (``Detector``), then the view the metrics read is replaced in one assignment.

The per-protocol counters (flows, packets, bytes since start) are updated on every batch.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pyflow.config import SIGNALS, AnalyticsSettings
from pyflow.records import V4_MAPPED_PREFIX, EndReason

INTERVAL_S = 5.0
#: Warm-up: the signals learn this many intervals (30 s) before they may fire.
WARMUP_INTERVALS = 6
#: The baseline's learning rate once warm: a time constant of 60 intervals (5 minutes).
ALPHA = 1 / 60
#: The spread a score divides by is at least this share of the baseline's mean ...
REL_SPREAD = 0.25
#: ... and at least this share of the signal's floor (steady or silent traffic: no huge scores).
FLOOR_SPREAD = 0.1
SHORT_FLOW_MS = 2000
LOW_BYTES = 128
HLL_P = 12
TABLE_ROWS = 2048
PROTOCOL_LABELS = ("tcp", "udp", "icmp", "icmpv6", "igmp", "sctp", "gre", "esp", "other")
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "igmp": 2, "sctp": 132, "gre": 47, "esp": 50}
PORT_PROTOCOLS = ("tcp", "udp", "sctp")  # the protocols with ports (top ports, pyflow top's port view)
_PORT_INDEX = np.full(256, -1, dtype=np.int64)
for _i, _name in enumerate(PORT_PROTOCOLS):
    _PORT_INDEX[PROTOCOL_NUMBERS[_name]] = _i
_NO_PORT = np.uint64(2**64 - 1)
_PROTO_INDEX = np.full(256, len(PROTOCOL_LABELS) - 1, dtype=np.intp)
for _i, _name in enumerate(PROTOCOL_LABELS[:-1]):
    _PROTO_INDEX[PROTOCOL_NUMBERS[_name]] = _i

_U64 = np.uint64
_M1, _M2, _K1, _K3 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB), _U64(0x9E3779B97F4A7C15), \
    _U64(0xD6E8FEB86659FD93)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit."""
    x = x ^ (x >> _U64(30))
    x = x * _M1
    x = x ^ (x >> _U64(27))
    x = x * _M2
    return x ^ (x >> _U64(31))


def _halves(dtype: np.dtype, field: str) -> np.dtype:
    """A view of ``dtype`` records as the two little-endian uint64 halves of a 16-byte field."""
    off = dtype.fields[field][1]  # type: ignore[index]
    return np.dtype({"names": ["hi", "lo"], "formats": ["<u8", "<u8"], "offsets": [off, off + 8],
                     "itemsize": dtype.itemsize})


def address_hash(records: np.ndarray, field: str) -> np.ndarray:
    """A 64-bit hash of each record's 16-byte address ``field`` (no copy of the rows)."""
    halves = records.view(_halves(records.dtype, field))
    return _mix(halves["lo"] ^ (halves["hi"] * _K1))


def port_keys(r: np.ndarray) -> np.ndarray:
    """Per record: (protocol index in PORT_PROTOCOLS) * 65536 + the service port, the lower of the
    two ports (clients use high ephemeral ones); _NO_PORT for protocols without ports."""
    pidx = _PORT_INDEX[r["protocol"]]
    port = np.minimum(r["src_port"], r["dst_port"]).astype(np.uint64)
    return np.where(pidx >= 0, (pidx.astype(np.uint64) << _U64(16)) | port, _NO_PORT)


def port_of(key: int) -> tuple[str, int]:
    """A port key -> (protocol label, port)."""
    return PORT_PROTOCOLS[key >> 16], key & 0xFFFF


def format_address(raw: bytes) -> str:
    """16 bytes (IPv4 v4-mapped) -> the address as text."""
    if raw[:12] == V4_MAPPED_PREFIX:
        return str(ipaddress.IPv4Address(raw[12:]))
    return str(ipaddress.IPv6Address(raw))


# --------------------------------------------------------------------------
# Grouping: exact sums per key in O(n), a sort only for keys sharing a bucket
# --------------------------------------------------------------------------

_BUCKET_BITS = 16
_SMALL = 4096  # fewer rows than this: a plain np.unique is cheaper than the bucket arrays


def group_sum(keys: np.ndarray, values: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum ``values`` (columns, each as long as ``keys``) per distinct uint64 key.

    Returns (distinct keys, sums (m x columns), the index of one row of each key).  Rows go
    into 2**16 buckets (``np.bincount``) by the top bits of key x an odd constant; a row whose
    key is not its bucket's owner (another key wrote it last) is grouped by sorting, so the
    result is exact and a sort is paid only for collisions.
    """
    n = len(keys)
    if n < _SMALL:
        return _group_sorted(keys, values, None)
    size = 1 << _BUCKET_BITS
    b = ((keys * _K1) >> _U64(64 - _BUCKET_BITS)).astype(np.intp)  # multiplicative hashing: small keys too
    owner = np.zeros(size, dtype=np.uint64)
    first = np.zeros(size, dtype=np.intp)
    owner[b] = keys
    first[b] = _arange(n)  # the same row won both assignments: the last one in each bucket
    mine = owner[b] == keys
    everyone = bool(mine.all())
    bm = b if everyone else b[mine]
    used = np.flatnonzero(np.bincount(bm, minlength=size))
    sums = np.zeros((len(used), len(values)))
    for j, col in enumerate(values):
        sums[:, j] = np.bincount(bm, weights=col if everyone else col[mine], minlength=size)[used]
    if everyone:
        return owner[used], sums, first[used]
    rest = np.flatnonzero(~mine)
    k2, s2, i2 = _group_sorted(keys[rest], [c[rest] for c in values], rest)
    return np.concatenate([owner[used], k2]), np.concatenate([sums, s2]), np.concatenate([first[used], i2])


def _arange(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.intp)


def _group_sorted(keys: np.ndarray, values: Sequence[np.ndarray],
                  rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    uk, idx, inv = np.unique(keys, return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    sums = np.zeros((len(uk), len(values)))
    for j, col in enumerate(values):
        sums[:, j] = np.bincount(inv, weights=col, minlength=len(uk))
    return uk, sums, idx if rows is None else rows[idx]


def _largest(values: np.ndarray, rows: int) -> np.ndarray:
    """The rows among the ``rows`` largest values above 0 of some column."""
    keep = np.zeros(len(values), dtype=bool)
    for j in range(values.shape[1]):
        col = values[:, j]
        pos = col > 0
        if int(np.count_nonzero(pos)) <= rows:
            keep |= pos
        else:
            keep[np.argpartition(-col, rows - 1)[:rows]] = True
    return keep


class Table:
    """Sums per key (uint64) with a representative value per key (an address), bounded: past
    ``rows`` keys it keeps the largest ``rows`` of each column (their union)."""

    def __init__(self, columns: int, rep_dtype: np.dtype, rows: int = TABLE_ROWS) -> None:
        self.rows = rows
        self.keys = np.zeros(0, dtype=np.uint64)
        self.reps = np.zeros(0, dtype=rep_dtype)
        self.values = np.zeros((0, columns))
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending = 0

    def add(self, keys: np.ndarray, reps: np.ndarray, values: np.ndarray) -> None:
        """Rows with distinct keys (grouped), summed with the rest.  A part of more than ``rows``
        keys is cut to the largest of each column first, as a compaction would (a spoofed flood's
        sweep: 50,000 new sources are not all summed with the table)."""
        if len(keys) > self.rows:
            keep = _largest(values, self.rows)
            keys, reps, values = keys[keep], reps[keep], values[keep]
        self._parts.append((keys, reps, values))
        self._pending += len(keys)
        if self._pending > 4 * self.rows:
            self.compact()

    def compact(self) -> Table:
        if not self._parts:
            return self
        keys = np.concatenate([self.keys, *(p[0] for p in self._parts)])
        reps = np.concatenate([self.reps, *(p[1] for p in self._parts)])
        values = np.concatenate([self.values, *(p[2] for p in self._parts)])
        self._parts, self._pending = [], 0
        k, v, i = group_sum(keys, [values[:, j] for j in range(values.shape[1])])
        r = reps[i]
        if len(k) > self.rows:
            keep = _largest(v, self.rows)
            k, v, r = k[keep], v[keep], r[keep]
        self.keys, self.reps, self.values = k, r, v
        return self

    def top(self, n: int, column: int = 0) -> np.ndarray:
        """Row indices of the ``n`` largest values of ``column`` above 0 (after compacting), largest
        first (ties: by key)."""
        self.compact()
        if not len(self.keys):
            return np.zeros(0, dtype=np.intp)
        col = self.values[:, column]
        order = np.lexsort((self.keys, -col))[:n]
        return order[col[order] > 0]

    @staticmethod
    def merged(tables: Sequence[Table], columns: int, rep_dtype: np.dtype, rows: int) -> Table:
        out = Table(columns, rep_dtype, rows)
        for t in tables:
            t.compact()
            out.add(t.keys, t.reps, t.values)
        return out.compact()


# --------------------------------------------------------------------------
# HyperLogLog
# --------------------------------------------------------------------------

_HLL_M = 1 << HLL_P
_HLL_REST = _U64((1 << (64 - HLL_P)) - 1)


def hll_add(registers: np.ndarray, hashes: np.ndarray) -> None:
    """Add 64-bit hashes to HyperLogLog ``registers`` (2**HLL_P uint8) in place."""
    if not len(hashes):
        return
    idx = (hashes >> _U64(64 - HLL_P)).astype(np.intp)
    rest = (hashes & _HLL_REST).astype(np.float64)  # 52 bits: exact in a double
    _, exp = np.frexp(rest)  # bit length of rest (0 for 0)
    rank = (64 - HLL_P + 1 - exp).astype(np.uint8)
    np.maximum.at(registers, idx, rank)


def hll_estimate(registers: np.ndarray) -> float:
    """The cardinality estimate (with the small-range correction: linear counting)."""
    m = float(len(registers))
    alpha = 0.7213 / (1 + 1.079 / m)
    est = alpha * m * m / float(np.sum(np.ldexp(1.0, -registers.astype(np.int64))))
    zeros = int(np.count_nonzero(registers == 0))
    if est <= 2.5 * m and zeros:
        return m * math.log(m / zeros)
    return est


# --------------------------------------------------------------------------
# The anomaly detector of one signal
# --------------------------------------------------------------------------


@dataclass
class Detector:
    """Score = (x - mean) / spread, where x is the signal over the interval that just ended,
    mean an exponentially weighted mean of the earlier intervals, and spread
    max(1.25 x their weighted mean absolute deviation, REL_SPREAD x mean, FLOOR_SPREAD x floor).
    Active when score >= threshold and x >= floor.  The first WARMUP_INTERVALS intervals only
    learn (score 0, never active; the weight is 1/k for the k-th, a plain mean); then the weight
    is ALPHA, and a value above mean + threshold x spread is learnt as that bound, so an attack
    does not become the baseline at once."""

    n: int = 0
    mean: float = 0.0
    dev: float = 0.0

    def spread(self, floor: float) -> float:
        return max(self.dev, REL_SPREAD * self.mean, FLOOR_SPREAD * floor, 1e-9)

    def update(self, x: float, threshold: float, floor: float) -> tuple[float, bool]:
        warm = self.n >= WARMUP_INTERVALS
        score, active, learn = 0.0, False, x
        if warm:
            d = self.spread(floor)
            score = (x - self.mean) / d
            active = score >= threshold and x >= floor
            learn = min(x, self.mean + threshold * d)
        a = max(1.0 / (self.n + 1), ALPHA)
        self.dev += a * (1.25 * abs(learn - self.mean) - self.dev)
        self.mean += a * (learn - self.mean)
        self.n += 1
        return score, active


@dataclass(frozen=True)
class Signal:
    value: float = 0.0  # over the last interval, in the floor's unit
    baseline: float = 0.0  # the learned mean
    score: float = 0.0
    active: bool = False


@dataclass(frozen=True)
class View:
    """What the metrics read: made when an interval ends, never changed."""

    talkers: dict[str, list[tuple[str, float]]] = field(default_factory=lambda: {"src": [], "dst": []})
    ports: list[tuple[str, int, float]] = field(default_factory=list)  # (protocol, port, bytes)
    unique_sources: float = 0.0
    unique_destinations: float = 0.0
    signals: dict[str, Signal] = field(default_factory=lambda: {s: Signal() for s in SIGNALS})
    warm: bool = False  # the signals have learnt their warm-up
    at: float = 0.0  # when the interval ended (the clock's time)


# --------------------------------------------------------------------------
# One interval's state
# --------------------------------------------------------------------------

_V16 = np.dtype("V16")
BYTES, FLOWS, SRC_RATE, SRC_ENDPOINTS = 0, 1, 2, 3


class Interval:
    def __init__(self, index: int, rows: int) -> None:
        self.index = index
        self.src = Table(4, _V16, rows)  # bytes, flows, rate (bytes/s), short-flow endpoints
        self.dst = Table(2, _V16, rows)  # bytes, flows
        self.ports = Table(1, np.dtype(np.uint64), rows)
        self.hll_src = np.zeros(_HLL_M, dtype=np.uint8)
        self.hll_dst = np.zeros(_HLL_M, dtype=np.uint8)
        self.hll_low = np.zeros(_HLL_M, dtype=np.uint8)
        self.flows = 0
        self.icmp_flows = 0
        self._staged: list[tuple] = []  # per part: see _addresses

    def feed(self, r: np.ndarray, counts: bool = True) -> None:
        """One batch (flow records only) into this interval.  ``counts``: the records also count
        flows (flows, ICMP flows, flows per address, short-flow endpoints); not when the flows are
        counted as they start, from the cache's new entries (``feed_new``)."""
        if counts:
            self.flows += len(r)
            proto = r["protocol"]
            self.icmp_flows += int(np.count_nonzero((proto == 1) | (proto == 58)))
        nbytes = r["bytes"].astype(np.float64)
        src_h, dst_h = address_hash(r, "src_addr"), address_hash(r, "dst_addr")
        hll_add(self.hll_low, src_h[nbytes <= LOW_BYTES])
        dur_ms = (r["end_ms"].astype(np.int64) - r["start_ms"].astype(np.int64))
        rate = nbytes / np.maximum(dur_ms / 1e3, INTERVAL_S)
        short = (dur_ms <= SHORT_FLOW_MS) & (r["end_reason"] != EndReason.ACTIVE) if counts else None
        ones = np.ones(len(r)) if counts else np.zeros(len(r))
        self._addresses(r, src_h, dst_h, [nbytes, ones, rate], short)
        key = port_keys(r)
        ported = key != _NO_PORT
        if ported.any():
            k, v, _ = group_sum(key[ported], [nbytes[ported]])
            self.ports.add(k, k, v)

    def feed_new(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Cache entries first seen since the last sweep (kernel key and value dtypes): each a flow
        that started, counted now rather than when its record leaves (a lone SYN's: an inactive
        timeout later).  Short: its last packet so far within SHORT_FLOW_MS of its first."""
        self.flows += len(keys)
        proto = keys["protocol"]
        self.icmp_flows += int(np.count_nonzero((proto == 1) | (proto == 58)))
        src_h, dst_h = address_hash(keys, "src_addr"), address_hash(keys, "dst_addr")
        dur_ns = values["last_seen_ns"].astype(np.int64) - values["first_seen_ns"].astype(np.int64)
        zeros = np.zeros(len(keys))
        self._addresses(keys, src_h, dst_h, [zeros, np.ones(len(keys)), zeros], dur_ns <= SHORT_FLOW_MS * 10**6)

    def _addresses(self, r: np.ndarray, src_h: np.ndarray, dst_h: np.ndarray, src_values: list[np.ndarray],
                   short: np.ndarray | None) -> None:
        """Stage a part's per-address columns (bytes, flows, rate) and its short flows' (source,
        endpoint) pairs; ``settle`` sums a whole sweep's parts at once."""
        rows = np.flatnonzero(short) if short is not None else np.zeros(0, dtype=np.intp)
        ep = (r["protocol"][rows].astype(np.uint64) << _U64(16)) | r["dst_port"][rows].astype(np.uint64)
        pairs = _mix(src_h[rows] ^ _mix(dst_h[rows] + ep * _K3))
        self._staged.append((src_h, dst_h, r["src_addr"], r["dst_addr"], src_values, rows, pairs))

    def settle(self) -> None:
        """The staged parts (one sweep's records and new entries) into the tables, one grouping per
        direction: per source bytes, flows, rate and the distinct endpoints it reached with short
        flows; per destination bytes and flows; the address sketches."""
        parts, self._staged = self._staged, []
        if not parts:
            return

        def cat(j: int) -> np.ndarray:
            return parts[0][j] if len(parts) == 1 else np.concatenate([p[j] for p in parts])

        src_h, dst_h, src_a, dst_a, pairs = cat(0), cat(1), cat(2), cat(3), cat(6)
        cols = [np.concatenate([p[4][j] for p in parts]) if len(parts) > 1 else parts[0][4][j] for j in range(3)]
        offsets = np.cumsum([0] + [len(p[0]) for p in parts[:-1]])
        rows = np.concatenate([p[5] + off for p, off in zip(parts, offsets.tolist(), strict=True)])
        ends = np.zeros(len(src_h))
        if len(rows):  # the first short flow of each distinct (source, endpoint) pair counts
            _, _, first = group_sum(pairs, [])
            ends[rows[first]] = 1.0
        k, v, i = group_sum(src_h, [*cols, ends])
        self.src.add(k, src_a[i], v)
        hll_add(self.hll_src, k)  # the distinct ones: the same registers, fewer to add
        k, v, i = group_sum(dst_h, cols[:2])
        hll_add(self.hll_dst, k)
        self.dst.add(k, dst_a[i], v)


# --------------------------------------------------------------------------
# The analytics
# --------------------------------------------------------------------------


class Analytics:
    """Fed record batches and the time (seconds, any monotonic clock); ``view`` and ``totals``
    are what the metrics read (each replaced in one assignment: no lock needed to read them)."""

    def __init__(self, settings: AnalyticsSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.span = max(1, round(settings.window_ns / 1e9 / INTERVAL_S))  # intervals in the window
        self.rows = max(TABLE_ROWS, 32 * settings.top)
        self._intervals: deque[Interval] = deque()
        self._detectors = {s: Detector() for s in SIGNALS}
        self._seen_records = False  # warm-up starts with the first interval that has records
        self._entries = False  # fed the cache's new entries: they count the flows, not the records
        self._lock = threading.Lock()
        # per protocol (PROTOCOL_LABELS): flows, packets, bytes since start
        self.totals: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] = (
            (0,) * len(PROTOCOL_LABELS),) * 3
        self.view = View()

    def feed(self, batch: Iterable[np.ndarray], now: float | None = None,
             new: Iterable[tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        """The records of one sweep (in parts), at ``now`` (default: the clock); ``new``: the cache
        entries that sweep saw first (keys, values in parts; see ``Interval.feed_new``).  Once
        entries are given, flows are counted from them only (each flow once, as it starts)."""
        with self._lock:
            t = self.clock() if now is None else now
            current = self._advance(t)
            self._entries = self._entries or new is not None
            flows, packets, nbytes = (list(x) for x in self.totals)
            for part in batch:
                if not len(part):
                    continue
                r = part[part["nat_event"] == 0] if part["nat_event"].any() else part
                if not len(r):
                    continue
                idx = _PROTO_INDEX[r["protocol"]]
                m = len(PROTOCOL_LABELS)
                for acc, w in ((flows, None), (packets, r["packets"]), (nbytes, r["bytes"])):
                    add = np.bincount(idx, weights=None if w is None else w.astype(np.float64), minlength=m)
                    for j in np.flatnonzero(add).tolist():
                        acc[j] += int(add[j])
                current.feed(r, counts=not self._entries)
                self._seen_records = True
            for keys, values in new or ():
                if len(keys):
                    current.feed_new(keys, values)
                    self._seen_records = True
            current.settle()
            self.totals = (tuple(flows), tuple(packets), tuple(nbytes))

    def advance(self, now: float | None = None) -> None:
        """Let time pass without records (intervals that ended are closed and scored)."""
        with self._lock:
            self._advance(self.clock() if now is None else now)

    def _advance(self, t: float) -> Interval:
        index = int(t // INTERVAL_S)
        if not self._intervals:
            self._intervals.append(Interval(index, self.rows))
        last = self._intervals[-1]
        if index <= last.index:
            return last
        # close the interval that ended and, when time jumped, the empty ones after it
        # (at most a window's worth: older ones would fall out of the window at once)
        self._close(last, (last.index + 1) * INTERVAL_S)
        for i in range(max(last.index + 1, index - self.span), index):
            self._intervals.append(Interval(i, self.rows))
            self._close(self._intervals[-1], (i + 1) * INTERVAL_S)
        self._intervals.append(Interval(index, self.rows))
        while len(self._intervals) > self.span + 1:
            self._intervals.popleft()
        return self._intervals[-1]

    def _close(self, ended: Interval, at: float) -> None:
        """An interval ended: score the signals on it; the window's top lists and unique counts."""
        signals = self._score(ended)
        window = [iv for iv in self._intervals if iv.index > ended.index - self.span and iv.index <= ended.index]
        n = self.settings.top
        talkers = {}
        for direction in ("src", "dst"):
            tables = [getattr(iv, direction) for iv in window]
            cols = tables[0].values.shape[1]
            merged = Table.merged(tables, cols, _V16, self.rows)
            # the top N by bytes, then those of the top N by flows not among them (a scanner's
            # flows are many and small)
            rows = merged.top(n, BYTES).tolist()
            rows += [i for i in merged.top(n, FLOWS).tolist() if i not in rows]
            talkers[direction] = [(format_address(bytes(merged.reps[i])), float(merged.values[i, BYTES]))
                                  for i in rows]
        ports = Table.merged([iv.ports for iv in window], 1, np.dtype(np.uint64), self.rows)
        port_list = [(*port_of(int(ports.keys[i])), float(ports.values[i, 0])) for i in ports.top(n).tolist()]
        src_regs = np.maximum.reduce([iv.hll_src for iv in window])
        dst_regs = np.maximum.reduce([iv.hll_dst for iv in window])
        self.view = View(talkers, port_list, hll_estimate(src_regs), hll_estimate(dst_regs), signals,
                         self._detectors[SIGNALS[0]].n >= WARMUP_INTERVALS, at)

    def measure(self, iv: Interval) -> dict[str, float]:
        """The five signals over one interval, each in its floor's unit (per second)."""
        src = iv.src.compact()
        has = len(src.keys) > 0
        return {
            "flow_rate": iv.flows / INTERVAL_S,
            "many_sources_low_bytes": (hll_estimate(iv.hll_low) if iv.hll_low.any() else 0.0) / INTERVAL_S,
            "single_source_rate": float(src.values[:, SRC_RATE].max()) if has else 0.0,
            "icmp_flows": iv.icmp_flows / INTERVAL_S,
            "short_flows_many_destinations": float(src.values[:, SRC_ENDPOINTS].max()) / INTERVAL_S if has else 0.0,
        }

    def _score(self, iv: Interval) -> dict[str, Signal]:
        values = self.measure(iv)
        if not self._seen_records:  # nothing exported yet (the agent just started): nothing to learn
            return {s: Signal(values[s]) for s in SIGNALS}
        out = {}
        for s in SIGNALS:
            det = self._detectors[s]
            score, active = det.update(values[s], self.settings.threshold(s), self.settings.floor(s))
            out[s] = Signal(values[s], det.mean, score, active)
        return out


# --------------------------------------------------------------------------
# Grouping the live cache (pyflow top's views)
# --------------------------------------------------------------------------

GROUPS = ("src", "dst", "port", "proto")
MAX_GROUPS = 1 << 17


class CacheGroups:
    """Flows, packets and bytes of the kernel cache's entries per source, destination,
    (protocol, service port) or protocol, fed chunk by chunk (any array with the key's
    address, port and protocol fields and ``packets``/``bytes`` values); bounded by MAX_GROUPS
    keys (the largest of each column are kept: ``trimmed`` says some were cut)."""

    def __init__(self, by: str, rows: int = MAX_GROUPS) -> None:
        if by not in GROUPS:
            raise ValueError(f"group {by!r} is not one of {', '.join(GROUPS)}")
        self.by = by
        self.table = Table(3, _V16 if by in ("src", "dst") else np.dtype(np.uint64), rows)
        self.flows = 0  # entries fed
        self.grouped = 0  # of them, in a group (the port view has none for protocols without ports)
        self.trimmed = False

    def add(self, keys: np.ndarray, packets: np.ndarray, nbytes: np.ndarray) -> None:
        if not len(keys):
            return
        values = [np.ones(len(keys)), packets.astype(np.float64), nbytes.astype(np.float64)]
        self.flows += len(keys)
        if self.by in ("src", "dst"):
            h = address_hash(keys, f"{self.by}_addr")
            k, v, i = group_sum(h, values)
            self.table.add(k, keys[f"{self.by}_addr"][i], v)
            self.grouped += len(keys)
            return
        if self.by == "proto":
            k, v, _ = group_sum(keys["protocol"].astype(np.uint64), values)
        else:
            key = port_keys(keys)
            sel = key != _NO_PORT
            k, v, _ = group_sum(key[sel], [c[sel] for c in values])
        self.table.add(k, k, v)
        self.grouped += int(v[:, 0].sum())

    def top(self, n: int, column: int) -> list[dict[str, object]]:
        """The ``n`` largest groups by ``column`` (0 flows, 1 packets, 2 bytes)."""
        t = self.table.compact()
        self.trimmed = self.trimmed or int(t.values[:, 0].sum()) < self.grouped
        out: list[dict[str, object]] = []
        for i in t.top(n, column).tolist():
            row = t.values[i]
            entry: dict[str, object] = {"flows": int(row[0]), "packets": int(row[1]), "bytes": int(row[2])}
            if self.by in ("src", "dst"):
                entry["address"] = format_address(bytes(t.reps[i]))
            elif self.by == "proto":
                entry["proto"] = int(t.keys[i])
            else:
                proto, port = port_of(int(t.keys[i]))
                entry["proto"], entry["port"] = PROTOCOL_NUMBERS[proto], port
            out.append(entry)
        return out
