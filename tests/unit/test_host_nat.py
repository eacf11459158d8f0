"""NAT from conntrack without root: the ctnetlink parser (against pyroute2's encoder), the index, events."""

from __future__ import annotations

import ipaddress
import socket

import numpy as np
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
from pyroute2.netlink.nfnetlink.nfctsocket import IPCTNL_MSG_CT_DELETE, IPCTNL_MSG_CT_NEW, NFCTAttrTuple, nfct_msg

from pyflow.host.conntrack import (
    NAT44_SESSION_CREATE,
    NAT44_SESSION_DELETE,
    CtEntry,
    CtTuple,
    NatEvent,
    NatTable,
    events_to_records,
    parse_messages,
)
from pyflow.records import addr_from_16, addr_to_16, empty


def a16(x: str) -> bytes:
    return addr_to_16(x)


def ct(proto: int, o: tuple[str, str, int, int], r: tuple[str, str, int, int], **kw: int) -> CtEntry:
    version = ipaddress.ip_address(o[0]).version
    return CtEntry(version, proto, CtTuple(a16(o[0]), a16(o[1]), o[2], o[3]),
                   CtTuple(a16(r[0]), a16(r[1]), r[2], r[3]), **kw)


def encode(family: int, orig: NFCTAttrTuple, reply: NFCTAttrTuple, msg_type: int, status: int = 0,
           timestamp: tuple[int, int] | None = None) -> bytes:
    kw: dict[str, object] = {"tuple_orig": orig, "tuple_reply": reply, "status": status}
    if timestamp:
        kw["timestamp"] = {"attrs": [("CTA_TIMESTAMP_START", timestamp[0]), ("CTA_TIMESTAMP_STOP", timestamp[1])]}
    m = nfct_msg.create_from(**kw)
    m["nfgen_family"] = family
    m["header"]["type"] = (NFNL_SUBSYS_CTNETLINK << 8) | msg_type
    m["header"]["flags"] = 0
    m.encode()
    return bytes(m.data)


def test_parser_reads_what_pyroute2_writes() -> None:
    v4 = encode(socket.AF_INET,
                NFCTAttrTuple(saddr="10.0.0.2", daddr="192.0.2.9", proto=17, sport=40000, dport=53),
                NFCTAttrTuple(saddr="192.0.2.9", daddr="198.51.100.1", proto=17, sport=53, dport=20001),
                IPCTNL_MSG_CT_NEW, status=0x1B8, timestamp=(1_700_000_000_123_456_789, 0))
    v6 = encode(socket.AF_INET6,
                NFCTAttrTuple(family=socket.AF_INET6, saddr="fd00::2", daddr="2001:db8::9", proto=6,
                              sport=50000, dport=443),
                NFCTAttrTuple(family=socket.AF_INET6, saddr="2001:db8::9", daddr="2001:db8:ffff::1", proto=6,
                              sport=443, dport=50000),
                IPCTNL_MSG_CT_DELETE)
    icmp = encode(socket.AF_INET,
                  NFCTAttrTuple(saddr="10.0.0.2", daddr="192.0.2.9", proto=1, icmp_id=77, icmp_type=8,
                                icmp_code=0),
                  NFCTAttrTuple(saddr="192.0.2.9", daddr="198.51.100.1", proto=1, icmp_id=77, icmp_type=0,
                                icmp_code=0),
                  IPCTNL_MSG_CT_NEW)
    got = list(parse_messages(v4 + v6 + icmp))
    assert [t & 0xFF for t, _, _ in got] == [IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE, IPCTNL_MSG_CT_NEW]
    e4, e6, ei = (e for _, _, e in got)
    assert e4 == ct(17, ("10.0.0.2", "192.0.2.9", 40000, 53), ("192.0.2.9", "198.51.100.1", 53, 20001),
                    status=0x1B8, start_ns=1_700_000_000_123_456_789)
    assert e6 == ct(6, ("fd00::2", "2001:db8::9", 50000, 443), ("2001:db8::9", "2001:db8:ffff::1", 443, 50000))
    assert e4 is not None and e4.is_nat and e6 is not None and e6.is_nat
    assert ei == ct(1, ("10.0.0.2", "192.0.2.9", 0, 0), ("192.0.2.9", "198.51.100.1", 0, 0), icmp_type=8)


SNAT = ct(17, ("10.0.0.2", "192.0.2.9", 40000, 53), ("192.0.2.9", "198.51.100.1", 53, 20001))
DNAT = ct(6, ("203.0.113.5", "198.51.100.1", 33333, 8080), ("10.0.0.80", "203.0.113.5", 80, 33333))
PLAIN = ct(17, ("10.0.0.3", "192.0.2.9", 1111, 53), ("192.0.2.9", "10.0.0.3", 53, 1111))
PING = ct(1, ("10.0.0.2", "192.0.2.9", 0, 0), ("192.0.2.9", "198.51.100.1", 0, 0), icmp_type=8)
NAT66 = ct(17, ("fd00::2", "2001:db8::9", 5000, 53), ("2001:db8::9", "2001:db8:ffff::1", 53, 5000))


def flow(proto: int, src: str, dst: str, sport: int, dport: int) -> np.ndarray:
    r = empty(1)
    r["protocol"] = proto
    r["src_addr"] = a16(src)
    r["dst_addr"] = a16(dst)
    r["src_port"] = sport
    r["dst_port"] = dport
    r["ip_version"] = ipaddress.ip_address(src).version
    return r


def post(r: np.ndarray) -> tuple[str, int, str, int]:
    v = int(r["ip_version"][0])
    return (str(addr_from_16(bytes(r["nat_src_addr"][0]), v)), int(r["nat_src_port"][0]),
            str(addr_from_16(bytes(r["nat_dst_addr"][0]), v)), int(r["nat_dst_port"][0]))


def test_nat_table_both_directions() -> None:
    t = NatTable()
    assert t.load([SNAT, DNAT, PLAIN, PING, NAT66]) == 4  # PLAIN is not translated
    batch = np.concatenate([
        flow(17, "10.0.0.2", "192.0.2.9", 40000, 53),  # SNAT, original direction
        flow(17, "192.0.2.9", "198.51.100.1", 53, 20001),  # SNAT, reply direction (arrives at the router)
        flow(6, "203.0.113.5", "198.51.100.1", 33333, 8080),  # DNAT, original
        flow(6, "10.0.0.80", "203.0.113.5", 80, 33333),  # DNAT, reply
        flow(17, "10.0.0.3", "192.0.2.9", 1111, 53),  # not NAT'ed
        flow(17, "10.0.0.2", "192.0.2.9", 40001, 53),  # another port: no entry
        flow(1, "10.0.0.2", "192.0.2.9", 0, 8 * 256),  # ICMP echo: addresses only
        flow(17, "fd00::2", "2001:db8::9", 5000, 53),  # NAT66
    ])
    assert t.fill(batch) == 6
    rows = [post(batch[i:i + 1]) for i in range(len(batch))]
    assert rows == [
        ("198.51.100.1", 20001, "192.0.2.9", 53),
        ("192.0.2.9", 53, "10.0.0.2", 40000),
        ("203.0.113.5", 33333, "10.0.0.80", 80),
        ("198.51.100.1", 8080, "203.0.113.5", 33333),
        ("0.0.0.0", 0, "0.0.0.0", 0),
        ("0.0.0.0", 0, "0.0.0.0", 0),
        ("198.51.100.1", 0, "192.0.2.9", 0),
        ("2001:db8:ffff::1", 5000, "2001:db8::9", 53),
    ]
    assert t.load([]) == 0 and t.fill(batch[:1]) == 0


def test_nat_events_as_records() -> None:
    out = events_to_records([NatEvent(NAT44_SESSION_CREATE, SNAT, 1_700_000_000_123_456_789),
                             NatEvent(NAT44_SESSION_DELETE, PING, 1_700_000_001_000_000_000),
                             NatEvent(NAT44_SESSION_CREATE, NAT66, 1_700_000_002_000_000_000)])
    assert out["nat_event"].tolist() == [4, 5, 4]
    assert out["ip_version"].tolist() == [4, 4, 6]
    assert out["start_ms"].tolist() == out["end_ms"].tolist() == [1_700_000_000_123, 1_700_000_001_000,
                                                                  1_700_000_002_000]
    assert out["packets"].tolist() == out["bytes"].tolist() == [0, 0, 0]
    assert out["end_reason"].tolist() == [0, 0, 0]
    assert out["protocol"].tolist() == [17, 1, 17]
    assert out["src_port"].tolist() == [40000, 0, 5000]
    assert out["dst_port"].tolist() == [53, 8 * 256, 53]  # ICMP: type*256+code, as the meter's records
    assert [post(out[i:i + 1]) for i in range(3)] == [("198.51.100.1", 20001, "192.0.2.9", 53),
                                                      ("198.51.100.1", 0, "192.0.2.9", 0),
                                                      ("2001:db8:ffff::1", 5000, "2001:db8::9", 53)]
    assert len(events_to_records([])) == 0


def test_a_connection_gone_before_the_flow_is_exported_keeps_its_post_nat_tuple() -> None:
    """NAT event records teach the table a connection; a later dump without it does not forget it."""
    from pyflow.host.conntrack import NatTable
    from pyflow.records import addr_to_16, empty

    ev = empty(1)
    ev["nat_event"], ev["ip_version"], ev["protocol"] = 5, 4, 17
    ev["src_addr"], ev["dst_addr"] = addr_to_16("10.1.1.2"), addr_to_16("203.0.113.10")
    ev["src_port"], ev["dst_port"] = 41001, 5001
    ev["nat_src_addr"], ev["nat_dst_addr"] = addr_to_16("10.2.2.1"), addr_to_16("203.0.113.10")
    ev["nat_src_port"], ev["nat_dst_port"] = 20123, 5001
    table = NatTable()
    table.learn(ev)
    table.refresh()  # this namespace's conntrack: the connection is not there
    flow = empty(1)
    for col in ("ip_version", "protocol", "src_addr", "dst_addr", "src_port", "dst_port"):
        flow[col] = ev[col]
    assert table.fill(flow) == 1
    assert bytes(flow["nat_src_addr"][0]) == addr_to_16("10.2.2.1") and int(flow["nat_src_port"][0]) == 20123
