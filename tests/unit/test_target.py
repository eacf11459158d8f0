"""Targets: own socket, sequence, template clock; a failing one never disturbs the others."""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest

from pyflow.config import TargetSettings
from pyflow.export.context import ExportClock
from pyflow.export.registry import encoder_for
from pyflow.export.target import Target, TemplateClock
from pyflow.export.templates import IPV4_FLOW
from pyflow.records import addr_to_16, empty

S = 10**9


def batch(n: int, v6: bool = False) -> np.ndarray:
    r = empty(n)
    r["src_addr"] = addr_to_16("2001:db8::1" if v6 else "192.0.2.1")
    r["dst_addr"] = addr_to_16("2001:db8::2" if v6 else "198.51.100.2")
    r["ip_version"] = 6 if v6 else 4
    r["src_port"] = np.arange(n)
    r["packets"] = 1
    r["bytes"] = 100
    return r


def listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2)
    return s


def received(sock: socket.socket) -> list[bytes]:
    out = []
    sock.settimeout(0.2)
    try:
        while True:
            out.append(sock.recv(65535))
    except TimeoutError:
        return out


def set_ids(msg: bytes) -> list[int]:
    ids, off = [], 16
    while off + 4 <= len(msg):
        sid, length = struct.unpack_from("!HH", msg, off)
        ids.append(sid)
        off += length
    return ids


def data_records(msg: bytes) -> int:
    """IPv4 flow records in one IPFIX message (template 256, the default IPv4 layout)."""
    n, off = 0, 16
    while off + 4 <= len(msg):
        sid, length = struct.unpack_from("!HH", msg, off)
        if sid == 256:
            n += (length - 4) // IPV4_FLOW.record_length
        off += length
    return n


def test_failing_target_does_not_disturb_the_other() -> None:
    good_sock = listener()
    dead = listener()
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there any more: ICMP port unreachable
    good = Target(TargetSettings("127.0.0.1", good_sock.getsockname()[1], "ipfix"), encoder_for("ipfix"))
    bad = Target(TargetSettings("127.0.0.1", dead_port, "ipfix"), encoder_for("ipfix"))
    for t in (good, bad):
        t.open()
    clock = ExportClock(unix_ns=1_700_000_000 * S, uptime_ms=1000)
    for i in range(5):
        for t in (bad, good):
            t.export(batch(40), clock, i * S)
    got = received(good_sock)
    assert len(got) == good.stats.datagrams >= 5
    assert sum(len(set_ids(m)) for m in got) >= 5
    assert bad.stats.send_errors["econnrefused"] >= 1
    assert good.stats.send_errors == {}
    # sequence numbers of the good target: data records before each message
    seqs = [struct.unpack_from("!I", m, 8)[0] for m in got]
    counts = [data_records(m) for m in got]
    assert seqs == [sum(counts[:i]) for i in range(len(counts))]
    assert sum(counts) == 5 * 40
    for t in (good, bad):
        t.close()
    good_sock.close()


def test_templates_first_then_by_packet_count_and_time() -> None:
    sock = listener()
    t = Target(TargetSettings("127.0.0.1", sock.getsockname()[1], "ipfix", v9_template_refresh=3,
                              v9_template_timeout_ns=60 * S), encoder_for("ipfix"))
    t.open()
    clock = ExportClock(unix_ns=1_700_000_000 * S, uptime_ms=1000)
    t.export(empty(0), clock, 0)  # announce at start: a template-only message
    for i in range(1, 5):
        t.export(batch(1), clock, i * S)
    t.export(batch(1), clock, 100 * S)  # the timeout has passed
    msgs = received(sock)
    with_templates = [2 in set_ids(m) for m in msgs]
    # start; then after 3 data packets; then because 60 s passed
    assert with_templates == [True, False, False, False, True, True]
    t.close()
    sock.close()


def test_ipv6_not_sent_where_the_format_cannot_carry_it() -> None:
    class NoV6:
        name = "test"
        uses_templates = False
        carries_ipv6 = False
        seen: list[int] = []

        def initial_state(self, observation_domain: int) -> None:
            return None

        def encode(self, records, state, clock, send_templates, max_size, ctx):  # type: ignore[no-untyped-def]
            self.seen.append(len(records))
            return [b"x"], state

    sock = listener()
    enc = NoV6()
    t = Target(TargetSettings("127.0.0.1", sock.getsockname()[1], "5"), enc)
    t.open()
    t.export(np.concatenate([batch(3), batch(2, v6=True)]), ExportClock(0, 0), 0)
    assert enc.seen == [3]
    assert t.stats.not_representable == 2
    t.close()
    sock.close()


@pytest.mark.parametrize(("refresh", "sent", "due"), [(20, 19, False), (20, 20, True), (1, 1, True)])
def test_template_clock_packet_rule(refresh: int, sent: int, due: bool) -> None:
    c = TemplateClock(refresh, 30 * 60 * S)
    assert c.due(0)
    c.sent(0, 1, with_templates=True)
    c.sent(S, sent, with_templates=False)
    assert c.due(2 * S) is due
