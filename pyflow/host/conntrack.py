"""NAT from conntrack: the post-NAT addresses and ports of flows, and NAT session events.

What "post-NAT" means for a record (RouterOS, IPFIX IEs 225-228: the values
after the packet passed the NAT, seen from the observation point).  pyflow
meters packets as they arrive, before the NAT.  A conntrack entry holds two
tuples, each as the packets of that direction *arrive*:

* ``orig``  -- the initiator's packets, e.g. ``C:c -> S:s``;
* ``reply`` -- the responder's packets, e.g. ``S:s -> R:r`` after masquerade
  to the router's address R and port r.

An entry is NAT'ed when ``orig`` is not the inverse of ``reply``.  Then:

* a record in the **original direction** has the 5-tuple ``orig``; its packets
  leave as the inverse of ``reply``: post-NAT source = ``reply.dst`` (R:r),
  post-NAT destination = ``reply.src`` (S:s);
* a record in the **reply direction** has the 5-tuple ``reply``; its packets
  leave as the inverse of ``orig``: post-NAT source = ``orig.dst`` (S:s),
  post-NAT destination = ``orig.src`` (C:c).

The same holds for DNAT (port forwarding), where ``reply.src`` is the inside
server.  Both tuples of every NAT'ed entry are indexed, so both directions of
a connection find it.  Records that match nothing keep zero NAT columns --
among them flows metered at egress (TC), whose packets already passed the NAT
(SNAT is done in POSTROUTING, before TC egress; DNAT in PREROUTING, after XDP
and TC ingress): their own addresses are the post-NAT ones.

Ports: TCP, UDP and SCTP match on ports (the kernel meter and conntrack both
have them).  Other protocols (ICMP, whose records carry type/code in
``dst_port``, GRE, ...) match on protocol and addresses alone, and their NAT
ports stay 0; when several such entries share the addresses, the first wins
(their translated addresses are the same under masquerade).

The conntrack table and its events are read with a plain ``NETLINK_NETFILTER``
socket and a small parser of ctnetlink's attributes (constants from pyroute2):
the one place pyflow does not use pyroute2 for netlink, because pyroute2's
generic decoding (``nfct_msg``, ``get_attr``) costs about ten times more per
entry (``python -m bench --only conntrack``; docs/benchmarks.md: 203 us per
entry against 15.5 us, 20 s against 1.5 s for a 100k-entry table).  The tests
check it against pyroute2's own encoding and decoding and against ``conntrack -L``.
``NatTable.fill`` is a vectorised hash join: about 30 ms for 100k records.

NAT events (``NatEventListener``): conntrack's NEW and DESTROY notifications
(netlink groups ``NFNLGRP_CONNTRACK_NEW`` / ``_DESTROY``) of NAT'ed entries,
as records with natEvent (IE 230, IANA "NAT Event Type") 4 = NAT44 session
create / 5 = NAT44 session delete.  IPv6 NAT (NAT66, e.g. nftables
masquerade on IPv6) has no value of its own in that registry; it is reported
with the same 4/5 and ``ip_version`` 6 (Linux conntrack does no NAT64, which
would be 6/7).  The kernel sends these only when ``net.netfilter.
nf_conntrack_events`` is 1, or 2 ("auto", the default since Linux 5.19) while
a listener is subscribed -- in auto mode only for connections created after
the listener subscribed (older ones get no delete event either).
``conntrack_events_setting()`` reads the switch.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
from pyroute2.netlink.nfnetlink import (
    NFNL_SUBSYS_CTNETLINK,
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_NEW,
)
from pyroute2.netlink.nfnetlink.nfctsocket import IPCTNL_MSG_CT_DELETE, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_NEW

from pyflow import records as rec
from pyflow.host._netns import Netns, WakePipe, stop_reader, wait_until
from pyflow.records import V4_MAPPED_PREFIX

NETLINK_NETFILTER = 12
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP_INTR, NLM_F_DUMP = 0x1, 0x2, 0x10, 0x300
NLA_TYPE_MASK = 0x3FFF
# ctnetlink attributes (linux/netfilter/nfnetlink_conntrack.h)
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_TIMESTAMP = 1, 2, 3, 20
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE = 5, 6, 8, 9
CTA_TIMESTAMP_START, CTA_TIMESTAMP_STOP = 1, 2

NAT44_SESSION_CREATE = 4  # IANA natEvent
NAT44_SESSION_DELETE = 5
PORT_PROTOS = (6, 17, 132)  # TCP, UDP, SCTP: ports in the meter's records and in conntrack's tuples
ICMP_PROTOS = (1, 58)

_NLMSG = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_FAMILY: dict[int, int] = {int(socket.AF_INET): 4, int(socket.AF_INET6): 6}


class CtTuple(NamedTuple):
    """One direction of a conntrack entry, as its packets arrive (addresses 16 bytes, IPv4 v4-mapped)."""

    src: bytes
    dst: bytes
    sport: int
    dport: int


class CtEntry(NamedTuple):
    version: int  # 4 or 6
    proto: int
    orig: CtTuple
    reply: CtTuple
    icmp_type: int = 0  # of the original direction, ICMP/ICMPv6 only
    icmp_code: int = 0
    status: int = 0
    start_ns: int = 0  # CTA_TIMESTAMP (wall clock ns) when net.netfilter.nf_conntrack_timestamp=1
    stop_ns: int = 0

    @property
    def is_nat(self) -> bool:
        """Is ``orig`` other than the inverse of ``reply`` (addresses or ports translated)?"""
        o, r = self.orig, self.reply
        return o.src != r.dst or o.dst != r.src or o.sport != r.dport or o.dport != r.sport


def _attrs(buf: bytes | memoryview, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Attribute type -> (payload start, payload end) of the attributes in ``buf[start:end]``."""
    out = {}
    off = start
    while off + 4 <= end:
        length, typ = _NLA.unpack_from(buf, off)
        if length < 4:
            break
        out[typ & NLA_TYPE_MASK] = (off + 4, off + length)
        off += (length + 3) & ~3
    return out


def _tuple(buf: bytes, span: tuple[int, int], version: int) -> tuple[CtTuple, int, int, int]:
    """(tuple, protocol, icmp type, icmp code) of a CTA_TUPLE_* attribute."""
    t = _attrs(buf, *span)
    ip = _attrs(buf, *t[CTA_TUPLE_IP])
    pr = _attrs(buf, *t[CTA_TUPLE_PROTO])
    if version == 4:
        s, d = ip[CTA_IP_V4_SRC][0], ip[CTA_IP_V4_DST][0]
        src, dst = V4_MAPPED_PREFIX + buf[s:s + 4], V4_MAPPED_PREFIX + buf[d:d + 4]
    else:
        s, d = ip[CTA_IP_V6_SRC][0], ip[CTA_IP_V6_DST][0]
        src, dst = buf[s:s + 16], buf[d:d + 16]
    proto = buf[pr[CTA_PROTO_NUM][0]]
    sp, dp = pr.get(CTA_PROTO_SRC_PORT), pr.get(CTA_PROTO_DST_PORT)
    sport = _BE16.unpack_from(buf, sp[0])[0] if sp else 0
    dport = _BE16.unpack_from(buf, dp[0])[0] if dp else 0
    ty = pr.get(CTA_PROTO_ICMP_TYPE) or pr.get(CTA_PROTO_ICMPV6_TYPE)
    co = pr.get(CTA_PROTO_ICMP_CODE) or pr.get(CTA_PROTO_ICMPV6_CODE)
    return CtTuple(src, dst, sport, dport), proto, buf[ty[0]] if ty else 0, buf[co[0]] if co else 0


def parse_entry(buf: bytes, start: int, end: int) -> CtEntry | None:
    """A ctnetlink message (``buf[start:end]``, from its netlink header) as a ``CtEntry``; None if not IP."""
    version = _FAMILY.get(buf[start + 16])  # nfgenmsg.nfgen_family, after the 16-byte nlmsghdr
    if version is None:
        return None
    a = _attrs(buf, start + 20, end)
    if CTA_TUPLE_ORIG not in a or CTA_TUPLE_REPLY not in a:
        return None
    orig, proto, ity, ico = _tuple(buf, a[CTA_TUPLE_ORIG], version)
    reply = _tuple(buf, a[CTA_TUPLE_REPLY], version)[0]
    st = a.get(CTA_STATUS)
    status = _BE32.unpack_from(buf, st[0])[0] if st else 0
    start_ns = stop_ns = 0
    ts = a.get(CTA_TIMESTAMP)
    if ts:
        tsa = _attrs(buf, *ts)
        if CTA_TIMESTAMP_START in tsa:
            start_ns = _BE64.unpack_from(buf, tsa[CTA_TIMESTAMP_START][0])[0]
        if CTA_TIMESTAMP_STOP in tsa:
            stop_ns = _BE64.unpack_from(buf, tsa[CTA_TIMESTAMP_STOP][0])[0]
    return CtEntry(version, proto, orig, reply, ity, ico, status, start_ns, stop_ns)


def parse_messages(buf: bytes) -> Iterable[tuple[int, int, CtEntry | None]]:
    """(netlink type, flags, entry) for each message in one datagram; NLMSG_ERROR raises."""
    off = 0
    while off + 16 <= len(buf):
        length, typ, flags, _, _ = _NLMSG.unpack_from(buf, off)
        if length < 16 or off + length > len(buf):
            break
        if typ == NLMSG_ERROR:
            code = -struct.unpack_from("=i", buf, off + 16)[0]
            if code:
                raise OSError(code, f"conntrack: {os.strerror(code)}")
        elif typ == NLMSG_DONE:
            yield typ, flags, None
        elif typ >> 8 == NFNL_SUBSYS_CTNETLINK:
            yield typ, flags, parse_entry(buf, off, off + length)
        off += (length + 3) & ~3


def dump_conntrack(timeout: float = 30.0, attempts: int = 3) -> list[CtEntry]:
    """Every IPv4 and IPv6 conntrack entry of the calling thread's network namespace."""
    for _ in range(attempts):
        entries: list[CtEntry] = []
        interrupted = False
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((0, 0))
            s.settimeout(timeout)
            seq = int(time.monotonic_ns() & 0x7FFFFFFF)
            msg_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
            s.send(_NLMSG.pack(20, msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + struct.pack("=BBH", 0, 0, 0))
            deadline = time.monotonic() + timeout
            done = False
            while not done:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"conntrack dump did not finish within {timeout}s")
                data = s.recv(1 << 20)
                for typ, flags, entry in parse_messages(data):
                    if flags & NLM_F_DUMP_INTR:
                        interrupted = True
                    if typ == NLMSG_DONE:
                        done = True
                    elif entry is not None:
                        entries.append(entry)
        if not interrupted:
            return entries
    return entries


def conntrack_events_setting() -> int | None:
    """``net.netfilter.nf_conntrack_events`` of the calling thread's namespace (None: conntrack not loaded)."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_events") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


# -- the NAT index -------------------------------------------------------------------------------

def _words(proto: np.ndarray, src: np.ndarray, dst: np.ndarray, sport: np.ndarray, dport: np.ndarray) -> np.ndarray:
    """The lookup key of each 5-tuple as five uint64 words: src, dst (two each), protocol and ports.

    Ports count only for ``PORT_PROTOS``; other protocols key on addresses alone.
    """
    n = len(proto)
    w = np.empty((n, 5), dtype=np.uint64)
    w[:, 0:2] = np.ascontiguousarray(src).view(np.uint64).reshape(n, 2)
    w[:, 2:4] = np.ascontiguousarray(dst).view(np.uint64).reshape(n, 2)
    proto = np.asarray(proto).astype(np.uint64)
    ported = np.isin(proto, PORT_PROTOS)
    ports = (np.asarray(sport).astype(np.uint64) << np.uint64(16)) | np.asarray(dport).astype(np.uint64)
    w[:, 4] = (proto << np.uint64(32)) | np.where(ported, ports, np.uint64(0))
    return w


_PRIME = np.uint64(0x9E3779B97F4A7C15)


def _hash(words: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each key row: the index searches hashes, then compares the keys themselves."""
    h = words[:, 0].copy()
    for i in range(1, words.shape[1]):
        h ^= words[:, i]
        h *= _PRIME
        h ^= h >> np.uint64(29)
    return h


class _NatIndex(NamedTuple):
    words: np.ndarray  # (m, 5) uint64 keys, unique, in the order of ``hashes``
    hashes: np.ndarray  # uint64, sorted and unique
    src: np.ndarray  # post-NAT values per key
    dst: np.ndarray
    sport: np.ndarray
    dport: np.ndarray


def _v16(items: Iterable[bytes]) -> np.ndarray:
    """16-byte strings as a ``V16`` array (one join, no per-item conversion)."""
    return np.frombuffer(b"".join(items), dtype="V16").copy()


def _build_index(entries: Iterable[CtEntry]) -> tuple[_NatIndex, int]:
    nat = [e for e in entries if e.is_nat]
    orig = [e.orig for e in nat]
    reply = [e.reply for e in nat]
    # orig-direction rows, then reply-direction rows: (key tuple) -> (post-NAT tuple = inverse of the other)
    proto = np.tile(np.array([e.proto for e in nat], dtype=np.uint8), 2)
    o_src, o_dst = _v16(t.src for t in orig), _v16(t.dst for t in orig)
    r_src, r_dst = _v16(t.src for t in reply), _v16(t.dst for t in reply)
    o_sp = np.array([t.sport for t in orig], dtype=np.uint16)
    o_dp = np.array([t.dport for t in orig], dtype=np.uint16)
    r_sp = np.array([t.sport for t in reply], dtype=np.uint16)
    r_dp = np.array([t.dport for t in reply], dtype=np.uint16)
    words = _words(proto, np.concatenate([o_src, r_src]), np.concatenate([o_dst, r_dst]),
                   np.concatenate([o_sp, r_sp]), np.concatenate([o_dp, r_dp]))
    _, first = np.unique(words.view("S40").reshape(-1), return_index=True)  # the first row of equal keys wins
    hashes = _hash(words[first])
    order = np.argsort(hashes, kind="stable")
    first, hashes = first[order], hashes[order]
    dup = np.zeros(len(hashes), dtype=bool)
    dup[1:] = hashes[1:] == hashes[:-1]
    if dup.any():  # distinct keys with one hash (about never): the later ones go unmatched, never mismatched
        first, hashes = first[~dup], hashes[~dup]
    ported = np.isin(proto, PORT_PROTOS)
    post_src = np.concatenate([r_dst, o_dst])[first]
    post_dst = np.concatenate([r_src, o_src])[first]
    post_sport = np.where(ported, np.concatenate([r_dp, o_dp]), 0).astype(np.uint16)[first]
    post_dport = np.where(ported, np.concatenate([r_sp, o_sp]), 0).astype(np.uint16)[first]
    return _NatIndex(words[first], hashes, post_src, post_dst, post_sport, post_dport), len(nat)


class NatTable:
    """The NAT'ed conntrack entries of the network namespace this table was created in.

    ``refresh()`` dumps conntrack and swaps in a new index (one reference
    assignment: ``fill`` running in another thread sees the old or the new
    one); ``fill(records)`` sets the post-NAT columns of the records whose
    5-tuple is either tuple of a NAT'ed entry.  ``load(entries)`` builds the
    index from given entries (no kernel).
    """

    def __init__(self, retain_s: float = 60.0) -> None:
        self._netns = Netns()
        self._index, self.connections = _build_index(())
        self.refreshed_ns: int | None = None  # wall clock of the last refresh
        # A flow is exported after its last packet, by which time its conntrack entry may be
        # gone (closed, flushed, timed out): NAT'ed entries are remembered this long after
        # they were last seen, so such a flow still gets its post-NAT tuple.
        self.retain_s = retain_s
        self._seen: dict[tuple[int, int, CtTuple, CtTuple], tuple[CtEntry, float]] = {}

    def refresh(self) -> int:
        """Dump conntrack now; returns how many NAT'ed connections it holds (recently gone ones included)."""
        now = time.monotonic()
        for e in self._netns.run(dump_conntrack):
            if e.is_nat:
                self._seen[(e.version, e.proto, e.orig, e.reply)] = (e, now)
        self._seen = {k: v for k, v in self._seen.items() if now - v[1] <= self.retain_s}
        return self.load(e for e, _ in self._seen.values())

    def learn(self, events: np.ndarray) -> None:
        """Remember the connections of NAT event records (``nat_event`` 4/5, RECORD_DTYPE) as if a
        dump had shown them: a connection opened and closed between two refreshes still gives
        its flows their post-NAT tuple."""
        if len(events) == 0:
            return
        now = time.monotonic()
        for r in events:
            orig = CtTuple(bytes(r["src_addr"]), bytes(r["dst_addr"]), int(r["src_port"]), int(r["dst_port"]))
            # post-NAT source = the reply's destination, post-NAT destination = the reply's source
            reply = CtTuple(bytes(r["nat_dst_addr"]), bytes(r["nat_src_addr"]), int(r["nat_dst_port"]),
                            int(r["nat_src_port"]))
            e = CtEntry(int(r["ip_version"]), int(r["protocol"]), orig, reply)
            self._seen[(e.version, e.proto, e.orig, e.reply)] = (e, now)
        self.load(e for e, _ in self._seen.values())

    def load(self, entries: Iterable[CtEntry]) -> int:
        index, n = _build_index(entries)
        self._index, self.connections = index, n
        self.refreshed_ns = time.time_ns()
        return n

    def __len__(self) -> int:
        return self.connections

    def fill(self, records: np.ndarray) -> int:
        """Fill nat_src_addr, nat_dst_addr, nat_src_port, nat_dst_port in place; returns how many matched."""
        idx = self._index
        if len(records) == 0 or len(idx.hashes) == 0:
            return 0
        words = _words(records["protocol"], records["src_addr"], records["dst_addr"], records["src_port"],
                       records["dst_port"])
        pos = np.minimum(np.searchsorted(idx.hashes, _hash(words)), len(idx.hashes) - 1)
        hit = (idx.words[pos] == words).all(axis=1)
        where = np.flatnonzero(hit)
        p = pos[where]
        records["nat_src_addr"][where] = idx.src[p]
        records["nat_dst_addr"][where] = idx.dst[p]
        records["nat_src_port"][where] = idx.sport[p]
        records["nat_dst_port"][where] = idx.dport[p]
        return len(where)

    def close(self) -> None:
        self._netns.close()


# -- NAT events ----------------------------------------------------------------------------------


class NatEvent(NamedTuple):
    event: int  # natEvent: 4 create, 5 delete
    entry: CtEntry
    time_ns: int  # wall clock


def events_to_records(events: list[NatEvent]) -> np.ndarray:
    """NAT events as flow records: pre-NAT 5-tuple, post-NAT columns, natEvent, no packets."""
    out = rec.empty(len(events))
    if not events:
        return out
    es = [ev.entry for ev in events]
    proto = np.array([e.proto for e in es], dtype=np.uint8)
    icmp = np.isin(proto, ICMP_PROTOS)
    out["nat_event"] = [ev.event for ev in events]
    out["ip_version"] = [e.version for e in es]
    out["protocol"] = proto
    out["src_addr"] = _v16(e.orig.src for e in es)
    out["dst_addr"] = _v16(e.orig.dst for e in es)
    sport = np.array([e.orig.sport for e in es], dtype=np.uint16)
    dport = np.array([e.orig.dport for e in es], dtype=np.uint16)
    icmp_td = np.array([e.icmp_type * 256 + e.icmp_code for e in es], dtype=np.uint16)
    out["src_port"] = np.where(icmp, 0, sport)
    out["dst_port"] = np.where(icmp, icmp_td, dport)
    out["icmp_type"] = np.where(icmp, [e.icmp_type for e in es], 0)
    out["icmp_code"] = np.where(icmp, [e.icmp_code for e in es], 0)
    # the original direction leaves as the inverse of the reply tuple
    out["nat_src_addr"] = _v16(e.reply.dst for e in es)
    out["nat_dst_addr"] = _v16(e.reply.src for e in es)
    out["nat_src_port"] = np.where(icmp, 0, [e.reply.dport for e in es])
    out["nat_dst_port"] = np.where(icmp, 0, [e.reply.sport for e in es])
    ms = np.array([ev.time_ns // 1_000_000 for ev in events], dtype=np.uint64)
    out["start_ms"] = ms
    out["end_ms"] = ms
    return out


class NatEventListener:
    """Conntrack's NEW and DESTROY notifications of NAT'ed connections, as records (``drain()``).

    Subscribes (in the network namespace of the creating thread) at
    construction; a daemon thread reads the notifications and keeps those of
    NAT'ed entries until ``drain()`` takes them.  Event time: the kernel's
    timestamp when conntrack has them (``nf_conntrack_timestamp=1``), else
    when the notification was read.  ``lost`` counts notifications the kernel
    could not deliver (socket buffer full), ``dropped`` those discarded because
    more than ``max_pending`` were waiting.  ``close()`` stops at once.
    """

    def __init__(self, max_pending: int = 1_000_000, rcvbuf: int = 8 << 20,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.max_pending = max_pending
        self.lost = 0
        self.dropped = 0
        self.seen = 0  # NEW/DESTROY notifications read, NAT'ed or not
        self.errors = 0
        self.last_error: str | None = None
        self.events_setting = conntrack_events_setting()
        self._clock = clock
        self._pending: list[NatEvent] = []
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._closed = False
        groups = (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        try:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE: past rmem_max (root)
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self._sock.bind((0, groups))
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise
        self._wake = WakePipe()
        self._thread = threading.Thread(target=self._run, name="pyflow-nat-events", daemon=True)
        self._thread.start()

    def _handle(self, data: bytes) -> None:
        now = self._clock()
        new = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
        delete = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
        got: list[NatEvent] = []
        for typ, _, entry in parse_messages(data):
            if entry is None or typ not in (new, delete):
                continue
            self.seen += 1
            if not entry.is_nat:
                continue
            if typ == new:
                got.append(NatEvent(NAT44_SESSION_CREATE, entry, entry.start_ns or now))
            else:
                got.append(NatEvent(NAT44_SESSION_DELETE, entry, entry.stop_ns or now))
        if got:
            with self._cv:
                room = max(0, self.max_pending - len(self._pending))
                self._pending.extend(got[:room])
                self.dropped += len(got) - min(room, len(got))
                self._cv.notify_all()

    def _run(self) -> None:
        fd = self._sock.fileno()
        while not self._closed:
            ready, _, _ = select.select([fd, self._wake.fd], [], [])
            if self._wake.fd in ready or self._closed:
                return
            for _ in range(10_000):  # bounded: back to select (and close) now and then
                try:
                    data = self._sock.recv(1 << 20)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        self.lost += 1
                        continue
                    self.errors += 1
                    self.last_error = str(exc)
                    break
                try:
                    self._handle(data)
                except Exception as exc:  # a message this parser does not know: count, go on
                    self.errors += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def wait(self, predicate: Callable[[list[NatEvent]], bool], timeout: float) -> bool:
        """Until ``predicate(pending events)`` holds (True) or ``timeout`` passes (False); takes nothing."""
        return wait_until(self._cv, lambda: predicate(self._pending), lambda: self._closed, timeout)

    def drain(self) -> np.ndarray:
        """The events since the last drain, oldest first, as records (RECORD_DTYPE)."""
        with self._lock:
            events, self._pending = self._pending, []
        return events_to_records(events)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        stop_reader(self._thread, self._wake, self._cv)
        self._sock.close()

    def __enter__(self) -> NatEventListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
