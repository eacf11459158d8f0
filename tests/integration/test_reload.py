"""SIGHUP re-reads the config file and applies it without losing a count; packet sampling end to end.

Host a sends frames to host b over a veth; pyflow meters b's interface from a
TOML config file and exports IPFIX to nfcapd collectors inside b; nfdump reads
what they stored.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from tests.integration.netns import Pair
from tests.integration.procs import REPO, agent_config, nfcapd_in, nfdump_records, pyflow_in

PORT_A, PORT_B = 20701, 20702

def write_config(path: Path, pair: Pair, cache: str, ttl: str, with_b: bool, sampling: str = "") -> None:
    path.write_text(agent_config(pair.b_if, [PORT_A, PORT_B] if with_b else [PORT_A], cache, traffic_flow=sampling,
                                 sections=f'\n[ipfix]\nttl = "{ttl}"\n',
                                 pyflow='metrics-address = ""\ncontrol-socket = ""\n'))


def frames(pair: Pair, sport: int, n: int) -> list[Ether]:
    e = Ether(src=pair.macs["a"], dst=pair.macs["b"])
    return [e / IP(src=pair.a_v4, dst=pair.b_v4) / UDP(sport=sport, dport=9) / (b"r" * 72)] * n  # IP length 100


def send(pair: Pair, pkts: list[Ether], tmp: Path, name: str, cpu: int | None = None) -> None:
    path = tmp / f"{name}.pcap"
    wrpcap(str(path), pkts)
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    res = pair.run(pair.a, *pin, sys.executable, "-m", "tests.integration.sendpkts", pair.a_if, str(path),
                   cwd=str(REPO), timeout=60)
    assert res.returncode == 0, res.stderr


def totals(flowdir: Path, sport: int) -> tuple[int, int]:
    rows = [r for r in nfdump_records(flowdir) if r["sp"] == str(sport)]
    return sum(int(r["ipkt"]) for r in rows), sum(int(r["ibyt"]) for r in rows)


def test_sighup_swaps_program_adds_target_and_loses_nothing(pair: Pair, tmp_path: Path) -> None:
    conf = tmp_path / "pyflow.toml"
    write_config(conf, pair, cache="4k", ttl="yes", with_b=False)
    with nfcapd_in(pair.b, tmp_path, PORT_A) as col_a, nfcapd_in(pair.b, tmp_path, PORT_B) as col_b:
        with pyflow_in(pair.b, "--config", str(conf)) as flow:
            send(pair, frames(pair, 30001, 40), tmp_path, "before")
            # the flow is still in the kernel cache when the program is swapped: its 40 packets
            # must leave from the old maps, the next 25 are counted by the new program
            write_config(conf, pair, cache="8k", ttl="no", with_b=True)
            flow.p.send_signal(signal.SIGHUP)
            flow.wait_for_line("reload: settings applied", timeout=60)
            send(pair, frames(pair, 30001, 25), tmp_path, "after")
            assert flow.stop() == 0, flow.output()
        log = flow.output()
    assert "reload: new kernel program in place (cache-entries=8192)" in log, log
    assert "exporting to 127.0.0.1:20702/ipfix" in log
    assert "Sequence Errors: 0, Bad Packets: 0" in col_a.summary(), col_a.proc.output()
    assert "Sequence Errors: 0, Bad Packets: 0" in col_b.summary(), col_b.proc.output()
    assert totals(col_a.flowdir, 30001) == (65, 6500)  # target kept: everything, across the swap
    assert totals(col_b.flowdir, 30001) == (25, 2500)  # target added: what came after the reload


def test_a_bad_reload_keeps_the_running_settings(pair: Pair, tmp_path: Path) -> None:
    conf = tmp_path / "pyflow.toml"
    write_config(conf, pair, cache="4k", ttl="yes", with_b=False)
    with nfcapd_in(pair.b, tmp_path, PORT_A) as col_a:
        with pyflow_in(pair.b, "--config", str(conf)) as flow:
            conf.write_text(conf.read_text().replace('cache-entries = "4k"', 'cache-entries = "lots"'))
            flow.p.send_signal(signal.SIGHUP)
            flow.wait_for_line("the running settings stay", timeout=30)
            send(pair, frames(pair, 30002, 9), tmp_path, "still")
            assert flow.stop() == 0, flow.output()
        assert "cache-entries" in flow.output()
    assert totals(col_a.flowdir, 30002) == (9, 900)


def test_packet_sampling_meters_the_pattern_and_announces_it(pair: Pair, tmp_path: Path) -> None:
    """sampling-interval=1 sampling-space=1: every other packet.  The pattern position is per CPU,
    so the sender is pinned to one CPU (veth delivers on the sending CPU)."""
    conf = tmp_path / "pyflow.toml"
    write_config(conf, pair, cache="4k", ttl="yes", with_b=False,
                 sampling='packet-sampling = "yes"\nsampling-interval = 1\nsampling-space = 1\n')
    with nfcapd_in(pair.b, tmp_path, PORT_A) as col_a, pyflow_in(pair.b, "--config", str(conf)) as flow:
        send(pair, frames(pair, 30003, 20), tmp_path, "sampled", cpu=0)
        assert flow.stop() == 0, flow.output()
    assert "Sequence Errors: 0, Bad Packets: 0" in col_a.summary(), col_a.proc.output()
    # the kernel metered every other packet (10 of 20); nfcapd learnt the 1-in-2 rate from the
    # sampling options data and scales what it stores by it: 20 packets, 2000 bytes
    assert totals(col_a.flowdir, 30003) == (20, 2000)
    # nfcapd learnt the sampling from the options data: nfdump -E lists the exporter's sampler
    files = sorted(p for p in col_a.flowdir.rglob("nfcapd.*") if p.is_file())
    assert files, list(col_a.flowdir.rglob("*"))
    samplers = "".join(subprocess.run(["nfdump", "-E", str(f)], capture_output=True, text=True).stdout
                       for f in files)
    assert "Sampler" in samplers or "sampl" in samplers.lower(), samplers
