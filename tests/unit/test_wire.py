"""Wire fidelity: what collectors derive from the headers, template refresh per datagram, sessions.

* The boot time a collector derives from a header (v1/v5: secs x 1000 +
  nsecs // 10^6 - sysUptime; v9: secs x 1000 - sysUptime) is the exporter's
  one boot instant in every datagram, whatever the wall clock's sub-second
  part, and flow times come back exactly.
* ``v9-template-refresh`` R: never more than R datagrams without templates,
  also within one large export, for v9 and IPFIX.
* The session a target keeps (sequence, template clock, source port) is what
  the next agent goes on with.
"""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyflow.collect import TemplateCache, decode
from pyflow.config import Settings, TargetSettings, parse_target
from pyflow.export import legacy, v9
from pyflow.export.context import ExportClock, ExportContext, Sampling
from pyflow.export.ipfix import IpfixState
from pyflow.export.registry import encoder_for
from pyflow.export.session import Kept, Session, read_session, target_key
from pyflow.export.target import Target
from pyflow.export.templates import TemplateSchedule
from pyflow.records import addr_to_16, empty
from pyflow.routeros import print_settings

U32 = 1 << 32
S = 10**9
BOOT_MS = 1_700_000_000_000  # an exporter booted in November 2023


def batch(n: int, start_ms: int, v6_every: int = 0) -> np.ndarray:
    r = empty(n)
    v6 = (np.arange(n) % v6_every == 0) if v6_every else np.zeros(n, dtype=bool)
    r["ip_version"] = np.where(v6, 6, 4)
    r["src_addr"] = np.where(v6, addr_to_16("2001:db8::1"), addr_to_16("192.0.2.1"))
    r["dst_addr"] = np.where(v6, addr_to_16("2001:db8::2"), addr_to_16("198.51.100.2"))
    r["src_port"] = np.arange(n) % 65536
    r["dst_port"] = 53
    r["protocol"] = 17
    r["packets"] = 1 + np.arange(n)
    r["bytes"] = 100 * (1 + np.arange(n))
    r["start_ms"] = start_ms - 5000 + np.arange(n) % 1000
    r["end_ms"] = start_ms - 1000 + np.arange(n) % 1000
    return r


def derived_boot_ms(datagram: bytes) -> int:
    """The exporter's boot time as nfdump and pmacct work it out from a header (64-bit arithmetic)."""
    version = struct.unpack_from("!H", datagram)[0]
    if version == 9:
        uptime, secs = struct.unpack_from("!II", datagram, 4)
        return secs * 1000 - uptime
    uptime, secs, nsecs = struct.unpack_from("!III", datagram, 4)
    return secs * 1000 + nsecs // 10**6 - uptime


# --------------------------------------------------------------------------------------------
# The header clock
# --------------------------------------------------------------------------------------------


@given(uptimes_ns=st.lists(st.integers(S, (U32 - 1) * 10**6), min_size=1, max_size=30),
       boot_ms=st.integers(10**12, 2 * 10**12))
@settings(max_examples=200, deadline=None)
def test_every_header_derives_the_same_boot_time(uptimes_ns: list[int], boot_ms: int) -> None:
    """Wall times anywhere in the uptime's range, any sub-second part, in any order: v1, v5 and
    v9 headers all give back the boot instant, to the ms.  (From 1 s after it: v9's sysUptime is
    that of the header's whole second, negative -- wrapped -- within the first.)"""
    for uptime_ns in uptimes_ns:
        clock = ExportClock.at(boot_ms * 10**6 + uptime_ns, boot_ms)
        records = batch(3, clock.unix_ms)
        datagrams = (legacy.encode_v1(records, clock) + legacy.encode_v5(records, legacy.V5State(), clock)[0]
                     + v9.encode(records, v9.V9State(), clock, True)[0])
        assert {derived_boot_ms(d) for d in datagrams} == {boot_ms}


@given(uptime_ms=st.integers(0, 2**40), boot_ms=st.integers(10**12, 2 * 10**12), sub_ms_ns=st.integers(0, 10**6 - 1))
@settings(max_examples=200, deadline=None)
def test_boot_time_agrees_modulo_the_uptime_wrap(uptime_ms: int, boot_ms: int, sub_ms_ns: int) -> None:
    """After 49.7 days sysUptime wraps: the derived boot time is still the boot instant mod 2^32 ms."""
    clock = ExportClock.at((boot_ms + uptime_ms) * 10**6 + sub_ms_ns, boot_ms)
    records = batch(1, clock.unix_ms)
    for d in legacy.encode_v5(records, legacy.V5State(), clock)[0] + v9.encode(records, v9.V9State(), clock, True)[0]:
        assert derived_boot_ms(d) % U32 == boot_ms % U32


@given(sub_second_ns=st.integers(0, S - 1), start_offset_ms=st.integers(1, 3_600_000))
@settings(max_examples=100, deadline=None)
def test_v9_flow_times_come_back_exactly(sub_second_ns: int, start_offset_ms: int) -> None:
    """Before, v9 put flows up to a second early (whole UNIX secs against a ms sysUptime)."""
    clock = ExportClock.at(BOOT_MS * 10**6 + 7_200 * S + sub_second_ns, BOOT_MS)
    records = batch(2, clock.unix_ms - start_offset_ms)
    packets, _ = v9.encode(records, v9.V9State(), clock, True)
    cache = TemplateCache()
    got = [r for p in packets for r in decode(p, ("192.0.2.9", 2055), cache).records]
    assert [(r.start_ms, r.end_ms) for r in got] == [(int(a), int(b)) for a, b in records[["start_ms", "end_ms"]]]


# --------------------------------------------------------------------------------------------
# Template refresh, datagram by datagram
# --------------------------------------------------------------------------------------------


def template_flags(target: Target, datagrams: list[bytes]) -> list[bool]:
    return [target.encoder.carries_templates(d) for d in datagrams]


@pytest.mark.parametrize("version", ["9", "ipfix"])
@given(refresh=st.integers(1, 40), sizes=st.lists(st.integers(0, 1500), min_size=1, max_size=4),
       v6_every=st.sampled_from([0, 2, 7]))
@settings(max_examples=25, deadline=None)
def test_templates_every_refresh_datagrams_within_one_export(version: str, refresh: int, sizes: list[int],
                                                            v6_every: int) -> None:
    """One export of thousands of records, or several: a datagram with templates, then exactly R
    without, then one with again; every record decodes, and the sequence numbers follow on."""
    t = Target(TargetSettings("192.0.2.9", 2055, version, v9_template_refresh=refresh), encoder_for(version))
    clock = ExportClock.at(BOOT_MS * 10**6 + 3_600 * S, BOOT_MS)
    stream: list[bytes] = []
    total = 0
    for i, n in enumerate(sizes):
        out, carried = t.encode(batch(n, clock.unix_ms, v6_every), clock, i)  # well within the 30m timeout
        stream += out
        total += len(carried)
    flags = template_flags(t, stream)
    assert flags == [i % (refresh + 1) == 0 for i in range(len(stream))]
    assert t.stats.templates == sum(flags)
    cache = TemplateCache()
    decoded = [decode(d, ("192.0.2.9", 2055), cache) for d in stream]
    assert [p for d in decoded for p in d.problems] == []
    assert sum(len(d.records) for d in decoded) == total == sum(sizes)
    seqs = [struct.unpack_from("!I", d, 8 if version == "ipfix" else 12)[0] for d in stream]
    if version == "9":
        assert seqs == list(range(len(stream)))  # one per packet, template packets included
    else:
        counts = [len(d.records) for d in decoded]
        assert seqs == [sum(counts[:i]) for i in range(len(stream))]  # flow records before the message


def test_schedule_continues_across_exports() -> None:
    """The count carries over from one export to the next: 15 datagrams sent, R = 20: templates
    in the 6th datagram of the next export, then every 21st."""
    t = Target(TargetSettings("192.0.2.9", 2055, "9", v9_template_refresh=20), encoder_for("9"))
    t.clock.sent_datagrams(0, [True] + [False] * 15)
    assert t.clock.schedule(S) == TemplateSchedule(5, 21)
    clock = ExportClock.at(BOOT_MS * 10**6 + 3_600 * S, BOOT_MS)
    out, _ = t.encode(batch(600, clock.unix_ms), clock, S)
    assert len(out) > 30
    assert [i for i, f in enumerate(template_flags(t, out)) if f] == list(range(5, len(out), 21))
    assert t.clock.packets_since == (len(out) - 6) % 21


def test_options_records_follow_each_refresh_and_counting_rules() -> None:
    """Interface names asked for: options with every template refresh; "flows" counts flow records
    (nfdump), "rfc" every data record (RFC 7011, Wireshark)."""
    clock = ExportClock.at(BOOT_MS * 10**6 + 3_600 * S, BOOT_MS)
    for rule in ("flows", "rfc"):
        ts = TargetSettings("192.0.2.9", 2055, "ipfix", v9_template_refresh=2, interface_names=True, sequence=rule)
        ctx = ExportContext(interfaces=((1, "eth0"), (2, "eth1")), sequence=rule)
        t = Target(ts, encoder_for("ipfix"), ctx=ctx)
        out, _ = t.encode(batch(300, clock.unix_ms), clock, 0)
        cache = TemplateCache()
        decoded = [decode(d, ("192.0.2.9", 2055), cache) for d in out]
        seqs = [struct.unpack_from("!I", d, 8)[0] for d in out]
        counted = [sum(1 for r in d.records if rule == "rfc" or not r.options) for d in decoded]
        assert seqs == [sum(counted[:i]) for i in range(len(out))]
        assert sum(1 for d in decoded for r in d.records if r.options) == 2 * sum(template_flags(t, out))


# --------------------------------------------------------------------------------------------
# Sessions: what the next agent goes on with
# --------------------------------------------------------------------------------------------


def listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2)
    return s


@pytest.mark.parametrize("version", ["1", "5", "9", "ipfix"])
def test_a_resumed_target_goes_on_with_sequence_port_and_template_clock(version: str) -> None:
    sock = listener()
    ts = TargetSettings("127.0.0.1", sock.getsockname()[1], version, v9_template_refresh=5)
    clock = ExportClock.at(BOOT_MS * 10**6 + 3_600 * S, BOOT_MS)
    first = Target(ts, encoder_for(version))
    saved: list[bytes] = []
    session = Session(BOOT_MS, [first], saved.append, lambda m: None)
    session.attach(first)
    first.open()
    first.export(batch(100, clock.unix_ms), clock, 0)
    port = first.local_port()
    first.close()  # the agent is gone (a kill -9 closes its sockets the same way)
    kept = read_session(saved[-1])
    assert kept.boot_unix_ms == BOOT_MS

    second = Target(ts, encoder_for(version))
    assert Session(0, [second], saved.append, lambda m: None).resume(kept) == [f"{second.name} from port {port}"]
    second.open()
    assert second.local_port() == port
    second.export(batch(100, clock.unix_ms), clock, S)
    got = []
    while len(got) < first.stats.datagrams + second.stats.datagrams:
        got.append(sock.recv(65535))
    sock.close()
    second.close()
    if version == "5":
        counts = [struct.unpack_from("!H", d, 2)[0] for d in got]
        assert [struct.unpack_from("!I", d, 16)[0] for d in got] == [sum(counts[:i]) for i in range(len(got))]
    elif version == "9":
        assert [struct.unpack_from("!I", d, 12)[0] for d in got] == list(range(len(got)))
        # the template clock went on: templates every 6th packet across both agents
        assert [v9.carries_templates(d) for d in got] == [i % 6 == 0 for i in range(len(got))]
    elif version == "ipfix":
        assert struct.unpack_from("!I", got[first.stats.datagrams], 8)[0] == 100
        assert isinstance(second.state, IpfixState) and second.state.sequence == 200


def test_changed_templates_are_sent_at_once_and_bad_sessions_start_anew() -> None:
    ts = TargetSettings("192.0.2.9", 2055, "ipfix")
    a = Target(ts, encoder_for("ipfix"))
    a.clock.sent_datagrams(S, [True, False])
    doc = a.session_doc()
    b = Target(ts, encoder_for("ipfix"), ctx=ExportContext(sampling=Sampling(10)))  # other options: other templates
    b.resume(doc)
    assert b.clock.due(2 * S)  # sent with the next export
    c = Target(ts, encoder_for("ipfix"))
    c.resume(doc)
    assert not c.clock.due(2 * S) and c.clock.packets_since == 1
    with pytest.raises(ValueError, match="unreadable session"):
        c.resume({"state": {"sequence": -1}})
    for blob in (b"", b"{", b"[]", b'{"format": 99}', b'{"format": 1, "boot_unix_ms": "x", "targets": {}}'):
        assert read_session(blob) == Kept()
    # two targets at one collector differ by version or source address
    assert len({target_key(parse_target(t)) for t in ("192.0.2.9:2055/9", "192.0.2.9:2055/ipfix",
                                                       "192.0.2.9:2055/9,src-address=192.0.2.1")}) == 3


def test_a_taken_port_is_noted_and_another_used() -> None:
    busy = listener()
    t = Target(TargetSettings("127.0.0.1", 9, "9"), encoder_for("9"))
    t.bind_port = busy.getsockname()[1]
    t.open()
    assert t.rebind_error is not None and "not available again" in t.rebind_error
    assert t.local_port() not in (None, t.bind_port)
    t.close()
    busy.close()


# --------------------------------------------------------------------------------------------
# Settings: sampling kept but off, options by default, check's target table
# --------------------------------------------------------------------------------------------


def test_sampling_values_are_kept_but_not_applied_with_packet_sampling_no() -> None:
    s = Settings(packet_sampling=False, sampling_interval=10, sampling_space=90)
    assert (s.sampling_interval, s.sampling_space, s.sampling) == (10, 90, (0, 0))
    [warning] = s.warnings()
    assert "sampling-interval=10 sampling-space=90 are kept but not applied: packet-sampling=no" in warning
    text = print_settings(s)
    assert "    sampling-interval: 10\n       sampling-space: 90\n" in text
    assert Settings(packet_sampling=True, sampling_interval=10).warnings() == []
    assert Settings(sampling_space=5).sampling == (0, 0)  # no interval needed while sampling is off


def test_target_options_for_options_records() -> None:
    t = parse_target("192.0.2.9/ipfix,interface-names=yes,sequence=rfc")
    assert (t.interface_names, t.sequence) == (True, "rfc")
    d = parse_target("192.0.2.9/ipfix")
    assert (d.interface_names, d.sequence) == (False, "flows")
    with pytest.raises(Exception, match="sequence 'all' is not one of flows, rfc"):
        parse_target("192.0.2.9/ipfix,sequence=all")


def test_check_prints_the_target_table_as_routeros() -> None:
    s = Settings(targets=(TargetSettings("192.0.2.9", 2055, "ipfix"), TargetSettings("2001:db8::9", 9995, "5"),
                          TargetSettings("192.0.2.10", 2056, "9", src_address="192.0.2.1")))
    lines = print_settings(s).split("/ip traffic-flow target print\n")[1].splitlines()
    assert lines[0].startswith("Columns: SRC-ADDRESS, DST-ADDRESS, PORT, VERSION, ")
    assert [ln.split()[:5] for ln in lines[2:5]] == [["0", "0.0.0.0", "192.0.2.9", "2055", "IPFIX"],
                                                     ["1", "::", "2001:db8::9", "9995", "5"],
                                                     ["2", "192.0.2.1", "192.0.2.10", "2056", "9"]]
