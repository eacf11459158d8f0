"""A router in the middle: interfaces, next hop, prefix masks, NAT and field toggles on the wire.

Three namespaces, client c -- router r -- server s (netns.routed_hosts).
pyflow runs in r on both of its links and exports IPFIX to a tshark capture
on r's loopback (or, for the own-export test, to a collector in s reached
through a metered link).  The client talks to the server with real sockets,
so r really routes (and, with nftables masquerade, NATs) every packet.
Everything asserted is read from tshark's decoding of the datagrams.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.integration.netns import Routed, in_netns, routed_hosts
from tests.integration.procs import Proc, pyflow_in, tshark_capture_in, walk
from tests.integration.reliability import wait_until

PORT = 20500
PAYLOAD = 100  # UDP payload bytes: IPv4 datagram 128 bytes, IPv6 148


@pytest.fixture
def routed() -> Iterator[Routed]:
    with routed_hosts("r") as t:
        yield t


# -- traffic -----------------------------------------------------------------------


class Sink:
    """UDP sockets bound in s; records the (address, port) each datagram came from."""

    def __init__(self, t: Routed, addrs: list[tuple[str, int]]) -> None:
        self.seen: list[tuple[str, int, str, int]] = []  # (src, sport, dst, dport) as s saw it
        self.socks = []
        for host, port in addrs:
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET

            def make(fam: int = fam, host: str = host, port: int = port) -> socket.socket:
                s = socket.socket(fam, socket.SOCK_DGRAM)
                s.bind((host, port))
                s.settimeout(0.2)
                return s

            self.socks.append(in_netns(t.s, make))
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._recv, args=(s,), daemon=True) for s in self.socks]
        for th in self._threads:
            th.start()

    def _recv(self, s: socket.socket) -> None:
        local = s.getsockname()
        while not self._stop.is_set():
            try:
                _, peer = s.recvfrom(65535)
            except OSError:
                continue
            self.seen.append((peer[0], peer[1], local[0], local[1]))

    def wait(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen) < n:
            assert time.monotonic() < deadline, f"the server got {len(self.seen)} of {n} datagrams"
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(2)
        for s in self.socks:
            s.close()


def send_udp(ns: str, src: str, sport: int, dst: str, dport: int, count: int) -> None:
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET

    def go() -> None:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.bind((src, sport))
            for _ in range(count):
                s.sendto(b"p" * PAYLOAD, (dst, dport))

    in_netns(ns, go)


# -- decoding ----------------------------------------------------------------------


def tshark_json(pcap: Path, port: int) -> list[dict[str, Any]]:
    out = subprocess.run(["tshark", "-n", "-r", str(pcap), "-d", f"udp.port=={port},cflow", "-Y", "cflow",
                          "-T", "json"], capture_output=True, text=True, check=True).stdout
    return [p["_source"]["layers"]["cflow"] for p in json.loads(out)]


def flow_records(pcap: Path, port: int) -> list[dict[str, Any]]:
    """Every decoded flow record: dicts of cflow fields (values as tshark prints them)."""
    return [d for cflow in tshark_json(pcap, port) for d in walk(cflow)
            if "cflow.protocol" in d and ("cflow.srcaddr" in d or "cflow.srcaddrv6" in d)]


def template_fields(pcap: Path, port: int) -> dict[int, list[int]]:
    """Template id -> the IE ids of its fields, from the template sets tshark decoded."""
    out: dict[int, list[int]] = {}
    for cflow in tshark_json(pcap, port):
        for d in walk(cflow):
            if "cflow.template_id" in d and "cflow.template_field_count" in d:
                types = [int(f["cflow.template_ipfix_field_type"]) for f in walk(d)
                         if "cflow.template_ipfix_field_type" in f]
                out[int(d["cflow.template_id"])] = types
    return out


def by_flow(records: list[dict[str, Any]]) -> dict[tuple[str, str, int, int], dict[str, Any]]:
    """(src, dst, src port, dst port) -> the record; packets/octets summed over its records."""
    out: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    for r in records:
        key = (r.get("cflow.srcaddr") or r["cflow.srcaddrv6"], r.get("cflow.dstaddr") or r["cflow.dstaddrv6"],
               int(r.get("cflow.srcport", 0)), int(r.get("cflow.dstport", 0)))
        if key in out:
            out[key]["cflow.packets"] = str(int(out[key]["cflow.packets"]) + int(r["cflow.packets"]))
            out[key]["cflow.octets"] = str(int(out[key]["cflow.octets"]) + int(r["cflow.octets"]))
        else:
            out[key] = dict(r)
    return out


@contextmanager
def meter_and_capture(t: Routed, tmp: Path, *args: str, capture_ns: str | None = None,
                      capture_if: str = "lo") -> Iterator[tuple[Path, Proc]]:
    """pyflow in r with ``args`` and a tshark capture of its IPFIX port; both stopped on exit,
    pyflow first (SIGTERM exports everything cached), then the capture once it has every datagram."""
    pcap = tmp / "ipfix.pcap"
    with ExitStack() as stack:
        capture = stack.enter_context(tshark_capture_in(capture_ns or t.r, pcap, [PORT], iface=capture_if))
        with pyflow_in(t.r, "--inactive-flow-timeout", "1s", "--active-flow-timeout", "10m", *args) as flow:
            yield pcap, flow
            assert flow.stop() == 0, flow.output()
        m = re.search(r": (\d+) records in (\d+) datagrams", flow.output())
        assert m, flow.output()
        capture.wait_captured(int(m.group(2)))


def own_export_count(ns: str, metrics: str = "127.0.0.1:9796") -> int:
    """pyflow_packets_not_metered_total{reason="own_export"} summed, from the agent's endpoint in ``ns``."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = in_netns(ns, lambda: urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode())
    return int(sum(s.value for fam in text_string_to_metric_families(text) if fam.name == "pyflow_packets_not_metered"
                   for s in fam.samples if s.labels.get("reason") == "own_export" and s.name.endswith("_total")))


# -- tests -------------------------------------------------------------------------


def test_routed_flows_carry_interfaces_next_hop_and_masks(routed: Routed, tmp_path: Path) -> None:
    t = routed
    r_c, r_s = t.ifindex(t.r, t.r_c), t.ifindex(t.r, t.r_s)
    sink = Sink(t, [(t.far_v4, 5001), (t.s_v4, 5002), (t.far_v6, 5003)])
    try:
        with meter_and_capture(t, tmp_path, "--interface", t.r_c, "--interface", t.r_s,
                               "--target", f"127.0.0.1:{PORT}/ipfix") as (pcap, _):
            send_udp(t.c, t.c_v4, 41001, t.far_v4, 5001, 5)  # routed via the server's link address
            send_udp(t.c, t.c_v4, 41002, t.s_v4, 5002, 3)  # directly connected to r
            send_udp(t.c, t.c_v6, 41003, t.far_v6, 5003, 4)
            send_udp(t.s, t.far_v4, 5011, t.c_v4, 41009, 2)  # the other way: in on r_s, out on r_c
            sink.wait(12)
    finally:
        sink.close()
    flows = by_flow(flow_records(pcap, PORT))
    want = {
        # key: (packets, octets, in, out, next hop, src mask, dst mask)
        (t.c_v4, t.far_v4, 41001, 5001): (5, 5 * 128, r_c, r_s, t.s_v4, 24, 24),
        (t.c_v4, t.s_v4, 41002, 5002): (3, 3 * 128, r_c, r_s, "0.0.0.0", 24, 24),
        (t.c_v6, t.far_v6, 41003, 5003): (4, 4 * 148, r_c, r_s, t.s_v6, 64, 48),
        (t.far_v4, t.c_v4, 5011, 41009): (2, 2 * 128, r_s, r_c, "0.0.0.0", 24, 24),
    }
    got = {}
    for key in want:
        r = flows.get(key)
        assert r is not None, (key, sorted(flows))
        got[key] = (int(r["cflow.packets"]), int(r["cflow.octets"]), int(r["cflow.inputint"]),
                    int(r["cflow.outputint"]), r.get("cflow.nexthop") or r.get("cflow.nexthopv6"),
                    int(r.get("cflow.srcmask") or r["cflow.srcmaskv6"]),
                    int(r.get("cflow.dstmask") or r["cflow.dstmaskv6"]))
    assert got == want
    # the client's TTL before r decrements it, and the first datagram's UDP length
    r = flows[(t.c_v4, t.far_v4, 41001, 5001)]
    assert (int(r["cflow.ttl_min"]), int(r["cflow.ttl_max"]), int(r["cflow.udp_length"])) == (64, 64, 108)


def test_egress_metering_and_own_exports_over_a_metered_link(routed: Routed, tmp_path: Path) -> None:
    """Egress on r_s only; the collector sits in s, so every export datagram leaves through the
    very interface pyflow meters on egress: none of them may come back as a flow."""
    t = routed
    r_c, r_s = t.ifindex(t.r, t.r_c), t.ifindex(t.r, t.r_s)
    sink = Sink(t, [(t.far_v4, 5001)])
    try:
        with meter_and_capture(t, tmp_path, "--interface", f"{t.r_s},direction=egress",
                               "--target", f"{t.s_v4}:{PORT}/ipfix", capture_ns=t.s, capture_if=t.s_if) as (pcap, _):
            send_udp(t.c, t.c_v4, 41001, t.far_v4, 5001, 5)
            sink.wait(5)
            # the templates the agent sends as its sweep loop starts go out on r_s: the kernel leaves
            # them out, by name; the loop starts a moment after "exporting to", so wait for the count
            wait_until("the agent's first export datagram to be counted as own_export",
                       lambda: own_export_count(t.r) >= 1, timeout=15)
    finally:
        sink.close()
    records = flow_records(pcap, PORT)
    flows = by_flow(records)
    r = flows[(t.c_v4, t.far_v4, 41001, 5001)]
    assert (int(r["cflow.packets"]), int(r["cflow.octets"])) == (5, 5 * 128)
    assert (int(r["cflow.inputint"]), int(r["cflow.outputint"]), int(r["cflow.direction"])) == (r_c, r_s, 1)
    # the only flows are the test's: no record of pyflow's own datagrams to the collector
    assert [k for k in flows if k[3] == PORT] == []
    assert set(flows) == {(t.c_v4, t.far_v4, 41001, 5001)}, sorted(flows)


def test_fields_toggled_off_leave_the_template_and_counts_stay_exact(routed: Routed, tmp_path: Path) -> None:
    t = routed
    sink = Sink(t, [(t.far_v4, 5001), (t.far_v6, 5003)])
    off = "ttl=no,tcp-seq-num=no,src-mac-address=no,gateway=no,ip-total-length=no"
    try:
        with meter_and_capture(t, tmp_path, "--interface", t.r_c, "--target", f"127.0.0.1:{PORT}/ipfix",
                               "--ipfix", off) as (pcap, _):
            send_udp(t.c, t.c_v4, 41001, t.far_v4, 5001, 6)
            send_udp(t.c, t.c_v6, 41003, t.far_v6, 5003, 2)
            sink.wait(8)
    finally:
        sink.close()
    templates = template_fields(pcap, PORT)
    flow_templates = {tid: ies for tid, ies in templates.items() if 4 in ies}  # protocolIdentifier: flow templates
    assert len(flow_templates) == 2, templates
    gone = {52, 53, 184, 56, 15, 62, 25, 26}  # min/max TTL, TCP seq, source MAC, next hop v4/v6, min/max length
    for ies in flow_templates.values():
        assert not gone & set(ies), ies
        assert {1, 2, 7, 11, 10, 14, 9, 13} <= set(ies) or {1, 2, 7, 11, 10, 14, 29, 30} <= set(ies), ies
    flows = by_flow(flow_records(pcap, PORT))
    got = {k: (int(r["cflow.packets"]), int(r["cflow.octets"])) for k, r in flows.items()}
    assert got == {(t.c_v4, t.far_v4, 41001, 5001): (6, 6 * 128), (t.c_v6, t.far_v6, 41003, 5003): (2, 2 * 148)}
    r = flows[(t.c_v4, t.far_v4, 41001, 5001)]
    assert "cflow.ttl_min" not in r and "cflow.nexthop" not in r and "cflow.srcmac" not in r


def metric_total(ns: str, name: str, metrics: str = "127.0.0.1:9796") -> int:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = in_netns(ns, lambda: urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode())
    return int(sum(s.value for fam in text_string_to_metric_families(text) if fam.name == name
                   for s in fam.samples if s.name.endswith("_total")))


def wait_metric(ns: str, name: str, at_least: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (n := metric_total(ns, name)) < at_least:
        assert time.monotonic() < deadline, f"{name} stayed at {n} (< {at_least})"
        time.sleep(0.1)


def test_masquerade_gives_post_nat_tuple_and_nat_events(tmp_path: Path) -> None:
    from tests.integration.test_host import nat_router

    with nat_router("n") as t:
        sink = Sink(t, [(t.far_v4, 5001)])
        try:
            with meter_and_capture(t, tmp_path, "--interface", t.r_c, "--interface", t.r_s,
                                   "--target", f"127.0.0.1:{PORT}/ipfix", "--ipfix", "nat-events=yes") as (pcap, _):
                send_udp(t.c, t.c_v4, 41001, t.far_v4, 5001, 3)
                sink.wait(3)
                wait_metric(t.r, "pyflow_nat_event_records", 1)  # the create event is out

                def flush() -> None:
                    from pyroute2 import Conntrack

                    with Conntrack() as c:
                        c.flush()

                in_netns(t.r, flush)
                wait_metric(t.r, "pyflow_nat_event_records", 2)  # and the delete
        finally:
            sink.close()
        seen_src, seen_sport = {(a, p) for a, p, _, _ in sink.seen}.pop()  # what the server saw: post-NAT
        assert seen_src == t.r_s_v4 and 20000 <= seen_sport <= 20999
        records = flow_records(pcap, PORT)
        flows = by_flow([r for r in records if "cflow.packets" in r])
        r = flows[(t.c_v4, t.far_v4, 41001, 5001)]  # metered as it came in on r_c: pre-NAT key
        assert (int(r["cflow.packets"]), int(r["cflow.octets"])) == (3, 3 * 128)
        assert (r["cflow.post_natsource_ipv4_address"], int(r["cflow.post_naptsource_transport_port"]),
                r["cflow.post_natdestination_ipv4_address"], int(r["cflow.post_naptdestination_transport_port"])) == (
                    seen_src, seen_sport, t.far_v4, 5001)
        events = sorted(
            (int(e["cflow.nat_event"]), e["cflow.srcaddr"], int(e["cflow.srcport"]),
             e["cflow.post_natsource_ipv4_address"], int(e["cflow.post_naptsource_transport_port"]))
            for e in flow_records(pcap, PORT) if "cflow.nat_event" in e and int(e["cflow.nat_event"]) != 0)
        assert events == [(4, t.c_v4, 41001, seen_src, seen_sport), (5, t.c_v4, 41001, seen_src, seen_sport)]
