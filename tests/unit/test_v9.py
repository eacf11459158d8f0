"""NetFlow v9 encoder: golden bytes, decoders we did not write, round-trip properties, a real nfcapd.

The encoder is judged by scapy's NetFlow layers, tshark, nfcapd/nfdump 1.7.1,
and a small struct-based parser in this file that shares no code or tables
with ``pyflow.export`` and turns uptimes back into absolute times the way a
collector does (from the header alone).
"""

from __future__ import annotations

import shutil
import struct
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.netflow import (
    NetflowDataflowsetV9,
    NetflowHeader,
    NetflowHeaderV9,
    NetflowOptionsFlowsetV9,
    netflowv9_defragment,
)

from pyflow.config import TargetSettings
from pyflow.export import v9
from pyflow.export.context import ExportClock, ExportContext, Sampling
from pyflow.export.ie import BY_ID
from pyflow.export.registry import encoder_for
from pyflow.export.target import Target
from pyflow.export.templates import build_template
from pyflow.export.v9 import V9_TEMPLATES, V9State
from pyflow.records import V4_MAPPED_PREFIX, empty
from tests.unit.nfcapd import collect, requires_nfdump
from tests.unit.test_ipfix import (
    FLOW_V4,
    FLOW_V6,
    IPV4_IES,
    IPV6_IES,
    V4_RECORD,
    V6_RECORD,
    by_version,
    golden_flow_batch,
    make_batch,
    on_the_wire,
    tshark_complaints,
    tshark_pdml,
)
from tests.unit.test_ipfix import record_batches as ipfix_record_batches
from tests.unit.test_ipfix import rows_to_batch as ipfix_rows_to_batch

U32 = 1 << 32
EXPORT_S = 1_700_000_010
# sysUptime 3600000 and UNIX Secs 1700000010: the §6.2 header.
CLOCK = ExportClock(unix_ns=EXPORT_S * 10**9, uptime_ms=3_600_000)
LATER = ExportClock(unix_ns=(EXPORT_S + 1) * 10**9, uptime_ms=3_601_000)

# flow-protocols.md §6.2, verbatim.
GOLDEN_6_2 = bytes.fromhex(
    "000900020036ee806553f10a00000000000000000000002c0100000900080004"
    "000c000400070002000b0002000400010001000400020004001600040015000401"
    "000024c0000201c6336402c00001bb06000005dc0000000a0036c7700036daf8"
    "000000"
)


# --------------------------------------------------------------------------
# An independent v9 parser (RFC 3954 layout, own type-to-column table).
# --------------------------------------------------------------------------

TYPE_COLUMNS = {
    1: "bytes", 2: "packets", 4: "protocol", 5: "tos", 6: "tcp_flags", 7: "src_port", 8: "src_addr",
    9: "src_mask", 10: "ifindex", 11: "dst_port", 12: "dst_addr", 13: "dst_mask", 14: "egress_ifindex",
    15: "next_hop", 16: "src_as", 17: "dst_as", 21: "end_ms", 22: "start_ms", 25: "length_min",
    26: "length_max", 27: "src_addr", 28: "dst_addr", 29: "src_mask", 30: "dst_mask", 31: "flow_label",
    33: "igmp_type", 52: "ttl_min", 53: "ttl_max", 56: "src_mac", 58: "vlan_id", 245: "inner_vlan_id", 60: "ip_version",
    61: "direction", 62: "next_hop", 80: "dst_mac", 136: "end_reason", 160: "system_init_ms",
    176: "icmp_type", 177: "icmp_code", 178: "icmp_type", 179: "icmp_code", 184: "tcp_seq", 185: "tcp_ack",
    186: "tcp_window", 189: "ip_header_length", 205: "udp_length", 206: "is_multicast", 225: "nat_src_addr",
    226: "nat_dst_addr", 227: "nat_src_port", 228: "nat_dst_port", 230: "nat_event", 281: "nat_src_addr",
    282: "nat_dst_addr", 323: "start_ms",
}  # fmt: skip
IPV4_ADDRESS_TYPES = {8, 12, 15, 225, 226}
RAW_TYPES = {27, 28, 62, 281, 282, 56, 80}  # IPv6 addresses and MACs: the bytes as they are


@dataclass
class Packet:
    count: int
    sys_uptime: int
    unix_secs: int
    sequence: int
    source_id: int
    flowset_ids: list[int] = field(default_factory=list)
    records: int = 0  # every record found: templates, options templates, data, options data
    rows: list[dict[str, int | bytes]] = field(default_factory=list)  # flow records
    options: dict[int, list[list[int | bytes]]] = field(default_factory=dict)  # options data by template id


@dataclass
class Templates:
    data: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    options: dict[int, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = field(default_factory=dict)


def parse_packet(raw: bytes, known: Templates) -> Packet:
    version, count, uptime, secs, seq, source = struct.unpack_from("!HHIIII", raw)
    assert version == 9
    packet = Packet(count, uptime, secs, seq, source)
    offset = 20
    while offset < len(raw):
        set_id, length = struct.unpack_from("!HH", raw, offset)
        assert length > 4 and offset + length <= len(raw) and length % 4 == 0, "flowsets are 4-byte aligned"
        body = raw[offset + 4 : offset + length]
        packet.flowset_ids.append(set_id)
        if set_id == 0:
            packet.records += parse_templates(body, known)
        elif set_id == 1:
            packet.records += parse_options_template(body, known)
        elif set_id in known.options:
            scope, options = known.options[set_id]
            rows = split_records(body, scope + options)
            packet.options.setdefault(set_id, []).extend([int_or_bytes(chunk, t) for t, chunk in r] for r in rows)
            packet.records += len(rows)
        else:
            rows = split_records(body, known.data[set_id])
            packet.rows += [decode_flow(r, packet) for r in rows]
            packet.records += len(rows)
        offset += length
    assert offset == len(raw)
    return packet


def parse_templates(body: bytes, known: Templates) -> int:
    pos = n = 0
    while pos < len(body):
        template_id, count = struct.unpack_from("!HH", body, pos)
        known.data[template_id] = [struct.unpack_from("!HH", body, pos + 4 + 4 * i) for i in range(count)]
        pos += 4 + 4 * count
        n += 1
    return n


def parse_options_template(body: bytes, known: Templates) -> int:
    """Exactly one options template per flowset (nfdump reads only the first), then ≤3 zero bytes."""
    template_id, scope_bytes, option_bytes = struct.unpack_from("!HHH", body)
    specs = [struct.unpack_from("!HH", body, 6 + 4 * i) for i in range((scope_bytes + option_bytes) // 4)]
    n_scope = scope_bytes // 4
    known.options[template_id] = (specs[:n_scope], specs[n_scope:])
    padding = body[6 + scope_bytes + option_bytes :]
    assert len(padding) < 4 and not any(padding)
    return 1


def split_records(body: bytes, specs: list[tuple[int, int]]) -> list[list[tuple[int, bytes]]]:
    """Records back to back, then at most 3 zero padding bytes."""
    size = sum(length for _, length in specs)
    n = len(body) // size
    padding = body[n * size :]
    assert len(padding) < 4 and not any(padding), f"bad padding {padding!r}"
    records = []
    for i in range(n):
        pos, record = i * size, []
        for field_type, length in specs:
            record.append((field_type, body[pos : pos + length]))
            pos += length
        records.append(record)
    return records


def int_or_bytes(chunk: bytes, field_type: int) -> int | bytes:
    return chunk.rstrip(b"\0") if field_type == 83 else int.from_bytes(chunk, "big")


def decode_flow(record: list[tuple[int, bytes]], packet: Packet) -> dict[str, int | bytes]:
    """Values by record column; uptimes become absolute ms by the collector formula of §2.8."""
    row: dict[str, int | bytes] = {}
    for field_type, chunk in record:
        name = TYPE_COLUMNS[field_type]
        if field_type in IPV4_ADDRESS_TYPES:
            row[name] = V4_MAPPED_PREFIX + chunk
        elif field_type in RAW_TYPES:
            row[name] = chunk
        elif field_type in (21, 22):
            uptime = int.from_bytes(chunk, "big")
            row[name] = packet.unix_secs * 1000 - (packet.sys_uptime - uptime) % U32
        else:
            row[name] = int.from_bytes(chunk, "big")
    return row


def parse_all(packets: list[bytes]) -> list[Packet]:
    known = Templates()
    return [parse_packet(p, known) for p in packets]


def rows_to_batch(rows: list[dict[str, int | bytes]]) -> np.ndarray:
    """Decoded rows as a record batch, without systemInitTimeMilliseconds (no column: see system_init_ms)."""
    return ipfix_rows_to_batch([{k: v for k, v in row.items() if k != "system_init_ms"} for row in rows])


def system_init_ms(rows: list[dict[str, int | bytes]]) -> set[int | bytes]:
    return {row["system_init_ms"] for row in rows}


# --------------------------------------------------------------------------
# Golden bytes and templates.
# --------------------------------------------------------------------------


def golden_template_6_2() -> v9.Template:
    """§6.2's template: the §6.1 fields with 4-byte counters (reduced size) and uptimes instead of 152/153."""
    names = [BY_ID[i].name for i in (8, 12, 7, 11, 4, 1, 2, 22, 21)]
    return build_template(256, [*names[:5], (names[5], 4), (names[6], 4), *names[7:]])


def test_golden_packet_of_flow_protocols_6_2() -> None:
    batch = golden_flow_batch()
    packets, state = v9.encode(batch, V9State(), CLOCK, True, templates={4: golden_template_6_2()})
    assert packets == [GOLDEN_6_2]
    assert state == V9State(sequence=1, source_id=0)


def test_reduced_counters_saturate_instead_of_wrapping() -> None:
    batch = make_batch(FLOW_V4 | {"bytes": 2**32 + 5, "packets": 7})
    [packet], _ = v9.encode(batch, V9State(), CLOCK, False, templates={4: golden_template_6_2()})
    assert packet[20 + 4 + 13 : 20 + 4 + 21] == bytes.fromhex("ffffffff" "00000007")


def test_standard_templates() -> None:
    """The IPFIX default layouts with FIRST/LAST_SWITCHED and systemInitTimeMilliseconds for 152/153."""
    v4, v6 = V9_TEMPLATES[4], V9_TEMPLATES[6]
    assert (v4.template_id, v6.template_id) == (256, 257)
    types = [(ie.v9_type, length) for ie, length in v4.fields]
    assert types[:4] == [(60, 1), (22, 4), (21, 4), (160, 8)]
    assert [t for t, _ in types[4:]] == IPV4_IES[3:]
    assert [ie.v9_type for ie, _ in v6.fields[4:]] == IPV6_IES[3:]
    assert (v4.record_length, v6.record_length) == (V4_RECORD, V6_RECORD)  # 22+21+160 take 152+153's 16 bytes


TEMPLATE_FLOWSET = 4 + 2 * (4 + 4 * 42)  # both default templates have 42 fields
V4_DATA = 4 + V4_RECORD + 3  # a data flowset of one IPv4 record, padded to 4 bytes
V6_DATA = 4 + V6_RECORD  # already 4-byte aligned


# --------------------------------------------------------------------------
# Header, sequence, padding, times.
# --------------------------------------------------------------------------


def test_mixed_batch_in_one_packet_templates_first_v4_then_v6() -> None:
    packets, state = v9.encode(make_batch(FLOW_V6, FLOW_V4), V9State(41, 7), CLOCK, True)
    [parsed] = parse_all(packets)
    assert parsed.flowset_ids == [0, 256, 257]
    assert (parsed.count, parsed.records) == (4, 4)  # 2 templates + 2 data records
    assert (parsed.sys_uptime, parsed.unix_secs, parsed.sequence, parsed.source_id) == (3_600_000, EXPORT_S, 41, 7)
    assert len(packets[0]) == 20 + TEMPLATE_FLOWSET + V4_DATA + V6_DATA
    assert rows_to_batch(parsed.rows).tolist() == on_the_wire(make_batch(FLOW_V4, FLOW_V6)).tolist()
    assert system_init_ms(parsed.rows) == {CLOCK.boot_unix_ms}
    assert state == V9State(42, 7)


def test_sequence_counts_packets_including_template_only_ones() -> None:
    max_size = 20 + TEMPLATE_FLOWSET  # the template flowset fills the first packet alone; then 2 records per packet
    packets, state = v9.encode(make_batch(*[FLOW_V4] * 7), V9State(), CLOCK, True, max_size)
    parsed = parse_all(packets)
    assert [p.flowset_ids for p in parsed] == [[0], [256], [256], [256], [256]]
    assert [(p.sequence, p.count, len(p.rows)) for p in parsed] == [(0, 2, 0), (1, 2, 2), (2, 2, 2), (3, 2, 2),
                                                                    (4, 1, 1)]  # fmt: skip
    two = 4 + 2 * V4_RECORD + 2  # 246 bytes, padded to 248
    assert [len(p) for p in packets] == [max_size, 20 + two, 20 + two, 20 + two, 20 + V4_DATA]
    assert state.sequence == 5


def test_sequence_and_uptime_wrap_mod_2_32() -> None:
    late = ExportClock(unix_ns=EXPORT_S * 10**9, uptime_ms=U32 + 5_000)  # 49.7 days + 5 s after start
    batch = make_batch(FLOW_V4 | {"start_ms": EXPORT_S * 1000 - 8_000, "end_ms": EXPORT_S * 1000 - 1_000})
    packets, state = v9.encode(batch, V9State(U32 - 1), late, True)
    [parsed] = parse_all(packets)
    assert (parsed.sequence, parsed.sys_uptime, state.sequence) == (U32 - 1, 5_000, 0)  # sysUptime wrapped too
    raw_start, raw_end = struct.unpack_from("!II", packets[0], 20 + TEMPLATE_FLOWSET + 4 + 1)  # after ipVersion
    assert (raw_start, raw_end) == (U32 - 3_000, 4_000)  # started before the wrap, ended after it
    assert (parsed.rows[0]["start_ms"], parsed.rows[0]["end_ms"]) == (EXPORT_S * 1000 - 8_000, EXPORT_S * 1000 - 1_000)


def test_datagram_carries_sub_second_export_time_within_one_second() -> None:
    """The header has whole seconds only: a collector's absolute times are off by < 1 s."""
    clock = ExportClock(unix_ns=EXPORT_S * 10**9 + 999_000_000, uptime_ms=3_600_000)
    [parsed] = parse_all(v9.encode(make_batch(FLOW_V4), V9State(), clock, True)[0])
    assert 0 <= int(FLOW_V4["start_ms"]) - int(parsed.rows[0]["start_ms"]) < 1000


def test_no_records_no_templates_no_packet() -> None:
    assert v9.encode(empty(0), V9State(3), CLOCK, False) == ([], V9State(3))
    packets, state = v9.encode(empty(0), V9State(3), CLOCK, True)
    [parsed] = parse_all(packets)
    assert (parsed.flowset_ids, parsed.count, parsed.sequence, state.sequence) == ([0], 2, 3, 4)


@pytest.mark.parametrize(("max_size", "send_templates"),
                         [(20 + V6_DATA - 1, False), (20 + TEMPLATE_FLOWSET - 1, True), (65536, False)])
def test_max_size_out_of_range(max_size: int, send_templates: bool) -> None:
    # 20 header + one IPv6 data flowset (4 + 184) = 208; the template flowset needs 20 + 348.
    with pytest.raises(ValueError, match="max_size"):
        v9.encode(make_batch(FLOW_V4), V9State(), CLOCK, send_templates, max_size)


def test_rejects_unknown_ip_version() -> None:
    with pytest.raises(ValueError, match=r"no template for ip_version \[5\]"):
        v9.encode(make_batch(FLOW_V4 | {"ip_version": 5}), V9State(), CLOCK, False)


# --------------------------------------------------------------------------
# Options: interface names and sampling, before flow data, only with templates.
# --------------------------------------------------------------------------

CTX = ExportContext(sampling=Sampling(10), interfaces=((2, "eth0"), (3, "wlan0")))


def test_options_follow_templates_and_precede_flow_data() -> None:
    packets, state = v9.encode(make_batch(FLOW_V4, FLOW_V6), V9State(0, 9), CLOCK, True, ctx=CTX)
    [parsed] = parse_all(packets)
    assert parsed.flowset_ids == [0, 1, 1, 260, 261, 256, 257]
    assert parsed.count == parsed.records == 2 + 2 + 2 + 1 + 2
    assert parsed.options == {260: [[2, 2, b"eth0"], [3, 3, b"wlan0"]], 261: [[9, 10]]}
    later, _ = v9.encode(make_batch(FLOW_V4), state, LATER, False, ctx=CTX)
    assert parse_all(packets + later)[1].flowset_ids == [256]


def test_many_interfaces_spread_over_several_packets_in_order() -> None:
    ctx = ExportContext(interfaces=tuple((i, f"veth{i}") for i in range(1, 101)))
    packets, _ = v9.encode(make_batch(FLOW_V4), V9State(), CLOCK, True, 600, ctx)
    parsed = parse_all(packets)
    assert all(len(p) <= 600 for p in packets)
    names = [row[2] for p in parsed for row in p.options.get(260, [])]  # scope ifindex, ifindex, name
    assert names == [f"veth{i}".encode() for i in range(1, 101)]
    flat = [fs for p in parsed for fs in p.flowset_ids]
    assert flat.index(256) > max(i for i, fs in enumerate(flat) if fs == 260)
    assert [p.sequence for p in parsed] == list(range(len(packets)))
    assert all(p.count == p.records for p in parsed)


# --------------------------------------------------------------------------
# scapy decodes our packets to the exact values.
# --------------------------------------------------------------------------


def test_scapy_decodes_exact_values() -> None:
    """Options included: scapy's v9 options dissector copes (its IPFIX one does not, see test_options)."""
    packets, _ = v9.encode(make_batch(FLOW_V6, FLOW_V4), V9State(9, 1), CLOCK, True, ctx=CTX)
    [packet] = netflowv9_defragment([NetflowHeader(p) for p in packets], verb=0)
    header = packet[NetflowHeaderV9]
    assert (packet.version, header.count, header.sysUptime, header.unixSecs, header.packageSequence,
            header.SourceID) == (9, 9, 3_600_000, EXPORT_S, 9, 1)  # fmt: skip
    templates = {t.templateID: [(f.fieldType, f.fieldLength) for f in t.template_fields] for t in packet.templates}
    assert templates == {t.template_id: [(ie.v9_type, n) for ie, n in t.fields] for t in V9_TEMPLATES.values()}
    options = [packet[NetflowOptionsFlowsetV9:i] for i in (1, 2)]
    assert [(o.templateID, [(s.scopeFieldType, s.scopeFieldlength) for s in o.scopes],
             [(f.optionFieldType, f.optionFieldlength) for f in o.options]) for o in options] == [
        (260, [(2, 4)], [(10, 4), (83, 32)]), (261, [(1, 4)], [(34, 4)])]  # fmt: skip
    flowsets = {}
    layer = packet.getlayer(NetflowDataflowsetV9)
    while layer is not None:
        flowsets[layer.templateID] = layer
        layer = layer.payload.getlayer(NetflowDataflowsetV9)
    assert sorted(flowsets) == [256, 257, 260, 261]
    for flowset, flow in ((flowsets[256], FLOW_V4), (flowsets[257], FLOW_V6)):
        [record] = flowset.records
        family = "IPV4" if flow["ip_version"] == 4 else "IPV6"
        assert (record.getfieldval(f"{family}_SRC_ADDR"), record.getfieldval(f"{family}_DST_ADDR")) == (
            flow["src_addr"], flow["dst_addr"]
        )
        decoded = (record.IN_BYTES, record.IN_PKTS, record.INPUT_SNMP, record.OUTPUT_SNMP, record.L4_SRC_PORT,
                   record.L4_DST_PORT)  # fmt: skip
        assert decoded == tuple(flow[k] for k in ("bytes", "packets", "ifindex", "egress_ifindex", "src_port",
                                                  "dst_port"))  # fmt: skip
        # scapy shows FIRST/LAST_SWITCHED as uptime seconds; back to absolute ms by the header:
        for name, column in (("FIRST_SWITCHED", "start_ms"), ("LAST_SWITCHED", "end_ms")):
            uptime_ms = record.getfieldval(name)  # the raw field: ms (scapy only *shows* it as seconds)
            assert header.unixSecs * 1000 - (header.sysUptime - uptime_ms) % U32 == flow[column]


# --------------------------------------------------------------------------
# Property: anything encodes into bounded packets that decode to the input.
# --------------------------------------------------------------------------


@st.composite
def record_batches(draw: st.DrawFn, export_ms: int) -> np.ndarray:
    """test_ipfix's batches (every column random / zero / maximum) with times that lie
    within the 2^32 ms before ``export_ms`` (what v9 uptimes can express), less a second
    so a packet sent one second later still reaches back to them."""
    batch = draw(ipfix_record_batches())
    n = len(batch)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    oldest = U32 - 1 - 1000
    for name in ("start_ms", "end_ms"):
        age = {"random": rng.integers(0, oldest, n, endpoint=True), "zero": np.zeros(n, np.int64),
               "max": np.full(n, oldest)}  # fmt: skip
        batch[name] = export_ms - age[draw(st.sampled_from(sorted(age)))]
    return batch


@given(
    data=st.data(),
    uptime_ms=st.integers(0, 2**40),
    split=st.floats(0, 1),
    max_size=st.integers(20 + TEMPLATE_FLOWSET, 9000),
    sequence=st.integers(0, U32 - 1),
    source_id=st.integers(0, U32 - 1),
)
@settings(max_examples=200, deadline=None)
def test_any_batch_round_trips(
    data: st.DataObject, uptime_ms: int, split: float, max_size: int, sequence: int, source_id: int
) -> None:
    clock = ExportClock(unix_ns=EXPORT_S * 10**9, uptime_ms=uptime_ms)
    later = ExportClock(unix_ns=(EXPORT_S + 1) * 10**9, uptime_ms=uptime_ms + 1000)
    batch = data.draw(record_batches(EXPORT_S * 1000))
    k = int(len(batch) * split)
    first, second = batch[:k], batch[k:]
    packets1, state1 = v9.encode(first, V9State(sequence, source_id), clock, True, max_size)
    packets2, state2 = v9.encode(second, state1, later, False, max_size)
    parsed = parse_all(packets1 + packets2)

    assert all(len(p) <= max_size for p in packets1 + packets2)
    assert parsed[0].flowset_ids[0] == 0
    assert all(0 not in p.flowset_ids for p in parsed[1:])
    assert all(p.count == p.records > 0 for p in parsed)
    assert [p.sequence for p in parsed] == [(sequence + i) % U32 for i in range(len(parsed))]
    assert {p.source_id for p in parsed} == {source_id}
    assert [p.sys_uptime for p in parsed] == [uptime_ms % U32] * len(packets1) + [(uptime_ms + 1000) % U32] * len(
        packets2
    )
    assert state1 == V9State((sequence + len(packets1)) % U32, source_id)
    assert state2 == V9State((sequence + len(parsed)) % U32, source_id)

    rows = [row for p in parsed for row in p.rows]
    assert rows_to_batch(rows).tolist() == np.concatenate([on_the_wire(first), on_the_wire(second)]).tolist()
    assert system_init_ms(rows) <= {clock.boot_unix_ms, later.boot_unix_ms}


# --------------------------------------------------------------------------
# tshark decodes a pcap of our packets without complaint, options included.
# --------------------------------------------------------------------------


def fields(packet: ET.Element, name: str) -> list[str]:
    return [f.get("show", "") for f in packet.iter("field") if f.get("name") == name]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed (apt-get install tshark)")
def test_tshark_decodes_values_and_options(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    flows = [
        (FLOW_V4 if i % 3 else FLOW_V6)
        | {"src_port": int(rng.integers(1, 65536)), "packets": int(rng.integers(1, 2**40)),
           "bytes": int(rng.integers(1, 2**50))}
        for i in range(40)
    ]  # fmt: skip
    batch = make_batch(*flows)
    packets1, state = v9.encode(batch[:25], V9State(100, 5), CLOCK, True, 700, CTX)
    packets2, _ = v9.encode(batch[25:], state, LATER, False, 700, CTX)
    packets = packets1 + packets2
    decoded = tshark_pdml(tmp_path, packets)

    assert len(decoded) == len(packets)
    assert [c for p in decoded for c in tshark_complaints(p)] == []
    assert [int(fields(p, "cflow.sequence")[0]) for p in decoded] == list(range(100, 100 + len(packets)))
    assert [int(fields(p, "cflow.count")[0]) for p in decoded] == [p.count for p in parse_all(packets)]
    everything = [f for p in decoded for f in p.iter("field")]
    shown = {name: [f.get("show") for f in everything if f.get("name") == name]
             for name in ("cflow.if_descr", "cflow.scope_interface", "cflow.scope_system", "cflow.sampling_interval")}
    assert shown == {"cflow.if_descr": ["eth0", "wlan0"], "cflow.scope_interface": ["2", "3"],
                     "cflow.scope_system": ["00:00:00:05"], "cflow.sampling_interval": ["10"]}  # fmt: skip
    octets = [int(f.get("show", "")) for f in everything if f.get("name") == "cflow.octets"]
    assert octets == [int(b) for b in np.concatenate([by_version(batch[:25]), by_version(batch[25:])])["bytes"]]
    boot_ms = CLOCK.boot_unix_ms
    starts = [round(float(f.get("show", "")) * 1000) for f in everything if f.get("name") == "cflow.timestart"]
    assert starts == [(int(r["start_ms"]) - boot_ms) % U32 for r in np.concatenate(
        [by_version(batch[:25]), by_version(batch[25:])])]  # fmt: skip


# --------------------------------------------------------------------------
# Through the registry and a Target: the VersionEncoder protocol.
# --------------------------------------------------------------------------


def test_registry_v9_encoder_through_a_target() -> None:
    encoder = encoder_for("9")
    assert (encoder.name, encoder.uses_templates, encoder.carries_ipv6) == ("9", True, True)
    target = Target(TargetSettings("127.0.0.1", 9, "9"), encoder, observation_domain=4, ctx=CTX)
    packets, state = encoder.encode(make_batch(FLOW_V4), target.state, CLOCK, True, 1472, CTX)
    assert state == V9State(1, 4)
    assert parse_all(packets)[0].flowset_ids == [0, 1, 1, 260, 261, 256]


# --------------------------------------------------------------------------
# A real nfcapd 1.7.1 stores what we meant.
# --------------------------------------------------------------------------


@requires_nfdump
def test_nfcapd_stores_exact_flows_sampling_and_interface_names(tmp_path: Path) -> None:
    now_ns = time.time_ns()
    clock = ExportClock(unix_ns=now_ns, uptime_ms=123_456_789)
    now_ms = now_ns // 10**6
    flows = [FLOW_V4 | {"src_port": 1000 + i, "ifindex": 2 + i % 2, "packets": 3 + i, "bytes": 300 + i,
                        "start_ms": now_ms - 60_000 + i, "end_ms": now_ms - 1_000 - i} for i in range(40)]  # fmt: skip
    flows.append(FLOW_V6 | {"packets": 5, "bytes": 500, "start_ms": now_ms - 30_000, "end_ms": now_ms - 20_000})
    batch = make_batch(*flows)
    ctx = ExportContext(sampling=Sampling(10), interfaces=((2, "eth0"), (3, "wlan0")))
    packets, state = v9.encode(batch[:20], V9State(0, 3), clock, True, 1472, ctx)
    for chunk in (batch[20:30], batch[30:]):  # later sweeps, no template refresh
        more, state = v9.encode(chunk, state, clock, False, 1472, ctx)
        packets += more

    got = collect(packets, tmp_path)

    assert "Sequence Errors: 0, Bad Packets: 0" in got.log
    assert f"Flows: {len(flows)}," in got.log
    assert len(got.flows) == len(flows)
    rows = {int(row["sp"]): row for row in got.flows}
    raws = {int(raw["src port"]): raw for raw in got.raw_records()}
    for flow in flows:
        row, raw = rows[int(flow["src_port"])], raws[int(flow["src_port"])]
        assert (row["sa"], row["da"], int(row["dp"]), int(row["in"])) == (
            flow["src_addr"], flow["dst_addr"], flow["dst_port"], flow["ifindex"]
        )
        # nfdump scales by the announced 1-in-10 sampling
        assert (int(row["ipkt"]), int(row["ibyt"])) == (10 * int(flow["packets"]), 10 * int(flow["bytes"]))
        # the header's UNIX Secs has whole seconds: < 1 s off
        assert 0 <= int(flow["start_ms"]) - int(raw["first"].split()[0]) < 1000
        assert 0 <= int(flow["end_ms"]) - int(raw["last"].split()[0]) < 1000
        assert raw["input"] == {2: "2 eth0", 3: "3 wlan0"}[int(flow["ifindex"])]
