"""pyflow collect's decoder (pyflow/collect.py): pyflow's own encoders' output, RouterOS's, hand-made
corner cases (variable-length fields, enterprise elements, padding, data before template, truncation),
and properties: any batch the encoders take decodes back to its values; no input makes it raise.
"""

from __future__ import annotations

import copy
import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pyflow.collect import (
    MAX_HELD_SETS,
    Record,
    TemplateCache,
    decode,
    format_record,
    record_json,
)
from pyflow.export import ipfix, legacy, v9
from pyflow.export.context import ExportClock, ExportContext, Sampling
from pyflow.export.ie import BY_NAME
from pyflow.export.ipfix import IpfixState
from pyflow.export.legacy import V5State
from pyflow.export.registry import encoder_for
from pyflow.export.v9 import V9State
from pyflow.records import RECORD_DTYPE, V4_MAPPED_PREFIX, addr_to_16, empty
from tests.unit.test_ipfix import CLOCK, FLOW_V4, FLOW_V6, make_batch, on_the_wire
from tests.unit.test_ipfix import record_batches as ipfix_record_batches
from tests.unit.test_legacy import ROUTEROS_CLOCK, ROUTEROS_FIRST_RECORD, ROUTEROS_HEADER
from tests.unit.test_v9 import EXPORT_S
from tests.unit.test_v9 import record_batches as v9_record_batches

EXPORTER = ("192.0.2.9", 40000)
CTX = ExportContext(sampling=Sampling(10), interfaces=((3, "eth0"), (7, "wlan0")))
MAC_COLUMNS = ("src_mac", "dst_mac")


def decode_all(datagrams: list[bytes], cache: TemplateCache | None = None,
               exporter: tuple[str, int] = EXPORTER) -> tuple[list[Record], list[str]]:
    cache = TemplateCache() if cache is None else cache
    records: list[Record] = []
    problems: list[str] = []
    for d in datagrams:
        out = decode(d, exporter, cache)
        records += out.records
        problems += out.problems
    return records, problems


def flows(records: list[Record]) -> list[Record]:
    return [r for r in records if not r.options]


def to_batch(records: list[Record]) -> np.ndarray:
    """Decoded flow records as a record batch: each IANA name to the column pyflow fills it from,
    start/end from the decoder's absolute times.  Columns no field gives stay zero."""
    batch = empty(len(records))
    for i, r in enumerate(records):
        for name, value in r.fields:
            ie = BY_NAME.get(name)
            if ie is None or ie.column not in (RECORD_DTYPE.names or ()):
                continue  # derived: flowStart/EndSysUpTime, systemInitTimeMilliseconds
            if RECORD_DTYPE[ie.column].kind == "V":
                assert isinstance(value, str)
                raw = bytes.fromhex(value.replace(":", "")) if ie.column in MAC_COLUMNS else addr_to_16(value)
                batch[ie.column][i] = raw
            else:
                batch[ie.column][i] = value
        batch["start_ms"][i] = r.start_ms
        batch["end_ms"][i] = r.end_ms
    return batch


# --------------------------------------------------------------------------
# pyflow's encoders, all four versions
# --------------------------------------------------------------------------


def test_ipfix_templates_options_and_data() -> None:
    enc = encoder_for("ipfix")
    messages, _ = enc.encode(make_batch(FLOW_V4, FLOW_V6), enc.initial_state(42), CLOCK, True, 1472, CTX)
    records, problems = decode_all(messages)
    assert problems == []
    options = [r for r in records if r.options]
    assert [(r.template_id, dict(r.fields[r.scope_count:]).get("interfaceDescription")) for r in options] == [
        (260, "eth0"), (260, "wlan0"), (261, None)]
    assert dict(options[2].fields)["samplingInterval"] == 10
    assert dict(options[2].fields[:1]) == {"observationDomainId": 42}
    v4, v6 = flows(records)
    assert (v4.version, v4.template_id, v4.domain, v4.exporter) == (10, 256, 42, "192.0.2.9:40000")
    assert (v4.src, v4.dst, v4.sport, v4.dport, v4.proto, v4.packets, v4.bytes) == (
        "192.0.2.1", "198.51.100.2", 49152, 443, 6, 10, 1500)
    assert (v4.start_ms, v4.end_ms) == (FLOW_V4["start_ms"], FLOW_V4["end_ms"])
    assert v4.get("sourceMacAddress") == "02:00:5e:10:00:01" and v4.get("bgpDestinationAsNumber") == 4_200_000_001
    assert (v6.src, v6.dst, v6.packets, v6.bytes, v6.get("egressInterface")) == (
        "2001:db8::1", "ff02::fb", 2**33 + 1, 2**40 + 7, 4_000_000_000)
    assert to_batch([v4, v6]).tolist() == on_the_wire(make_batch(FLOW_V4, FLOW_V6)).tolist()


def test_ipfix_routeros_time_uses_160() -> None:
    ctx = ExportContext(time_mode="routeros")
    messages, _ = ipfix.encode(make_batch(FLOW_V4), IpfixState(), CLOCK, True, ctx=ctx)
    records, problems = decode_all(messages)
    [r] = flows(records)
    assert problems == [] and r.template_id == 258
    assert r.get("flowStartSysUpTime") is not None and r.get("flowStartMilliseconds") is None
    assert (r.start_ms, r.end_ms) == (FLOW_V4["start_ms"], FLOW_V4["end_ms"])


def test_v9_templates_options_padding_and_data() -> None:
    enc = encoder_for("9")
    messages, _ = enc.encode(make_batch(FLOW_V4, FLOW_V6, FLOW_V4), enc.initial_state(7), CLOCK, True, 1472, CTX)
    assert any(len(m) % 4 == 0 for m in messages)  # flowsets padded to 4 bytes
    records, problems = decode_all(messages)
    assert problems == []
    options = [r for r in records if r.options]
    assert [r.fields[0] for r in options] == [("scopeInterface", 3), ("scopeInterface", 7), ("scopeSystem", 7)]
    got = flows(records)
    assert [r.version for r in got] == [9, 9, 9] and {r.domain for r in got} == {7}
    # times from systemInitTimeMilliseconds (160): exact to the ms, although the header has whole seconds
    assert [(r.start_ms, r.end_ms) for r in got] == [(f["start_ms"], f["end_ms"]) for f in (FLOW_V4, FLOW_V4, FLOW_V6)]
    assert to_batch(got).tolist() == on_the_wire(make_batch(FLOW_V4, FLOW_V4, FLOW_V6)).tolist()


def test_v5_and_v1() -> None:
    batch = make_batch(FLOW_V4, FLOW_V4 | {"src_port": 1, "packets": 3, "bytes": 99})
    datagrams, _ = legacy.encode_v5(batch, V5State(), CLOCK, engine_type=1, engine_id=2)
    [d] = datagrams
    for version, data in ((5, d), (1, legacy.encode_v1(batch, CLOCK)[0])):
        records, problems = decode_all([data])
        assert problems == []
        assert [(r.version, r.src, r.dst, r.sport, r.dport, r.proto, r.packets, r.bytes) for r in records] == [
            (version, "192.0.2.1", "198.51.100.2", 49152, 443, 6, 10, 1500),
            (version, "192.0.2.1", "198.51.100.2", 1, 443, 6, 3, 99)]
        r = records[0]
        assert (r.start_ms, r.end_ms) == (FLOW_V4["start_ms"], FLOW_V4["end_ms"])
        assert (r.get("ingressInterface"), r.get("egressInterface"), r.get("ipNextHopIPv4Address")) == (
            3, 7, "192.0.2.254")
        assert r.get("tcpControlBits") == 0x1B and r.get("ipClassOfService") == 0x28
        if version == 5:
            assert r.domain == 1 << 8 | 2
            assert (r.get("bgpSourceAsNumber"), r.get("bgpDestinationAsNumber")) == (64_500, 23_456)  # AS_TRANS
            assert (r.get("sourceIPv4PrefixLength"), r.get("destinationIPv4PrefixLength")) == (24, 22)
        else:
            assert r.get("bgpSourceAsNumber") is None


def test_routeros_v5_datagram() -> None:
    """flow-protocols.md §5.4: RouterOS's header and first record.  The header says 30 records:
    with only the first one it is reported as truncated, and that record is still decoded."""
    records, problems = decode_all([ROUTEROS_HEADER + ROUTEROS_FIRST_RECORD])
    assert len(problems) == 1 and "truncated v5 datagram: the header says 30 records (1464 bytes)" in problems[0]
    [r] = records
    assert (r.src, r.dst, r.sport, r.dport, r.proto, r.packets, r.bytes) == (
        "10.0.13.1", "192.168.0.98", 5228, 52734, 6, 2, 104)
    assert (r.get("ingressInterface"), r.get("egressInterface"), r.get("tcpControlBits")) == (13, 50, 0x10)
    # First = Last = 27346270, sysUptime 27361640 at 1469109117.514932 s: 15.37 s before the export
    assert r.export_ms == 1_469_109_117_514
    assert r.start_ms == r.end_ms == 1_469_109_117_514 - 15_370 == ROUTEROS_CLOCK.boot_unix_ms + 27_346_270
    line = format_record(r)
    assert " v5 10.0.13.1:5228 -> 192.168.0.98:52734 tcp packets=2 bytes=104 " in line
    full = ROUTEROS_HEADER + ROUTEROS_FIRST_RECORD * 30
    records, problems = decode_all([full])
    assert problems == [] and len(records) == 30


def test_routeros_6_39_ipfix_reduced_size_and_nonzero_padding() -> None:
    """flow-protocols.md §5.2: template 259 (IPv6) with 4-byte counters, no 160, and a data set
    ending in two non-zero bytes (0x6b 0xab), which RFC 7011 lets a collector take as padding."""
    ids = [(60, 1), (22, 4), (21, 4), (2, 4), (1, 4), (7, 2), (11, 2), (10, 4), (14, 4), (4, 1), (6, 1),
           (27, 16), (28, 16), (62, 16)]
    template_set = struct.pack("!HHHH", 2, 8 + 4 * len(ids), 259, len(ids)) + b"".join(
        struct.pack("!HH", i, n) for i, n in ids)
    rec = (struct.pack("!BIIIIHHIIBB", 6, 1000, 2000, 3, 4000, 5353, 53, 2, 5, 17, 0)
           + addr_to_16("2001:db8::1") + addr_to_16("2001:db8::2") + addr_to_16("ff02::1"))
    assert len(rec) == 79
    data_set = struct.pack("!HH", 259, 4 + 2 * 79 + 2) + rec * 2 + b"\x6b\xab"
    body = template_set + data_set
    message = struct.pack("!HHIII", 10, 16 + len(body), 1_500_481_084, 3891, 0) + body
    records, problems = decode_all([message])
    assert problems == []
    assert [(r.src, r.dst, r.sport, r.dport, r.proto, r.packets, r.bytes) for r in records] == [
        ("2001:db8::1", "2001:db8::2", 5353, 53, 17, 3, 4000)] * 2
    # 21/22 without 160 say nothing absolute: the record's time is the export time
    assert records[0].end_ms is None and records[0].time_ms == 1_500_481_084_000


def test_ipfix_variable_length_enterprise_and_padding() -> None:
    specs = (struct.pack("!HH", 8, 4) + struct.pack("!HH", 82, 0xFFFF)
             + struct.pack("!HHI", 0x8000 | 1, 4, 14988) + struct.pack("!HHI", 0x8000 | 2, 8, 29305)
             + struct.pack("!HH", 2, 8))
    template_set = struct.pack("!HHHH", 2, 8 + len(specs), 300, 5) + specs
    long_name = "x" * 300
    rec1 = b"\x0a\x00\x00\x01" + b"\x04eth0" + struct.pack("!IQQ", 77, 5, 11)
    rec2 = b"\x0a\x00\x00\x02" + b"\xff" + struct.pack("!H", 300) + long_name.encode() + struct.pack("!IQQ", 78, 6, 12)
    data_set = struct.pack("!HH", 300, 4 + len(rec1) + len(rec2) + 3) + rec1 + rec2 + b"\x01\x02\x03"
    body = template_set + data_set
    message = struct.pack("!HHIII", 10, 16 + len(body), 1_700_000_000, 0, 5) + body
    out = decode(message, EXPORTER, TemplateCache())
    assert out.problems == []
    [template] = out.templates
    assert template.describe() == ("template 300: sourceIPv4Address(4) interfaceName(var) pen14988.ie1(4) "
                                   "reversePacketDeltaCount(8) packetDeltaCount(8)")
    assert [r.fields for r in out.records] == [
        (("sourceIPv4Address", "10.0.0.1"), ("interfaceName", "eth0"), ("pen14988.ie1", 77),
         ("reversePacketDeltaCount", 5), ("packetDeltaCount", 11)),
        (("sourceIPv4Address", "10.0.0.2"), ("interfaceName", long_name), ("pen14988.ie1", 78),
         ("reversePacketDeltaCount", 6), ("packetDeltaCount", 12)),
    ]
    assert record_json(out.records[0])["fields"]["interfaceName"] == "eth0"


# --------------------------------------------------------------------------
# Data before template, per-exporter templates, bad input
# --------------------------------------------------------------------------


def test_ipfix_data_before_template_is_held_then_decoded() -> None:
    templates, state = ipfix.encode(empty(0), IpfixState(0, 9), CLOCK, True)
    data, _ = ipfix.encode(make_batch(FLOW_V4, FLOW_V6), state, CLOCK, False)
    cache = TemplateCache()
    first = decode(data[0], EXPORTER, cache)
    assert first.records == []
    assert [p for p in first.problems if "data before its template" in p and "held" in p] and len(first.problems) == 2
    second = decode(templates[0], EXPORTER, cache)
    assert second.problems == []
    assert [(r.src, r.packets) for r in second.records] == [("192.0.2.1", 10), ("2001:db8::1", 2**33 + 1)]
    assert cache.held_sets() == 0


def test_v9_data_before_template_is_held_then_decoded() -> None:
    templates, state = v9.encode(empty(0), V9State(0, 3), CLOCK, True)
    data, _ = v9.encode(make_batch(FLOW_V4), state, CLOCK, False)
    cache = TemplateCache()
    first = decode(data[0], EXPORTER, cache)
    assert first.records == [] and len(first.problems) == 1 and "held" in first.problems[0]
    second = decode(templates[0], EXPORTER, cache)
    assert second.problems == [] and [r.bytes for r in second.records] == [1500]


def test_held_data_is_bounded() -> None:
    _, state = ipfix.encode(empty(0), IpfixState(), CLOCK, True)
    data, _ = ipfix.encode(make_batch(FLOW_V4), state, CLOCK, False)
    cache = TemplateCache()
    _, problems = decode_all(data * (MAX_HELD_SETS + 3), cache)
    assert cache.held_sets() == MAX_HELD_SETS
    assert sum("dropped a held data set of template 256" in p for p in problems) == 3


def test_templates_are_per_exporter_and_domain() -> None:
    """The same template id means different layouts from two exporters, and from two domains of one."""
    def message(domain: int, ie: int, length: int, value: bytes) -> bytes:
        body = struct.pack("!HHHHHH", 2, 12, 256, 1, ie, length) + struct.pack("!HH", 256, 4 + length) + value
        return struct.pack("!HHIII", 10, 16 + len(body), 1_700_000_000, 0, domain) + body

    cache = TemplateCache()
    a = decode(message(0, 2, 4, b"\0\0\0\x05"), ("10.0.0.1", 1), cache)
    b = decode(message(0, 1, 2, b"\0\x07"), ("10.0.0.2", 1), cache)
    c = decode(message(1, 4, 1, b"\x11"), ("10.0.0.1", 1), cache)
    again = decode(message(0, 2, 4, b"\0\0\0\x09")[:-8] + struct.pack("!HH", 256, 8) + b"\0\0\0\x09",
                   ("10.0.0.1", 2), cache)  # another source port of exporter 10.0.0.1: same stream
    assert [r.fields for d in (a, b, c, again) for r in d.records] == [
        (("packetDeltaCount", 5),), (("octetDeltaCount", 7),), (("protocolIdentifier", 17),),
        (("packetDeltaCount", 9),)]


def test_bad_datagrams_are_reported() -> None:
    messages, _ = ipfix.encode(make_batch(FLOW_V4), IpfixState(), CLOCK, True)
    v9_packets, _ = v9.encode(make_batch(FLOW_V4), V9State(), CLOCK, True)
    cases = {
        b"": "too short",
        b"\x00\x07" + b"\0" * 40: "unknown version 7",
        b"\x00\x0a\x00": "IPFIX header needs 16 bytes",
        messages[0][:100]: "truncated IPFIX message",
        v9_packets[0][:-30]: "runs past the end",
        b"\x00\x05\x00\x01" + b"\0" * 20: "truncated v5 datagram",
        struct.pack("!HHIII", 10, 20, 0, 0, 0) + struct.pack("!HH", 2, 2): "shorter than a set header",
        struct.pack("!HHIII", 10, 20, 0, 0, 0) + struct.pack("!HH", 2, 4): "",  # an empty template set: fine
        struct.pack("!HHIII", 10, 24, 0, 0, 0) + struct.pack("!HHHH", 2, 8, 300, 0): "template withdrawal",
        struct.pack("!HHIII", 10, 30, 0, 0, 0) + struct.pack("!HHHHHHH", 3, 14, 300, 1, 0, 4, 4): "scope field count 0",
        struct.pack("!HHIII", 10, 24, 0, 0, 0) + struct.pack("!HHHH", 5, 8, 0, 0): "reserved set id",
    }
    for data, reason in cases.items():
        out = decode(data, EXPORTER, TemplateCache())
        assert out.records == []
        if reason:
            assert out.problems and reason in out.problems[0], (data, out.problems)
        else:
            assert out.problems == []


def test_format_and_json() -> None:
    messages, _ = ipfix.encode(make_batch(FLOW_V4 | {"protocol": 17, "src_port": 5000, "dst_port": 53}),
                               IpfixState(), CLOCK, True)
    records, _ = decode_all(messages)
    [r] = records
    line = format_record(r)
    head, _, rest = line.partition(" ipfix ")
    assert len(head) == len("2023-11-14 22:13:25.000")
    assert rest.startswith("192.0.2.1:5000 -> 198.51.100.2:53 udp packets=10 bytes=1500 ipVersion=4 ")
    assert " sourceMacAddress=02:00:5e:10:00:01 " in rest and rest.endswith(" template=256 exporter=192.0.2.9:40000")
    assert "flowEndMilliseconds=2023-11-14T" in rest
    j = record_json(r)
    assert (j["src"], j["sport"], j["proto"], j["packets"], j["bytes"], j["end_ms"]) == (
        "192.0.2.1", 5000, 17, 10, 1500, FLOW_V4["end_ms"])
    assert j["fields"]["tcpSequenceNumber"] == 0x1234_5678


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------


@given(batch=ipfix_record_batches(), max_size=st.integers(400, 9000), odid=st.integers(0, 2**32 - 1))
@settings(max_examples=100, deadline=None)
def test_any_batch_round_trips_ipfix(batch: np.ndarray, max_size: int, odid: int) -> None:
    messages, _ = ipfix.encode(batch, IpfixState(0, odid), CLOCK, True, max_size)
    records, problems = decode_all(messages)
    assert problems == []
    got = flows(records)
    assert {r.domain for r in got} <= {odid}
    assert to_batch(got).tolist() == on_the_wire(batch).tolist()


@given(data=st.data(), uptime_ms=st.integers(0, 2**40), max_size=st.integers(400, 9000))
@settings(max_examples=100, deadline=None)
def test_any_batch_round_trips_v9(data: st.DataObject, uptime_ms: int, max_size: int) -> None:
    clock = ExportClock(unix_ns=EXPORT_S * 10**9, uptime_ms=uptime_ms)
    batch = data.draw(v9_record_batches(EXPORT_S * 1000))
    packets, _ = v9.encode(batch, V9State(), clock, True, max_size, CTX)
    records, problems = decode_all(packets)
    assert problems == []
    assert to_batch(flows(records)).tolist() == on_the_wire(batch).tolist()


LEGACY_COLUMNS = ("src_addr", "dst_addr", "next_hop", "ifindex", "egress_ifindex", "packets", "bytes", "start_ms",
                  "end_ms", "src_port", "dst_port", "protocol", "tos", "tcp_flags")


@given(data=st.data(), uptime_ms=st.integers(0, 2**40), version=st.sampled_from([1, 5]))
@settings(max_examples=100, deadline=None)
def test_any_ipv4_batch_round_trips_v1_v5(data: st.DataObject, uptime_ms: int, version: int) -> None:
    clock = ExportClock(unix_ns=EXPORT_S * 10**9 + 123_456_789, uptime_ms=uptime_ms)
    batch = data.draw(v9_record_batches(EXPORT_S * 1000))
    batch["ip_version"] = 4
    for name in ("ifindex", "egress_ifindex", "src_as", "dst_as"):
        batch[name] %= 1 << 16  # what 16 bits carry (others: 0 and AS_TRANS, test_legacy)
    for name in ("packets", "bytes"):
        batch[name] %= 1 << 32  # no split (test_legacy)
    if version == 5:
        datagrams, _ = legacy.encode_v5(batch, V5State(), clock)
    else:
        datagrams = legacy.encode_v1(batch, clock)
    records, problems = decode_all(datagrams)
    assert problems == []
    expected = empty(len(batch))
    columns = LEGACY_COLUMNS + (("src_as", "dst_as", "src_mask", "dst_mask") if version == 5 else ())
    for name in columns:
        expected[name] = batch[name]
    for name in ("src_addr", "dst_addr", "next_hop"):  # the IPv4 part, v4-mapped
        expected[name] = [V4_MAPPED_PREFIX + bytes(a)[12:] for a in batch[name]]
    assert to_batch(records).tolist() == expected.tolist()


@st.composite
def valid_datagrams(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    """(what comes before, one datagram) of any version, from a small random batch."""
    batch = make_batch(*draw(st.lists(st.sampled_from([FLOW_V4, FLOW_V6]), min_size=1, max_size=12)))
    version = draw(st.sampled_from(["1", "5", "9", "ipfix"]))
    if version in ("1", "5"):
        batch = batch[batch["ip_version"] == 4]
        if not len(batch):
            batch = make_batch(FLOW_V4)
    enc = encoder_for(version)
    before, state = enc.encode(empty(0), enc.initial_state(1), CLOCK, True, 1472, CTX) if enc.uses_templates \
        else ([], enc.initial_state(1))
    datagrams, _ = enc.encode(batch, state, CLOCK, False, 1472, CTX)
    return before, datagrams[0]


@given(valid=valid_datagrams(), data=st.data())
@settings(max_examples=200, deadline=None)
def test_every_truncation_is_reported_never_raised(valid: tuple[list[bytes], bytes], data: st.DataObject) -> None:
    before, datagram = valid
    cache = TemplateCache()
    decode_all(before, cache)
    whole = decode(datagram, EXPORTER, copy.deepcopy(cache))
    assert whole.problems == [] and whole.records
    cut = data.draw(st.integers(0, len(datagram) - 1))
    out = decode(datagram[:cut], EXPORTER, copy.deepcopy(cache))
    assert out.problems, f"a {cut}-byte prefix of a {len(datagram)}-byte datagram decoded without complaint"
    assert len(out.records) < len(whole.records)


@given(st.binary(max_size=2000), st.sampled_from([b"", b"\x00\x01", b"\x00\x05", b"\x00\x09", b"\x00\x0a"]))
@settings(max_examples=300, deadline=None)
def test_garbage_never_raises(data: bytes, prefix: bytes) -> None:
    cache = TemplateCache()
    for _ in range(2):  # the second time with whatever templates the first one taught
        out = decode(prefix + data, EXPORTER, cache)
        assert isinstance(out.problems, list)
        for r in out.records:
            format_record(r)
            record_json(r)
