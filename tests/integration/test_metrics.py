"""The Prometheus endpoint, scraped over HTTP and parsed by prometheus_client, against known traffic."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from tests.integration.collect import Tap
from tests.integration.netns import Pair, in_netns, udp_socket_in
from tests.integration.procs import pyflow_in
from tests.integration.test_end_to_end import eth, send

METRICS = "127.0.0.1:19796"
CLOSED_PORT = 20499


def scrape(ns: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """One scrape over HTTP from inside ``ns``: {(sample name, labels): value}."""
    body = in_netns(ns, lambda: urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=10).read().decode())
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def total(m: dict, name: str, **labels: str) -> float:
    """Sum over every sample of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in m.items() if n == name and want <= lbl)


def test_metrics_tell_the_truth(pair: Pair, tmp_path: Path) -> None:
    e = eth(pair)
    v4 = {"src": pair.a_v4, "dst": pair.b_v4}
    frames = ([e / IP(**v4) / UDP(sport=42000 + i, dport=53) / (b"m" * 50) for i in range(8)] * 5
              + [e / IPv6(src=pair.a_v6, dst=pair.b_v6) / UDP(sport=42100, dport=53) / (b"6" * 30)] * 4
              + [Ether(src=pair.macs["a"], dst=pair.macs["b"], type=0x88B5) / (b"\x00" * 46)] * 3)  # not IP
    ours = {(pair.a_v4, 42000 + i): (5, 5 * (20 + 8 + 50)) for i in range(8)}
    ours[(pair.a_v6, 42100)] = (4, 4 * (40 + 8 + 30))

    tap, tap5 = Tap(udp_socket_in(pair.b)), Tap(udp_socket_in(pair.b))
    port, port5 = tap.port, tap5.port
    try:
        with pyflow_in(pair.b, "--interface", pair.b_if, "--inactive-flow-timeout", "1s", "--sweep-interval", "200ms",
                       "--metrics-address", METRICS, "--target", f"127.0.0.1:{port}/ipfix",
                       "--target", f"127.0.0.1:{port5}/5,src-address=127.0.0.1",
                       "--target", f"127.0.0.1:{CLOSED_PORT}/9") as flow:
            send(pair, frames, tmp_path, "traffic")
            deadline = time.monotonic() + 30
            while True:  # until every flow has left the cache (idle after 1 s), been sent and committed
                m = scrape(pair.b)
                idle = value(m, "pyflow_flow_records_total", reason="idle")
                if (idle >= 9 and value(m, "pyflow_flows_cached") == 0 and value(m, "pyflow_pending_sweeps") == 0
                        and value(m, "pyflow_flows_expired_total") == idle
                        and total(m, "pyflow_export_records_total", target=f"127.0.0.1:{port}/ipfix") == idle
                        and total(m, "pyflow_export_queued_records", target=f"127.0.0.1:{port}/ipfix") == 0
                        and total(m, "pyflow_export_queued_records", target=f"127.0.0.1:{port5}/5") == 0):
                    break  # this scrape is the one checked: a later one could see what came after
                assert time.monotonic() < deadline, flow.output()
                time.sleep(0.2)
            tap.drain(0.5)
            tap5.drain(0.5)
        records = tap.records()
    finally:
        tap.close()
        tap5.close()

    # The link also carries the hosts' own IPv6 multicast (MLD reports, router
    # solicitations); they are real packets, metered like ours. So the metrics are
    # checked against what the collector received, and our flows against what we sent.
    got = {(r.get("IPV4_SRC_ADDR") or r.get("IPV6_SRC_ADDR"), r["L4_SRC_PORT"]): (r["IN_PKTS"], r["IN_BYTES"])
           for r in records}
    assert {k: got.get(k) for k in ours} == ours
    metered_packets = sum(r["IN_PKTS"] for r in records)
    metered_bytes = sum(r["IN_BYTES"] for r in records)
    n_flows = len(records)
    n_v4 = sum(1 for r in records if r.get("IPV4_SRC_ADDR"))

    iface = {"interface": pair.b_if, "hook": "xdp"}
    assert value(m, "pyflow_program_info", mode="native", **iface) == 1 or value(
        m, "pyflow_program_info", mode="generic", **iface) == 1
    assert value(m, "pyflow_packets_metered_total", **iface) == metered_packets >= 44
    assert value(m, "pyflow_bytes_metered_total", **iface) == metered_bytes
    assert value(m, "pyflow_packets_not_metered_total", reason="not_ip", **iface) == 3
    assert value(m, "pyflow_packets_seen_total", **iface) == metered_packets + 3
    assert value(m, "pyflow_flows_created_total") == n_flows >= 9
    assert value(m, "pyflow_flows_expired_total") == n_flows
    assert value(m, "pyflow_flow_records_total", reason="idle") == n_flows
    assert value(m, "pyflow_cache_capacity_flows") == 65536
    assert value(m, "pyflow_accounting_gap_packets", interface=pair.b_if) == 0

    # what the targets say they sent is what arrived
    ipfix = {"target": f"127.0.0.1:{port}/ipfix", "version": "ipfix"}
    v5 = {"target": f"127.0.0.1:{port5}/5", "version": "5"}
    for lbl, t in ((ipfix, tap), (v5, tap5)):
        assert value(m, "pyflow_export_datagrams_total", **lbl) == len(t.datagrams) > 0
        assert value(m, "pyflow_export_bytes_total", **lbl) == sum(len(d) for d in t.datagrams)
    assert value(m, "pyflow_export_records_total", **ipfix) == n_flows
    assert value(m, "pyflow_export_records_total", **v5) == n_v4
    assert value(m, "pyflow_export_not_representable_records_total", **v5) == n_flows - n_v4
    assert value(m, "pyflow_export_template_datagrams_total", **ipfix) >= 1
    closed = {"target": f"127.0.0.1:{CLOSED_PORT}/9", "version": "9"}
    assert total(m, "pyflow_export_send_errors_total", error="econnrefused", **closed) >= 1
    assert total(m, "pyflow_export_send_errors_total", **ipfix) == 0

    assert value(m, "pyflow_sweep_duration_seconds_count") >= 1
    assert value(m, "pyflow_export_lateness_seconds_count", target=ipfix["target"]) == n_flows
    assert value(m, "pyflow_export_lateness_seconds_count", target=v5["target"]) == n_v4
    assert value(m, "pyflow_start_time_seconds") > 1.7e9
    assert total(m, "pyflow_build_info") == 1
    assert total(m, "process_resident_memory_bytes") > 0
