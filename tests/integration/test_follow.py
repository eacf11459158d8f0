"""interfaces=all follows the host: new links are metered, renamed ones keep their flows,
removed ones are let go of, and every packet on them still reaches the collector.

pyflow runs in namespace b with ``--interface all`` and exports IPFIX to nfcapd;
the test adds a veth pair inside b, sends frames through it, renames one end,
sends more, deletes the pair, and reads nfcapd's records with nfdump.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from tests.integration.netns import Pair, ip
from tests.integration.procs import REPO, nfcapd_in, nfdump_records, pyflow_in

NFCAPD_PORT = 20601


def send_on(pair: Pair, ns: str, dev: str, frames: list[bytes], tmp: Path, name: str) -> None:
    path = tmp / f"{name}.pcap"
    wrpcap(str(path), [Ether(f) for f in frames])
    res = pair.run(ns, sys.executable, "-m", "tests.integration.sendpkts", dev, str(path), cwd=str(REPO), timeout=60)
    assert res.returncode == 0, res.stderr


def ifindex(ns: str, dev: str) -> int:
    import json

    return int(json.loads(ip("-n", ns, "-j", "link", "show", dev).stdout)[0]["ifindex"])


def test_all_follows_links_added_renamed_and_removed(pair: Pair, tmp_path: Path) -> None:
    ns = pair.b
    frame = bytes(Ether(src="02:00:00:00:77:01", dst="02:00:00:00:77:02") / IP(src="10.77.0.1", dst="10.77.0.2")
                  / UDP(sport=7001, dport=7002) / (b"f" * 72))  # IP total length 100
    with nfcapd_in(ns, tmp_path, NFCAPD_PORT) as nfcapd:
        with pyflow_in(ns, "--interface", "all", "--target", f"127.0.0.1:{NFCAPD_PORT}/ipfix",
                       "--inactive-flow-timeout", "1s") as flow:
            flow.wait_for_line(f"metering {pair.b_if}")
            t0 = time.monotonic()
            ip("-n", ns, "link", "add", "pfnew0", "type", "veth", "peer", "name", "pfnew1")
            for dev in ("pfnew0", "pfnew1"):
                ip("-n", ns, "link", "set", dev, "multicast", "off", "up")
            flow.wait_for_line("metering pfnew0", timeout=10)
            flow.wait_for_line("metering pfnew1", timeout=10)
            attach_latency = time.monotonic() - t0
            new_idx = ifindex(ns, "pfnew0")
            send_on(pair, ns, "pfnew1", [frame] * 7, tmp_path, "before")  # arrives on pfnew0

            ip("-n", ns, "link", "set", "pfnew0", "down")
            ip("-n", ns, "link", "set", "pfnew0", "name", "pfren0")
            ip("-n", ns, "link", "set", "pfren0", "up")
            flow.wait_for_line("pfnew0 (ifindex", timeout=10)
            flow.wait_for_line("is now called pfren0", timeout=10)
            assert ifindex(ns, "pfren0") == new_idx
            send_on(pair, ns, "pfnew1", [frame] * 5, tmp_path, "after")

            ip("-n", ns, "link", "del", "pfren0")  # takes its peer with it
            flow.wait_for_line("pfren0 (ifindex", timeout=10)
            flow.wait_for_line("is gone", timeout=10)
            assert flow.stop() == 0, flow.output()
        log = flow.output()
    assert "Sequence Errors: 0, Bad Packets: 0" in nfcapd.summary(), nfcapd.proc.output()
    ours = [r for r in nfdump_records(nfcapd.flowdir) if r["sa"] == "10.77.0.1"]
    # every packet sent through the followed link, before and after its rename, on its one ifindex
    assert sum(int(r["ipkt"]) for r in ours) == 12, (ours, log)
    assert sum(int(r["ibyt"]) for r in ours) == 1200
    assert {int(r["in"]) for r in ours} == {new_idx}
    assert "Traceback" not in log and "following interfaces:" not in log, log
    print(f"new interfaces metered {attach_latency:.2f} s after they came up")
