"""Decoding conntrack: pyflow's ctnetlink parser against pyroute2's decoding of the same messages.

Why pyflow/host/conntrack.py keeps its own parser (docs/architecture.md, "Netlink"): a NAT
router's table dump and its NEW/DESTROY event stream are read entry by entry, and pyroute2's
generic decoding (``nfct_msg``, then ``get_attr`` for the tuple fields) costs several times
more per entry.  Both sides decode the same datagrams (built with pyroute2's encoder) into
the same ``CtEntry`` values; the socket reads, the same for both, are left out.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from pyroute2.netlink.marshal import Marshal
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
from pyroute2.netlink.nfnetlink.nfctsocket import IPCTNL_MSG_CT_NEW, AsyncNFCTSocket, NFCTAttrTuple, nfct_msg

from pyflow.host.conntrack import CtEntry, CtTuple, parse_messages
from pyflow.records import addr_to_16


def encoded(n: int) -> list[bytes]:
    """``n`` masqueraded UDP/TCP entries as conntrack sends them, about 64 KiB of messages per datagram."""
    out, chunk = [], b""
    for i in range(n):
        proto, client = (6, 17)[i % 2], f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        m = nfct_msg.create_from(
            tuple_orig=NFCTAttrTuple(saddr=client, daddr="192.0.2.9", proto=proto, sport=1024 + i % 60000,
                                     dport=443),
            tuple_reply=NFCTAttrTuple(saddr="192.0.2.9", daddr="198.51.100.1", proto=proto, sport=443,
                                      dport=20000 + i % 40000),
            status=0x1B8, timestamp={"attrs": [("CTA_TIMESTAMP_START", 1_700_000_000_000_000_000 + i)]})
        m["nfgen_family"] = socket.AF_INET
        m["header"]["type"] = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
        m.encode()
        chunk += bytes(m.data)
        if len(chunk) > 60_000:
            out.append(chunk)
            chunk = b""
    return [*out, chunk] if chunk else out


def _tuple(t: Any, version: int) -> tuple[CtTuple, int]:
    ip, pr = t.get_attr("CTA_TUPLE_IP"), t.get_attr("CTA_TUPLE_PROTO")
    key = ("CTA_IP_V4_SRC", "CTA_IP_V4_DST") if version == 4 else ("CTA_IP_V6_SRC", "CTA_IP_V6_DST")
    return CtTuple(addr_to_16(ip.get_attr(key[0])), addr_to_16(ip.get_attr(key[1])),
                   int(pr.get_attr("CTA_PROTO_SRC_PORT") or 0), int(pr.get_attr("CTA_PROTO_DST_PORT") or 0)), \
        int(pr.get_attr("CTA_PROTO_NUM"))


def pyroute2_entries(datagrams: list[bytes]) -> list[CtEntry]:
    """What a conntrack reader built on pyroute2's decoding does with each datagram."""
    marshal = Marshal()
    marshal.msg_map.update(AsyncNFCTSocket.policy)
    out = []
    for data in datagrams:
        for msg in marshal.parse(data):
            version = 4 if msg["nfgen_family"] == socket.AF_INET else 6
            orig, proto = _tuple(msg.get_attr("CTA_TUPLE_ORIG"), version)
            reply, _ = _tuple(msg.get_attr("CTA_TUPLE_REPLY"), version)
            ts = msg.get_attr("CTA_TIMESTAMP")
            start = int(ts.get_attr("CTA_TIMESTAMP_START") or 0) if ts is not None else 0
            out.append(CtEntry(version, proto, orig, reply, status=int(msg.get_attr("CTA_STATUS") or 0),
                               start_ns=start))
    return out


def pyflow_entries(datagrams: list[bytes]) -> list[CtEntry]:
    return [e for data in datagrams for _, _, e in parse_messages(data) if e is not None]


def run(n: int, repeat: int, median_time: Callable[[Callable[[], object], int], float]) -> None:
    print(f"## Decoding conntrack ({n:,} NAT'ed entries, dump or NEW events alike)\n")
    datagrams = encoded(n)
    ours, theirs = pyflow_entries(datagrams), pyroute2_entries(datagrams)
    assert ours == theirs and len(ours) == n, (len(ours), len(theirs))
    t_ours = median_time(lambda: pyflow_entries(datagrams), repeat)
    t_theirs = median_time(lambda: pyroute2_entries(datagrams), max(1, repeat // 2))
    print("| decoder | s | µs per entry | entries/s |")
    print("|---|---:|---:|---:|")
    for name, t in (("pyroute2 (nfct_msg, get_attr)", t_theirs), ("pyflow (host/conntrack.py)", t_ours)):
        print(f"| {name} | {t:.3f} | {t / n * 1e6:.1f} | {n / t:,.0f} |")
    print(f"\npyflow's parser: {t_theirs / t_ours:.1f}x faster\n")
