"""Interface faults: a named interface goes down and up, is deleted, and comes back.

pyflow meters one named interface, ``pfif0`` (a veth whose peer ``pfif1`` is
in the same namespace: frames sent out of pfif1 arrive on pfif0), with XDP or
with TC, and exports IPFIX to nfcapd and to a test-owned tap.  The test:

1. sends a flow; takes pfif0 down (frames sent meanwhile never arrive: the
   interface's own counters prove it) and up again; sends more -- the program
   is still attached and every frame that arrived is counted;
2. deletes pfif0 (and its peer): no crash, and the flows it had in the cache
   are still exported (the tap sees the record, with pfif0's old ifindex);
3. re-creates pfif0 under the same name (a new ifindex): pyflow attaches to
   it again and meters it; frames sent there are counted;
4. stops pyflow: nfcapd has, per in-interface, exactly what arrived.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from tests.integration.collect import Tap
from tests.integration.netns import Pair, ip, udp_socket_in, veth_pair
from tests.integration.procs import nfdump_records, pyflow_in, wait_drained
from tests.integration.reliability import link_stats, nfcapd, send_frames, wait_until
from tests.integration.test_follow import ifindex

NFCAPD_PORT = 21401
IF, PEER = "pfif0", "pfif1"


@pytest.fixture
def pair() -> Iterator[Pair]:
    with veth_pair("if") as p:
        yield p


def make_link(ns: str) -> int:
    ip("-n", ns, "link", "add", IF, "type", "veth", "peer", "name", PEER)
    for dev in (IF, PEER):
        ip("-n", ns, "link", "set", dev, "addrgenmode", "none")
        ip("-n", ns, "link", "set", dev, "multicast", "off", "arp", "off", "up")
    return ifindex(ns, IF)


def frames(sport: int, n: int) -> list[bytes]:
    return [bytes(Ether(src="02:00:00:00:88:01", dst="02:00:00:00:88:02") / IP(src="10.88.0.1", dst="10.88.0.2")
                  / UDP(sport=sport, dport=9) / (b"i" * 72))] * n  # IP total length 100


@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_named_interface_down_up_deleted_and_recreated(pair: Pair, tmp_path: Path, hook: str) -> None:
    ns = pair.b
    first_idx = make_link(ns)
    tap = Tap(udp_socket_in(ns))
    try:
        with nfcapd(ns, tmp_path, NFCAPD_PORT) as collector:
            with pyflow_in(ns, "--interface", f"{IF},hook={hook}", "--inactive-flow-timeout", "1s",
                           "--sweep-interval", "200ms", "--control-socket", "",
                           "--target", f"127.0.0.1:{NFCAPD_PORT}/ipfix",
                           "--target", f"127.0.0.1:{tap.port}/ipfix") as flow:
                flow.wait_for_line(f"metering {IF}")
                send_frames(ns, PEER, frames(7101, 7))

                # down: nothing arrives (and nothing is metered); up: metered again, same attachment
                ip("-n", ns, "link", "set", IF, "down")
                before = link_stats(ns, IF)["rx_packets"]
                send_frames(ns, PEER, frames(7102, 3))
                assert link_stats(ns, IF)["rx_packets"] == before  # never arrived
                ip("-n", ns, "link", "set", IF, "up")
                wait_until(f"{IF} up", lambda: "LOWER_UP" in ip("-n", ns, "link", "show", IF).stdout, timeout=10)
                send_frames(ns, PEER, frames(7101, 5))
                if hook == "xdp":
                    assert "prog/xdp" in ip("-n", ns, "-d", "link", "show", IF).stdout
                wait_until("12 packets received", lambda: link_stats(ns, IF)["rx_packets"] >= before + 5)

                # deleted: its cached flow is still exported, with its old interface
                ip("-n", ns, "link", "del", IF)
                flow.wait_for_line(f"{IF} (ifindex {first_idx}) is gone", timeout=10)
                rec = tap.wait_for(lambda r: r.get("L4_SRC_PORT") == 7101, timeout=20)
                assert rec.get("INPUT_SNMP") == first_idx, rec

                # re-created under the same name: metered again, on its new ifindex
                second_idx = make_link(ns)
                assert second_idx != first_idx
                wait_until(f"{IF} metered again",
                           lambda: sum(f"metering {IF} (ifindex {second_idx})" in ln for ln in flow.lines) == 1,
                           timeout=10)
                send_frames(ns, PEER, frames(7103, 4))
                wait_until("4 packets received", lambda: link_stats(ns, IF)["rx_packets"] >= 4)
                assert flow.stop() == 0, flow.output()
            log = flow.output()
            wait_drained(ns, [NFCAPD_PORT])
        rows = [r for r in nfdump_records(collector.flowdir) if r["sa"] == "10.88.0.1"]
    finally:
        tap.close()

    got: dict[tuple[int, int], int] = {}
    for r in rows:
        key = (int(r["in"]), int(r["sp"]))
        got[key] = got.get(key, 0) + int(r["ipkt"])
    assert got == {(first_idx, 7101): 12, (second_idx, 7103): 4}, (got, log)
    assert sum(int(r["ibyt"]) for r in rows) == 16 * 100
    assert "Traceback" not in log and "following interfaces:" not in log, log
