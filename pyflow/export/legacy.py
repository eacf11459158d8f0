"""NetFlow v1 and v5 encoders: pure functions from a record batch to datagrams.

Both formats are fixed layouts (flow-protocols.md §1): a header and up to 24
(v1) or 30 (v5) records of 48 bytes, big-endian, IPv4 only, with 32-bit
counters, 16-bit interface indexes and times as a wrapping 32-bit uptime in ms.
Everything a record batch holds that does not fit is adapted here, column-wise
with numpy (no Python loop per record):

* counters above 2^32-1 are split over several records (see :func:`split_counters`);
* ifIndex above 65535 becomes 0 ("unknown"): truncating it would name some
  other, real interface, and saturating at 65535 could too;
* First/Last are wall-clock ms turned into the header's uptime clock, mod 2^32;
* nexthop is the IPv4 part of ``next_hop`` (0.0.0.0: none, a directly
  connected destination); output is ``egress_ifindex``; the prefix masks are
  ``src_mask``/``dst_mask`` (v5 only, like AS numbers);
* AS numbers (v5) are 16 bits: a 4-byte AS above 65535 is sent as AS_TRANS
  23456, as RFC 6793 §2 prescribes for a 2-byte AS field (0 stays "unknown").

The ``/ip traffic-flow ipfix`` field toggles do not apply: these layouts are
fixed.  NAT events (``nat_event`` != 0) are never sent in v1/v5 (the Target
counts them as not representable).

The caller owns the transport; v5's flow sequence is carried in
:class:`V5State` from one call to the next, so this module has no hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pyflow.export.context import ExportClock, Sampling
from pyflow.records import RECORD_DTYPE

V1_VERSION = 1
V5_VERSION = 5
V1_MAX_RECORDS = 24  # nfdump NETFLOW_V1_MAX_RECORDS, softflowd NF1_MAXFLOWS
V5_MAX_RECORDS = 30  # the count a full RouterOS v5 datagram carries (§5.4)
RECORD_LENGTH = 48

COUNTER_MAX = 0xFFFF_FFFF  # dPkts / dOctets are 32 bits
IFINDEX_MAX = 0xFFFF  # input / output are 16 bits
AS_MAX = 0xFFFF  # src_as / dst_as are 16 bits
AS_TRANS = 23456  # RFC 6793 §2: stands in for a 4-byte AS in a 2-byte field
SAMPLING_INTERVAL_MAX = 0x3FFF  # the low 14 bits of the v5 sampling word
SAMPLING_MODE_PACKET_INTERVAL = 1  # deterministic 1-in-N, as RouterOS samples
# A record is split into at most this many records.  Anything physical fits
# (2^16 * (2^32-1) bytes is 281 TB: 400 Gbit/s for 94 minutes in one record);
# a counter beyond it can only be corrupt, and splitting it exactly could take
# up to 2^32+1 records (a 2^64-1 counter) and exhaust memory, so it saturates.
MAX_PARTS = 1 << 16
_MOD32 = 1 << 32

V1_HEADER_DTYPE = np.dtype(
    [("version", ">u2"), ("count", ">u2"), ("sys_uptime", ">u4"), ("unix_secs", ">u4"), ("unix_nsecs", ">u4")]
)
V5_HEADER_DTYPE = np.dtype(
    [
        ("version", ">u2"),
        ("count", ">u2"),
        ("sys_uptime", ">u4"),
        ("unix_secs", ">u4"),
        ("unix_nsecs", ">u4"),
        ("flow_sequence", ">u4"),
        ("engine_type", "u1"),
        ("engine_id", "u1"),
        ("sampling_interval", ">u2"),
    ]
)
# The fields both record layouts share, at the same offsets (0..35).
_COMMON_FIELDS = [
    ("srcaddr", "u1", (4,)),
    ("dstaddr", "u1", (4,)),
    ("nexthop", "u1", (4,)),
    ("input", ">u2"),
    ("output", ">u2"),
    ("dpkts", ">u4"),
    ("doctets", ">u4"),
    ("first", ">u4"),
    ("last", ">u4"),
    ("srcport", ">u2"),
    ("dstport", ">u2"),
]
V1_RECORD_DTYPE = np.dtype(
    [
        *_COMMON_FIELDS,
        ("pad1", ">u2"),
        ("prot", "u1"),
        ("tos", "u1"),
        ("tcp_flags", "u1"),
        ("pad2", "u1", (3,)),
        ("reserved", ">u4"),
    ]
)
V5_RECORD_DTYPE = np.dtype(
    [
        *_COMMON_FIELDS,
        ("pad1", "u1"),
        ("tcp_flags", "u1"),
        ("prot", "u1"),
        ("tos", "u1"),
        ("src_as", ">u2"),
        ("dst_as", ">u2"),
        ("src_mask", "u1"),
        ("dst_mask", "u1"),
        ("pad2", ">u2"),
    ]
)
assert V1_HEADER_DTYPE.itemsize == 16 and V5_HEADER_DTYPE.itemsize == 24
assert V1_RECORD_DTYPE.itemsize == V5_RECORD_DTYPE.itemsize == RECORD_LENGTH


@dataclass(frozen=True)
class V5State:
    """The v5 flow sequence of each engine, carried from one call to the next.

    ``sequences`` maps (engine_type, engine_id) to the number of flow records
    that engine has sent so far, mod 2^32: the flow_sequence of its next
    datagram (§1.5).  nfdump keys a v5 exporter on its engine, so each engine
    is its own sequence stream.
    """

    sequences: dict[tuple[int, int], int] = field(default_factory=dict)

    def sequence(self, engine_type: int = 0, engine_id: int = 0) -> int:
        return self.sequences.get((engine_type, engine_id), 0)


def sampling_word(sampling: Sampling | None) -> int:
    """The v5 header's sampling_interval: mode 1 (packet interval) in bits 15..14, N in 13..0.

    N above 16383 cannot be expressed and is sent as 16383: collectors still
    see the flows as sampled and scale counters by 16383 (nfdump, pmacct and
    goflow2 all read ``word & 0x3FFF``), under-counting by N/16383 rather
    than not scaling at all.
    """
    if sampling is None:
        return 0
    rate = sampling.rate
    if rate < 1:
        raise ValueError(f"sampling rate {rate} is not a 1-in-N rate")
    return SAMPLING_MODE_PACKET_INTERVAL << 14 | min(rate, SAMPLING_INTERVAL_MAX)


def split_counters(records: np.ndarray) -> np.ndarray:
    """Records whose packets and bytes all fit 32 bits, with the same totals per flow.

    A record needing k = max(ceil(packets/(2^32-1)), ceil(bytes/(2^32-1))) parts
    becomes k consecutive copies; each counter is divided as evenly as
    integers allow (the first ``counter % k`` copies get one more), so every
    copy fits both limits and the copies sum exactly to the original.  All
    other fields are kept, so a collector that aggregates by flow key sees
    the true totals, which a truncated (mod 2^32) counter would lose.
    Beyond :data:`MAX_PARTS` copies a counter saturates at MAX_PARTS * (2^32-1).
    A part may carry 0 packets when bytes alone force the split; real traffic
    (at most 65535 bytes per IPv4 packet) never does that.
    """
    packets, octets = records["packets"], records["bytes"]
    parts = np.maximum(_parts_needed(packets), _parts_needed(octets))
    np.clip(parts, 1, MAX_PARTS, out=parts)
    if np.all(parts == 1):
        return records
    # Everything stays uint64: numpy turns uint64 mixed with int64 into float64.
    limit = parts * np.uint64(COUNTER_MAX)
    repeats = parts.astype(np.intp)
    out = np.repeat(records, repeats)
    parts_each = np.repeat(parts, repeats)
    index = np.arange(len(out), dtype=np.uint64) - np.repeat(np.cumsum(parts) - parts, repeats)
    for name, total in (("packets", np.minimum(packets, limit)), ("bytes", np.minimum(octets, limit))):
        total_each = np.repeat(total, repeats)
        out[name] = total_each // parts_each + (index < total_each % parts_each)
    return out


def _parts_needed(counter: np.ndarray) -> np.ndarray:
    """ceil(counter / (2^32-1)) without the overflow of ``counter + 2^32 - 2`` near 2^64."""
    return counter // np.uint64(COUNTER_MAX) + (counter % np.uint64(COUNTER_MAX) != 0)


def encode_v5(
    records: np.ndarray,
    state: V5State,
    clock: ExportClock,
    max_records: int = V5_MAX_RECORDS,
    sampling: Sampling | None = None,
    engine_type: int = 0,
    engine_id: int = 0,
) -> tuple[list[bytes], V5State]:
    """Encode an IPv4 ``RECORD_DTYPE`` batch into NetFlow v5 datagrams of at most ``max_records`` records.

    Every datagram but the last is full; batch order is kept (split records
    stay adjacent).  Each datagram's flow_sequence is the number of records
    the engine sent before it, mod 2^32, so nfdump's check (previous
    sequence + previous count) holds across datagrams and calls.  An empty
    batch yields no datagram.  Returns the datagrams and the state for the next call.
    """
    _check_range("max_records", max_records, 1, V5_MAX_RECORDS)
    _check_range("engine_type", engine_type, 0, 0xFF)
    _check_range("engine_id", engine_id, 0, 0xFF)
    word = sampling_word(sampling)
    body = _fill_records(records, clock, V5_RECORD_DTYPE)
    counts = _datagram_counts(len(body), max_records)
    first = state.sequence(engine_type, engine_id)
    headers = _headers(V5_HEADER_DTYPE, V5_VERSION, counts, clock)
    headers["flow_sequence"] = (first + np.cumsum(counts) - counts) % _MOD32
    headers["engine_type"] = engine_type
    headers["engine_id"] = engine_id
    headers["sampling_interval"] = word
    sequences = dict(state.sequences)
    sequences[(engine_type, engine_id)] = (first + len(body)) % _MOD32
    return _datagrams(headers, body, max_records), V5State(sequences)


def encode_v1(records: np.ndarray, clock: ExportClock, max_records: int = V1_MAX_RECORDS) -> list[bytes]:
    """Encode an IPv4 ``RECORD_DTYPE`` batch into NetFlow v1 datagrams of at most ``max_records`` records.

    Same record treatment as :func:`encode_v5`; v1 has no sequence, engine or
    sampling fields, so there is no state to carry.
    """
    _check_range("max_records", max_records, 1, V1_MAX_RECORDS)
    body = _fill_records(records, clock, V1_RECORD_DTYPE)
    counts = _datagram_counts(len(body), max_records)
    return _datagrams(_headers(V1_HEADER_DTYPE, V1_VERSION, counts, clock), body, max_records)


def records_per_datagram(version: int, max_size: int) -> int:
    """The format's full record count, or fewer when ``max_size`` cannot hold it.

    A full datagram is 1168 (v1) or 1464 (v5) bytes: that fits the 1472 bytes
    of UDP over IPv4 at a 1500 MTU, but not the 1452 of UDP over IPv6, where
    29 v5 records avoid IP fragmentation (collectors take any count from 1 up).
    """
    header, most = {V1_VERSION: (V1_HEADER_DTYPE.itemsize, V1_MAX_RECORDS),
                    V5_VERSION: (V5_HEADER_DTYPE.itemsize, V5_MAX_RECORDS)}[version]
    fit = (max_size - header) // RECORD_LENGTH
    if fit < 1:
        raise ValueError(f"max_size {max_size} cannot hold one NetFlow v{version} record ({header + RECORD_LENGTH})")
    return min(most, fit)


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} {value} is outside {low}..{high}")


def _fill_records(records: np.ndarray, clock: ExportClock, dtype: np.dtype) -> np.ndarray:
    """The wire records (``dtype``) of a batch, after splitting its large counters."""
    if records.dtype != RECORD_DTYPE:
        raise TypeError(f"expected a RECORD_DTYPE batch, got {records.dtype}")
    if np.any(records["ip_version"] != 4):
        raise ValueError("NetFlow v1/v5 carry IPv4 only: filter IPv6 records out first")
    if np.any(records["nat_event"] != 0):
        raise ValueError("NetFlow v1/v5 carry no NAT events (nat_event != 0): filter them out first")
    records = split_counters(records)
    out = np.zeros(len(records), dtype)
    out["srcaddr"] = _ipv4_bytes(records, "src_addr")
    out["dstaddr"] = _ipv4_bytes(records, "dst_addr")
    out["nexthop"] = _ipv4_bytes(records, "next_hop")
    for wire, column in (("input", "ifindex"), ("output", "egress_ifindex")):
        ifindex = records[column]
        out[wire] = np.where(ifindex > IFINDEX_MAX, 0, ifindex)
    out["dpkts"] = records["packets"]
    out["doctets"] = records["bytes"]
    # Same wrapping uint32 ms clock as the header's sysUptime (§1.6); uint64
    # subtraction wraps mod 2^64, a multiple of 2^32, so the low 32 bits are right
    # even for a flow stamped a few ms before the clock's boot instant.
    boot = np.uint64(clock.boot_unix_ms % _MOD32)
    out["first"] = (records["start_ms"] - boot) & np.uint64(COUNTER_MAX)
    out["last"] = (records["end_ms"] - boot) & np.uint64(COUNTER_MAX)
    out["srcport"] = records["src_port"]
    out["dstport"] = records["dst_port"]  # ICMP: type*256+code, src_port 0 (§1.6), as the records hold it
    out["prot"] = records["protocol"]
    out["tos"] = records["tos"]
    out["tcp_flags"] = records["tcp_flags"]
    if dtype is V5_RECORD_DTYPE:
        for column in ("src_as", "dst_as"):
            asn = records[column]
            out[column] = np.where(asn > AS_MAX, AS_TRANS, asn)
        out["src_mask"] = records["src_mask"]
        out["dst_mask"] = records["dst_mask"]
    return out


def _ipv4_bytes(records: np.ndarray, column: str) -> np.ndarray:
    """The IPv4 address of a 16-byte address column: its last 4 bytes, already in network order.

    A dtype overlay reads them in place, for any batch layout (a column of a
    structured array is strided, so it cannot be viewed as plain bytes).
    """
    offset = RECORD_DTYPE.fields[column][1] + 12  # type: ignore[index]
    overlay = np.dtype({"names": ["v4"], "formats": [("u1", (4,))], "offsets": [offset],
                        "itemsize": RECORD_DTYPE.itemsize})
    return records.view(overlay)["v4"]


def _datagram_counts(n_records: int, max_records: int) -> np.ndarray:
    """Records per datagram: full ones, then the remainder."""
    full, rest = divmod(n_records, max_records)
    return np.array([max_records] * full + ([rest] if rest else []), dtype=np.int64)


def _headers(dtype: np.dtype, version: int, counts: np.ndarray, clock: ExportClock) -> np.ndarray:
    """One header per datagram with the fields v1 and v5 share; all stamped with the same export instant."""
    headers = np.zeros(len(counts), dtype)
    headers["version"] = version
    headers["count"] = counts
    headers["sys_uptime"] = clock.uptime_ms % _MOD32
    # sysUptime is the wall ms since the fixed boot instant (ExportClock), so a collector's
    # secs x 1000 + nsecs // 10^6 - sysUptime is that instant exactly, in every datagram
    # (nsecs keeps its sub-ms part, as RouterOS sends it: a float derivation is within 1 ms)
    unix_s, unix_ns = divmod(clock.unix_ns, 10**9)
    headers["unix_secs"] = unix_s % _MOD32
    headers["unix_nsecs"] = unix_ns
    return headers


def _datagrams(headers: np.ndarray, body: np.ndarray, max_records: int) -> list[bytes]:
    """Headers and records laid out as consecutive datagrams in one buffer, then cut.

    Filling one array of (header, max_records records) items lets numpy do all
    the copying; the only Python loop is the final slicing, once per datagram.
    """
    n = len(headers)
    if n == 0:
        return []
    layout = np.dtype([("header", headers.dtype), ("records", body.dtype, (max_records,))])
    buf = np.zeros(n, layout)
    buf["header"] = headers
    full = len(body) // max_records
    buf["records"][:full] = body[: full * max_records].reshape(full, max_records)
    rest = body[full * max_records :]
    buf["records"][n - 1, : len(rest)] = rest  # a no-op when the last datagram is full
    raw = buf.tobytes()
    size, head = layout.itemsize, headers.dtype.itemsize
    return [raw[i * size : i * size + head + int(c) * RECORD_LENGTH] for i, c in enumerate(headers["count"])]
