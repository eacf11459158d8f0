"""RouterOS's ``/ip traffic-flow ipfix`` toggles: the table, FieldSet, the templates built from it,
NAT events, and every field on the wire as tshark and nfdump decode it.

The expected IEs of each toggle are written out here from flow-protocols.md §4 (not taken
from ``pyflow.fields``), and the decoders are tshark, nfcapd/nfdump and this suite's own
struct-based parsers (test_ipfix, test_v9), which share no tables with ``pyflow.export``.
"""

from __future__ import annotations

import shutil
import socket
import time
import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyflow.cli import RUN_EPILOG, build_parser, settings_from_args
from pyflow.config import Settings, TargetSettings
from pyflow.errors import ConfigError
from pyflow.export import ipfix, v9
from pyflow.export.context import ExportClock, ExportContext
from pyflow.export.ipfix import IpfixState
from pyflow.export.registry import encoder_for
from pyflow.export.target import Target
from pyflow.export.templates import (
    FIRST_LAYOUT_TEMPLATE_ID,
    ExportTemplates,
    build_template,
    export_templates,
    layout_template_id,
)
from pyflow.export.v9 import V9State
from pyflow.fields import FIELDS, ROUTEROS_DEFAULTS, ROUTEROS_TOGGLES, TOGGLES, FieldSet, Kind, parse_fields
from pyflow.records import RECORD_DTYPE
from tests.unit import test_ipfix, test_v9
from tests.unit.nfcapd import collect, requires_nfdump
from tests.unit.test_ipfix import FLOW_V4, FLOW_V6, IE_COLUMNS, make_batch, tshark_complaints, tshark_pdml

# The 36 settings of RouterOS's /ip traffic-flow ipfix (flow-protocols.md §5.1).
ROUTEROS_NAMES = (
    "bytes", "dst-address", "dst-address-mask", "dst-mac-address", "dst-port", "first-forwarded", "gateway",
    "icmp-code", "icmp-type", "igmp-type", "in-interface", "ip-header-length", "ip-total-length",
    "ipv6-flow-label", "is-multicast", "last-forwarded", "nat-dst-address", "nat-dst-port", "nat-events",
    "nat-src-address", "nat-src-port", "out-interface", "packets", "protocol", "src-address",
    "src-address-mask", "src-mac-address", "src-port", "sys-init-time", "tcp-ack-num", "tcp-flags",
    "tcp-seq-num", "tcp-window-size", "tos", "ttl", "udp-length",
)  # fmt: skip

# toggle -> (IEs it adds to the IPv4 template, to the IPv6 template), from flow-protocols.md §4.
# The time toggles depend on the time mode: see TIME_IES.
EXPECTED_IES: dict[str, tuple[set[int], set[int]]] = {
    "bytes": ({1}, {1}), "packets": ({2}, {2}), "protocol": ({4}, {4}), "tos": ({5}, {5}),
    "tcp-flags": ({6}, {6}), "src-port": ({7}, {7}), "dst-port": ({11}, {11}),
    "src-address": ({8}, {27}), "dst-address": ({12}, {28}), "src-address-mask": ({9}, {29}),
    "dst-address-mask": ({13}, {30}), "in-interface": ({10}, {10}), "out-interface": ({14}, {14}),
    "gateway": ({15}, {62}), "src-mac-address": ({56}, {56}), "dst-mac-address": ({80}, {80}),
    "ttl": ({52, 53}, {52, 53}), "ip-total-length": ({25, 26}, {25, 26}), "ip-header-length": ({189}, {189}),
    "tcp-seq-num": ({184}, {184}), "tcp-ack-num": ({185}, {185}), "tcp-window-size": ({186}, {186}),
    "udp-length": ({205}, {205}), "icmp-type": ({176}, {178}), "icmp-code": ({177}, {179}),
    "igmp-type": ({33}, set()), "ipv6-flow-label": (set(), {31}), "is-multicast": ({206}, {206}),
    "nat-src-address": ({225}, {281}), "nat-dst-address": ({226}, {282}), "nat-src-port": ({227}, {227}),
    "nat-dst-port": ({228}, {228}), "nat-events": (set(), set()),
    "as": ({16, 17}, {16, 17}), "vlan-id": ({58}, {58}), "inner-vlan-id": ({245}, {245}),  # pyflow's own
}  # fmt: skip
TIME_IES: dict[str, dict[str, set[int]]] = {
    "absolute": {"first-forwarded": {152}, "last-forwarded": {153}, "sys-init-time": set()},
    "routeros": {"first-forwarded": {22}, "last-forwarded": {21}, "sys-init-time": {160}},
    "uptime": {"first-forwarded": {22}, "last-forwarded": {21}, "sys-init-time": {160}},
}
ALWAYS_IES = {60, 61, 136}  # ipVersion, flowDirection, flowEndReason
MODES = ("absolute", "routeros", "uptime")
NAT_EVENT_COLUMNS = ("start_ms", "nat_event", "protocol", "src_addr", "dst_addr", "src_port", "dst_port",
                     "nat_src_addr", "nat_dst_addr", "nat_src_port", "nat_dst_port")  # fmt: skip
EVERYTHING = FieldSet.parse("nat-events=yes")

EXPORT_S = 1_700_000_010
CLOCK = ExportClock(unix_ns=EXPORT_S * 10**9, uptime_ms=3_600_000)
BOOT_MS = CLOCK.boot_unix_ms
U32 = 1 << 32


def expected_ies(toggle: str, version: int, mode: str) -> set[int]:
    if toggle in TIME_IES[mode]:
        return TIME_IES[mode][toggle]
    return EXPECTED_IES[toggle][0 if version == 4 else 1]


def template_ies(fields: FieldSet, mode: str, version: int) -> list[int]:
    return [ie.ie_id for ie, _ in export_templates(fields, mode).flows[version].fields]


# --------------------------------------------------------------------------
# The table and FieldSet.
# --------------------------------------------------------------------------


def test_toggle_table_covers_exactly_the_routeros_names() -> None:
    assert tuple(sorted(ROUTEROS_NAMES)) == ROUTEROS_TOGGLES
    assert set(TOGGLES) == set(ROUTEROS_NAMES) | {"as", "vlan-id", "inner-vlan-id"}
    assert set(TOGGLES) == set(EXPECTED_IES) | set(TIME_IES["absolute"])
    assert [f.name for f in FIELDS if f.kind is Kind.ALWAYS] == ["ip-version", "flow-direction", "flow-end-reason"]


def test_defaults_are_routeros_defaults() -> None:
    assert FieldSet() == ROUTEROS_DEFAULTS == Settings().ipfix == ExportContext().fields
    assert ROUTEROS_DEFAULTS.enabled == frozenset(TOGGLES) - {"nat-events", "inner-vlan-id"}
    assert "nat-events" not in ROUTEROS_DEFAULTS and "ttl" in ROUTEROS_DEFAULTS
    assert "flow-end-reason" in FieldSet(frozenset())  # always sent
    assert ROUTEROS_DEFAULTS.changes() == {}
    assert ROUTEROS_DEFAULTS.describe().startswith("as=yes,bytes=yes,dst-address=yes,")
    assert "nat-events=no" in ROUTEROS_DEFAULTS.describe().split(",")


def test_parse_routeros_yes_no_and_later_wins() -> None:
    fields = FieldSet.parse(" ttl=no , tos=false,nat-events=yes,as=true ")
    assert fields.changes() == {"nat-events": True, "tos": False, "ttl": False}
    assert FieldSet.parse("ttl=no,ttl=yes") == ROUTEROS_DEFAULTS
    assert FieldSet.parse("ttl=yes", base=fields).changes() == {"nat-events": True, "tos": False}
    assert parse_fields(["ttl=no,tos=no", "tos=yes"]) == FieldSet.parse("ttl=no")
    assert parse_fields([]) == ROUTEROS_DEFAULTS
    assert FieldSet.parse("ip-version=yes") == ROUTEROS_DEFAULTS  # always on: saying so is fine
    assert FieldSet(frozenset(["ttl", "tos"])) == FieldSet(frozenset(["tos", "ttl"]))
    assert hash(FieldSet.parse("ttl=no,tos=no")) == hash(FieldSet.parse("tos=no,ttl=no"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ttl=no,src-mac=no", r"unknown ipfix field 'src-mac' \(known: as, bytes, .*, vlan-id; always sent: "),
        ("ttl=maybe", "ipfix field ttl: 'maybe' is not yes or no"),
        ("ttl", r"'ttl' is not NAME=yes\|no"),
        ("=yes", r"'=yes' is not NAME=yes\|no"),
        ("", "expected NAME=yes"),
        ("flow-end-reason=no", "flow-end-reason is always sent by pyflow and cannot be turned off"),
    ],
)
def test_parse_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FieldSet.parse(text)


def test_fieldset_refuses_unknown_names() -> None:
    with pytest.raises(ConfigError, match="unknown ipfix field 'nat-event'"):
        FieldSet(frozenset(["nat-event"]))
    with pytest.raises(ConfigError, match="unknown ipfix field 'ttls'"):
        _ = "ttls" in ROUTEROS_DEFAULTS


def test_settings_and_cli() -> None:
    args = build_parser().parse_args(["run", "--target", "127.0.0.1", "--ipfix", "ttl=no,nat-events=yes",
                                      "--ipfix", "ttl=yes,tos=no"])  # fmt: skip
    assert settings_from_args(args).ipfix == FieldSet.parse("nat-events=yes,tos=no")
    assert settings_from_args(build_parser().parse_args(["run", "--target", "127.0.0.1"])).ipfix == ROUTEROS_DEFAULTS
    with pytest.raises(ConfigError, match="unknown ipfix field 'tll'"):
        settings_from_args(build_parser().parse_args(["run", "--target", "127.0.0.1", "--ipfix", "tll=no"]))
    with pytest.raises(ConfigError, match="must be a FieldSet"):
        Settings(ipfix="ttl=no")  # type: ignore[arg-type]
    words = {word.strip(",.;:()") for word in RUN_EPILOG.split()}
    assert set(TOGGLES) <= words, "--help names every toggle"


# --------------------------------------------------------------------------
# Templates from field sets.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_default_templates_carry_every_routeros_field(mode: str) -> None:
    for version in (4, 6):
        wanted = ALWAYS_IES.union(*(expected_ies(t, version, mode) for t in TOGGLES
                                    if t not in ("nat-events", "inner-vlan-id")))  # the two off by default
        ies = template_ies(ROUTEROS_DEFAULTS, mode, version)
        assert sorted(ies) == sorted(wanted)
    assert not export_templates(ROUTEROS_DEFAULTS, mode).nat_events


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("toggle", TOGGLES)
def test_turning_a_toggle_off_removes_exactly_its_ies(mode: str, toggle: str) -> None:
    base = EVERYTHING.with_values({"inner-vlan-id": True})
    off = base.with_values({toggle: False})
    for version in (4, 6):
        before, after = template_ies(base, mode, version), template_ies(off, mode, version)
        assert [ie for ie in before if ie not in after] == sorted(expected_ies(toggle, version, mode),
                                                                 key=before.index)  # fmt: skip
        assert after == [ie for ie in before if ie in after], "the others keep their order"
    templates = export_templates(off, mode)
    assert bool(templates.nat_events) == (toggle != "nat-events")


def test_template_ids() -> None:
    """Default layouts keep their ids; any other layout gets its own stable id from 264 up."""
    assert [t.template_id for t in export_templates(ROUTEROS_DEFAULTS, "absolute").all()] == [256, 257]
    assert [t.template_id for t in export_templates(ROUTEROS_DEFAULTS, "routeros").all()] == [258, 259]
    assert [t.template_id for t in export_templates(ROUTEROS_DEFAULTS, "uptime").all()] == [256, 257]
    assert [t.template_id for t in export_templates(EVERYTHING, "absolute").all()] == [256, 257, 262, 263]
    # Every field set one toggle away from the default: each layout has one id, and within a
    # protocol (IPFIX: both time modes; v9) no two layouts share an id.  (Ids are a hash of the
    # layout, so some pair of all possible layouts must collide; these common ones do not.)
    for modes in (("absolute", "routeros"), ("uptime",)):
        layouts_by_id: dict[int, set[object]] = {}
        for mode in modes:
            for toggle in TOGGLES:
                fields = ROUTEROS_DEFAULTS.with_values({toggle: toggle not in ROUTEROS_DEFAULTS})
                templates = export_templates(fields, mode)
                assert len({t.template_id for t in templates.all()}) == len(templates.all())
                for template in templates.flows.values():
                    layouts_by_id.setdefault(template.template_id, set()).add(template.fields)
        assert all(len(layouts) == 1 for layouts in layouts_by_id.values()), "two layouts share an id"
        others = set(layouts_by_id) - {256, 257, 258, 259}
        assert len(others) > 60 and min(others) >= FIRST_LAYOUT_TEMPLATE_ID
    # stable: the same field set, however written, gives the same ids
    ids = [t.template_id for t in export_templates(FieldSet.parse("ttl=no,tos=no"), "absolute").all()]
    export_templates.cache_clear()
    assert [t.template_id for t in export_templates(FieldSet.parse("tos=no,ttl=no"), "absolute").all()] == ids


def test_layout_template_id_skips_taken_ids() -> None:
    layout = build_template(300, ["protocolIdentifier", "ipVersion"]).fields
    first = layout_template_id(layout)
    assert first == layout_template_id(layout) >= FIRST_LAYOUT_TEMPLATE_ID
    second = layout_template_id(layout, taken=[first])
    assert second == (first + 1 if first < 0xFFFF else FIRST_LAYOUT_TEMPLATE_ID)


def test_nothing_but_the_always_sent_fields() -> None:
    nothing = FieldSet(frozenset())
    for mode in MODES:
        for version in (4, 6):
            assert template_ies(nothing, mode, version) == [60, 61, 136]


def test_v9_padding_is_never_a_record_long() -> None:
    """With every toggle off, records are 3 bytes: three of them would need 3 padding bytes,
    which a collector reads as a fourth record; they go as a set of 2 and a set of 1."""
    ctx = ExportContext(fields=FieldSet(frozenset()))
    [packet], _ = v9.encode(make_batch(*[FLOW_V4] * 3), V9State(), CLOCK, True, ctx=ctx)
    [parsed] = test_v9.parse_all([packet])  # its parser takes any padding of 3 bytes or more as records
    template_id = v9.templates_for(ctx).flows[4].template_id
    assert parsed.flowset_ids == [0, template_id, template_id]
    assert parsed.rows == [{"ip_version": 4, "direction": 0, "end_reason": 3}] * 3
    assert packet.endswith(bytes([4, 0, 3, 4, 0, 3, 0, 0]) + template_id.to_bytes(2, "big") + bytes([0, 8, 4, 0, 3, 0]))


def test_nat_event_templates() -> None:
    templates = export_templates(EVERYTHING, "absolute").nat_events
    assert [(ie.ie_id, n) for ie, n in templates[4].fields] == [
        (323, 8), (230, 1), (4, 1), (8, 4), (12, 4), (7, 2), (11, 2), (225, 4), (226, 4), (227, 2), (228, 2)]
    assert [ie.ie_id for ie, _ in templates[6].fields] == [323, 230, 4, 27, 28, 7, 11, 281, 282, 227, 228]
    assert export_templates(EVERYTHING, "routeros").nat_events == templates  # the event time is absolute anyway


# --------------------------------------------------------------------------
# NAT events: routed to their templates, or counted as not representable.
# --------------------------------------------------------------------------

NAT_EVENT_V4: dict[str, int | str] = {
    "ip_version": 4, "nat_event": 4, "protocol": 6, "src_addr": "192.168.88.10", "dst_addr": "198.51.100.80",
    "src_port": 51000, "dst_port": 443, "nat_src_addr": "203.0.113.1", "nat_dst_addr": "198.51.100.80",
    "nat_src_port": 61000, "nat_dst_port": 443, "start_ms": 1_700_000_003_210, "end_ms": 1_700_000_003_210,
}  # fmt: skip
NAT_EVENT_V6 = NAT_EVENT_V4 | {
    "ip_version": 6, "nat_event": 5, "protocol": 17, "src_addr": "fd00::10", "dst_addr": "2001:db8::80",
    "nat_src_addr": "2001:db8:1::1", "nat_dst_addr": "2001:db8::80", "src_port": 5353, "nat_src_port": 15353,
}  # fmt: skip


def test_nat_events_go_to_their_templates() -> None:
    batch = make_batch(NAT_EVENT_V6, FLOW_V4, NAT_EVENT_V4, FLOW_V6)
    ctx = ExportContext(fields=EVERYTHING)
    [message], state = ipfix.encode(batch, IpfixState(), CLOCK, True, ctx=ctx)
    [parsed] = test_ipfix.parse_all([message])
    assert parsed.set_ids == [2, 256, 257, 262, 263]
    assert state.sequence == 4  # NAT events are data records too (nfcapd counts them: see the nfdump test)
    order = [batch[i] for i in (1, 3, 2, 0)]
    assert parsed.rows == [expected_row(r, EVERYTHING, "absolute", CLOCK) for r in order]
    assert parsed.rows[2]["nat_event"] == 4 and parsed.rows[3]["nat_event"] == 5
    [packet], _ = v9.encode(batch, V9State(), CLOCK, True, ctx=ctx)
    assert test_v9.parse_all([packet])[0].flowset_ids == [0, 256, 257, 262, 263]


def test_nat_events_need_nat_events_yes() -> None:
    batch = make_batch(FLOW_V4, NAT_EVENT_V4)
    with pytest.raises(ValueError, match=r"no template for NAT events \(nat_event != 0\) of ip_version \[4\]"):
        ipfix.encode(batch, IpfixState(), CLOCK, False)
    with pytest.raises(ValueError, match="NAT events"):
        v9.encode(batch, V9State(), CLOCK, False)


@pytest.mark.parametrize(("version", "fields", "sent", "dropped"), [
    ("ipfix", ROUTEROS_DEFAULTS, 2, 1), ("ipfix", EVERYTHING, 3, 0), ("9", EVERYTHING, 3, 0),
    ("9", ROUTEROS_DEFAULTS, 2, 1), ("5", EVERYTHING, 2, 1), ("1", EVERYTHING, 2, 1),
])  # fmt: skip
def test_target_counts_nat_events_it_cannot_send(version: str, fields: FieldSet, sent: int, dropped: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as collector:
        collector.bind(("127.0.0.1", 0))
        collector.settimeout(5)
        target = Target(TargetSettings("127.0.0.1", collector.getsockname()[1], version), encoder_for(version),
                        ctx=ExportContext(fields=fields))  # fmt: skip
        try:
            target.export(make_batch(FLOW_V4, NAT_EVENT_V4, FLOW_V4 | {"src_port": 1}), CLOCK, 0)
            datagram = collector.recv(65535)
        finally:
            target.close()
    assert (target.stats.records, target.stats.not_representable) == (sent, dropped)
    assert datagram


# --------------------------------------------------------------------------
# The oracle: which columns a record carries under a field set, with which values.
# --------------------------------------------------------------------------

# time toggle -> decoded column, by how the times reach the decoder
TIME_COLUMNS = {
    "absolute": {"first-forwarded": "start_ms", "last-forwarded": "end_ms"},
    "routeros": {"first-forwarded": "start_uptime_ms", "last-forwarded": "end_uptime_ms",
                 "sys-init-time": "system_init_ms"},
    "v9": {"first-forwarded": "start_ms", "last-forwarded": "end_ms", "sys-init-time": "system_init_ms"},
}  # fmt: skip


def expected_columns(fields: FieldSet, version: int, times: str) -> set[str]:
    columns = {IE_COLUMNS[ie] for ie in ALWAYS_IES}
    for toggle in TOGGLES:
        if toggle in fields and toggle in TIME_COLUMNS["routeros"]:
            columns |= {TIME_COLUMNS[times][toggle]} if toggle in TIME_COLUMNS[times] else set()
        elif toggle in fields:
            columns |= {IE_COLUMNS[ie] for ie in EXPECTED_IES[toggle][0 if version == 4 else 1]}
    return columns


def expected_row(record: np.void, fields: FieldSet, times: str, clock: ExportClock) -> dict[str, int | bytes]:
    """What a decoder should find for ``record``: the columns its template carries, and their values."""
    if int(record["nat_event"]):
        columns: set[str] = set(NAT_EVENT_COLUMNS)
    else:
        columns = expected_columns(fields, int(record["ip_version"]), times)
    boot = clock.boot_unix_ms
    derived = {"start_uptime_ms": (int(record["start_ms"]) - boot) % U32,
               "end_uptime_ms": (int(record["end_ms"]) - boot) % U32, "system_init_ms": boot}  # fmt: skip
    row: dict[str, int | bytes] = {}
    for name in columns:
        if name in derived:
            row[name] = derived[name]
        elif RECORD_DTYPE[name].kind == "V":
            row[name] = bytes(record[name])
        else:
            row[name] = int(record[name])
    return row


def encoder_order(batch: np.ndarray) -> list[np.void]:
    """Flows (IPv4, then IPv6), then NAT events (IPv4, then IPv6), batch order within each."""
    event, version = batch["nat_event"] != 0, batch["ip_version"]
    masks = [~event & (version == 4), ~event & (version == 6), event & (version == 4), event & (version == 6)]
    return [batch[i] for mask in masks for i in np.flatnonzero(mask)]


# --------------------------------------------------------------------------
# Every column with a distinctive value, through tshark and nfdump.
# --------------------------------------------------------------------------

DISTINCT_V4 = FLOW_V4 | {
    "src_mac": "02:11:22:33:44:a1", "dst_mac": "02:11:22:33:44:b2", "vlan_id": 3001, "ttl_min": 33,
    "ttl_max": 250, "length_min": 41, "length_max": 1499, "ip_header_length": 24, "tcp_seq": 0x1234_5679,
    "tcp_ack": 0x9ABC_DEF1, "tcp_window": 29_201, "next_hop": "192.0.2.253", "src_mask": 23, "dst_mask": 17,
    "src_as": 4_200_000_007, "dst_as": 64_512, "nat_src_addr": "203.0.113.77", "nat_dst_addr": "198.51.100.99",
    "nat_src_port": 40_009, "nat_dst_port": 8_443, "is_multicast": 0,
}  # fmt: skip
DISTINCT_ICMP = DISTINCT_V4 | {"protocol": 1, "src_port": 0, "dst_port": 11 * 256 + 1, "icmp_type": 11,
                               "icmp_code": 1, "tcp_seq": 0, "tcp_ack": 0, "tcp_window": 0, "tcp_flags": 0,
                               "src_addr": "192.0.2.9", "src_mac": "02:11:22:33:44:a9"}  # fmt: skip
DISTINCT_IGMP = DISTINCT_V4 | {"protocol": 2, "src_port": 0, "dst_port": 0, "igmp_type": 0x22, "tcp_seq": 0,
                               "tcp_ack": 0, "tcp_window": 0, "tcp_flags": 0, "src_addr": "192.0.2.10",
                               "dst_addr": "224.0.0.22", "is_multicast": 0x01, "ttl_min": 1, "ttl_max": 1,
                               "ip_header_length": 24}  # fmt: skip
DISTINCT_V6 = FLOW_V6 | {
    "src_mac": "02:11:22:33:44:c3", "dst_mac": "33:33:00:00:00:fb", "vlan_id": 4001, "ttl_min": 64,
    "ttl_max": 255, "length_min": 61, "length_max": 1279, "ip_header_length": 40, "udp_length": 1239,
    "flow_label": 0xFEDCB, "is_multicast": 0x20, "next_hop": "fe80::abcd", "src_mask": 48, "dst_mask": 16,
    "src_as": 65_551, "dst_as": 4_000_000_003, "nat_src_addr": "2001:db8:ffff::7",
    "nat_dst_addr": "2001:db8:eeee::9", "nat_src_port": 15_353, "nat_dst_port": 5_354,
}  # fmt: skip
DISTINCT_ICMP6 = DISTINCT_V6 | {"protocol": 58, "src_port": 0, "dst_port": 135 * 256, "icmp_type": 135,
                                "icmp_code": 0, "udp_length": 0, "src_addr": "2001:db8::9"}  # fmt: skip


def distinct_batch(now_ms: int | None = None) -> np.ndarray:
    batch = make_batch(DISTINCT_V4, DISTINCT_V6, DISTINCT_ICMP, NAT_EVENT_V4, DISTINCT_IGMP, DISTINCT_ICMP6,
                       NAT_EVENT_V6)  # fmt: skip
    if now_ms is not None:
        batch["start_ms"] = now_ms - 60_000 + np.arange(len(batch)) * 1_000
        batch["end_ms"] = batch["start_ms"] + 30_000
        events = batch["nat_event"] != 0
        batch["end_ms"][events] = batch["start_ms"][events]
    return batch


# tshark field -> the column (or derived time) it shows; addresses and MACs as text
TSHARK_EXTRA = {"cflow.timestart": "start_uptime_ms", "cflow.timeend": "end_uptime_ms",
                "cflow.sys_init_time": "system_init_ms"}  # fmt: skip


def tshark_flows(packets: list[ET.Element]) -> list[dict[str, int | bytes]]:
    """Every flow record tshark shows, as {column: value} (test_ipfix's table, plus uptimes)."""
    rows = []
    for packet in packets:
        for flow in (f for f in packet.iter("field") if f.get("name") == "" and f.get("show", "").startswith("Flow ")):
            row: dict[str, int | bytes] = {}
            for element in flow.iter("field"):
                name = element.get("name", "")
                if name in test_ipfix.TSHARK_COLUMNS:
                    row[test_ipfix.TSHARK_COLUMNS[name]] = test_ipfix.tshark_value(element)
                elif name in ("cflow.timestart", "cflow.timeend"):
                    row[TSHARK_EXTRA[name]] = int(Decimal(element.get("show", "")) * 1000)
                elif name == "cflow.sys_init_time":
                    row[TSHARK_EXTRA[name]] = int(element.get("value", ""), 16)
            rows.append(row)
    return rows


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed (apt-get install tshark)")
@pytest.mark.parametrize("fmt", ["ipfix", "ipfix-routeros", "v9"])
def test_tshark_decodes_every_field(tmp_path: Path, fmt: str) -> None:
    batch = distinct_batch()
    if fmt == "v9":
        messages, _ = v9.encode(batch, V9State(7, 3), CLOCK, True, ctx=ExportContext(fields=EVERYTHING))
        times = "routeros"  # tshark shows v9's FIRST/LAST_SWITCHED as uptimes, and 160
    else:
        mode = "routeros" if fmt == "ipfix-routeros" else "absolute"
        ctx = ExportContext(fields=EVERYTHING, time_mode=mode)
        messages, _ = ipfix.encode(batch, IpfixState(7, 3), CLOCK, True, ctx=ctx)
        times = mode
    packets = tshark_pdml(tmp_path, messages)
    assert [c for p in packets for c in tshark_complaints(p)] == []
    shown = tshark_flows(packets)
    expected = [expected_row(r, EVERYTHING, times, CLOCK) for r in encoder_order(batch)]
    assert len(shown) == len(expected) == 7
    for got, want in zip(shown, expected, strict=True):
        assert got == want
    # the distinctive values really are there (not, say, zeros on both sides)
    v4 = shown[0]
    assert (v4["src_mac"], v4["vlan_id"], v4["ttl_min"], v4["ttl_max"], v4["tcp_seq"], v4["src_as"]) == (
        bytes.fromhex("0211223344a1"), 3001, 33, 250, 0x1234_5679, 4_200_000_007)
    icmp, igmp = shown[1], shown[2]
    assert (icmp["icmp_type"], icmp["icmp_code"], igmp["igmp_type"], igmp["is_multicast"]) == (11, 1, 0x22, 1)
    v6 = shown[3]
    assert (v6["flow_label"], v6["udp_length"], v6["nat_src_addr"], v6["next_hop"]) == (
        0xFEDCB, 1239, socket.inet_pton(socket.AF_INET6, "2001:db8:ffff::7"), socket.inet_pton(socket.AF_INET6,
                                                                                               "fe80::abcd"))
    assert [r["nat_event"] for r in shown[5:]] == [4, 5]


@requires_nfdump
@pytest.mark.parametrize("fmt", ["ipfix", "v9"])
def test_nfdump_shows_routing_link_and_nat_fields(tmp_path: Path, fmt: str) -> None:
    """nfdump 1.7.1 stores next hop, masks, AS, MACs, VLAN, NAT translation and NAT events."""
    now_ns = time.time_ns()
    clock = ExportClock(unix_ns=now_ns, uptime_ms=123_456_789)
    batch = distinct_batch(now_ns // 10**6)
    ctx = ExportContext(fields=EVERYTHING)
    if fmt == "v9":
        messages, _ = v9.encode(batch, V9State(0, 1), clock, True, ctx=ctx)
    else:
        messages, _ = ipfix.encode(batch, IpfixState(0, 1), clock, True, ctx=ctx)
    got = collect(messages, tmp_path)
    assert "Sequence Errors: 0, Bad Packets: 0" in got.log
    assert f"Flows: {len(batch)}," in got.log
    flows = {row["sa"]: row for row in got.flows}  # every record of the batch has its own source address
    raws = {raw["src addr"]: raw for raw in got.raw_records()}
    for flow in (DISTINCT_V4, DISTINCT_V6, DISTINCT_ICMP, DISTINCT_ICMP6, DISTINCT_IGMP):
        row, raw = flows[str(flow["src_addr"])], raws[str(flow["src_addr"])]
        assert (row["nh"], int(row["smk"]), int(row["dmk"]), int(row["sas"]), int(row["das"])) == (
            flow["next_hop"], flow["src_mask"], flow["dst_mask"], flow["src_as"], flow["dst_as"])
        assert (row["ismc"], row["idmc"], int(row["svln"])) == (flow["src_mac"], flow["dst_mac"], flow["vlan_id"])
        assert (int(raw["src xlt port"]), int(raw["dst xlt port"])) == (flow["nat_src_port"], flow["nat_dst_port"])
        if flow["ip_version"] == 4 or fmt == "v9":  # nfdump 1.7.1 reads 281/282 from v9 only, not IPFIX
            assert (raw["src xlt ip"], raw["dst xlt ip"]) == (flow["nat_src_addr"], flow["nat_dst_addr"])
    for event in (NAT_EVENT_V4, NAT_EVENT_V6):
        raw = raws[str(event["src_addr"])]
        assert raw["nat event"].split(":")[0] == str(event["nat_event"])
        assert (int(raw["src xlt port"]), int(raw["dst xlt port"])) == (event["nat_src_port"], event["nat_dst_port"])
        index = int(np.flatnonzero(batch["nat_event"] == event["nat_event"])[0])
        assert int(raw["Event time"].split()[0]) == int(batch["start_ms"][index])


# --------------------------------------------------------------------------
# Property: random field sets x random batches round-trip through our own decoders.
# --------------------------------------------------------------------------

field_sets = st.frozensets(st.sampled_from(TOGGLES)).map(FieldSet)


@given(data=st.data(), fields=field_sets, mode=st.sampled_from(["absolute", "routeros"]),
       max_size=st.integers(600, 9000), sequence=st.integers(0, U32 - 1))  # fmt: skip
@settings(max_examples=100, deadline=None)
def test_ipfix_any_field_set_round_trips(data: st.DataObject, fields: FieldSet, mode: str, max_size: int,
                                         sequence: int) -> None:  # fmt: skip
    batch = data.draw(test_ipfix.record_batches(nat_events="nat-events" in fields))
    ctx = ExportContext(fields=fields, time_mode=mode)
    messages, state = ipfix.encode(batch, IpfixState(sequence, 9), CLOCK, True, max_size, ctx)
    parsed = test_ipfix.parse_all(messages)
    assert all(len(m) <= max_size for m in messages)
    rows = [row for p in parsed for row in p.rows]
    assert rows == [expected_row(r, fields, mode, CLOCK) for r in encoder_order(batch)]
    assert state.sequence == (sequence + len(batch)) % U32
    templates = ipfix.templates_for(ctx)
    used = {set_id for p in parsed for set_id in p.set_ids if set_id >= 256}
    assert used <= {t.template_id for t in templates.all()}


@given(data=st.data(), fields=field_sets, uptime_ms=st.integers(0, 2**40), max_size=st.integers(600, 9000))
@settings(max_examples=100, deadline=None)
def test_v9_any_field_set_round_trips(data: st.DataObject, fields: FieldSet, uptime_ms: int, max_size: int) -> None:
    clock = ExportClock(unix_ns=EXPORT_S * 10**9, uptime_ms=uptime_ms)
    batch = data.draw(test_v9.record_batches(EXPORT_S * 1000))
    if "nat-events" in fields:
        batch["nat_event"] = np.where(np.arange(len(batch)) % 3 == 0, 4, 0)
    messages, _ = v9.encode(batch, V9State(), clock, True, max_size, ExportContext(fields=fields))
    parsed = test_v9.parse_all(messages)
    assert all(len(m) <= max_size for m in messages)
    rows = [row for p in parsed for row in p.rows]
    assert rows == [expected_row(r, fields, "v9", clock) for r in encoder_order(batch)]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed (apt-get install tshark)")
def test_tshark_decodes_random_field_sets(tmp_path: Path) -> None:
    """A sample of the property test, judged by tshark: 8 random field sets, realistic records."""
    rng = np.random.default_rng(11)
    base = distinct_batch()
    for i in range(8):
        fields = FieldSet(frozenset(t for t in TOGGLES if rng.random() < 0.6))
        batch = base if "nat-events" in fields else base[base["nat_event"] == 0]
        ctx = ExportContext(fields=fields)
        messages, _ = ipfix.encode(batch, IpfixState(), CLOCK, True, ctx=ctx)
        packets = tshark_pdml(tmp_path, messages, f"random{i}.pcap")
        assert [c for p in packets for c in tshark_complaints(p)] == []
        assert tshark_flows(packets) == [expected_row(r, fields, "absolute", CLOCK) for r in encoder_order(batch)]


def test_export_templates_accepts_plain_mappings() -> None:
    """encode(templates=...) still takes {ip_version: Template}: flows only, no NAT events."""
    templates = ExportTemplates(export_templates().flows)
    assert templates.all() == tuple(export_templates().flows.values()) and not templates.nat_events
    with pytest.raises(ValueError, match="template ids repeat"):
        ExportTemplates({4: templates.flows[4], 6: templates.flows[4]})
