"""The agent's footprint and how late idle flows reach the collector.

Footprint: start-up time (process start to attached and exporting; to the first packet
metered), steady RSS (/proc/PID/status VmRSS), and the agent's CPU with 100k flows cached
(default settings: it sweeps when flows fall due, at least every 2 s, the end-idle timeout).

Lateness: with inactive-flow-timeout 1 s, each of 100 one-packet flows, sent 20 ms apart,
must reach a collector socket within 2 s of its packet.  Lateness = when the first record of
the flow arrived minus when the test sent its packet (both on this machine's clock), so the
exporters' own timestamps and clocks do not matter.  pyflow against softflowd and fprobe set
to the same 1 s idle timeout and their shortest expiry scan.
"""

from __future__ import annotations

import select
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scapy.layers.inet import IP, UDP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402

from pyflow.collect import TemplateCache, decode  # noqa: E402
from tests.integration.netns import Pair, in_netns, veth_pair  # noqa: E402

PYFLOW = str(Path(sys.executable).with_name("pyflow"))
PORT = 20900


def proc_status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metered(pair: Pair) -> int:
    text = in_netns(pair.b, lambda: urllib.request.urlopen("http://127.0.0.1:9796/metrics", timeout=5).read().decode())
    return int(sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith("pyflow_packets_metered_total")))


def raw_sender(pair: Pair) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind((pair.a_if, 0))
        return s

    return in_netns(pair.a, make)


def frame(pair: Pair, sport: int, dport: int = 9) -> bytes:
    return bytes(Ether(src=pair.macs["a"], dst=pair.macs["b"]) / IP(src=pair.a_v4, dst=pair.b_v4)
                 / UDP(sport=sport, dport=dport) / (b"f" * 32))


def wait_line(proc: subprocess.Popen[str], needle: str, timeout: float = 60.0) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if needle in line:
            return
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"no line with {needle!r}")


def footprint(pair: Pair) -> list[str]:
    t0 = time.monotonic()
    proc = subprocess.Popen(["ip", "netns", "exec", pair.b, PYFLOW, "run", "--interface", pair.b_if,
                             "--target", "127.0.0.1:2055/ipfix", "--inactive-flow-timeout", "10m",
                             "--cache-entries", "256k", "--control-socket", ""],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    try:
        wait_line(proc, "exporting to")
        started = time.monotonic() - t0
        sender = raw_sender(pair)
        sender.send(frame(pair, 1))
        deadline = time.monotonic() + 10
        while metered(pair) < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        first = time.monotonic() - t0
        rss_idle = proc_status(proc.pid, "VmRSS") / 1024
        # 100k flows: distinct (source port, destination port) pairs, sent as fast as the socket goes
        n = 0
        for dport in range(10, 12):
            for sport in range(1, 50_001):
                sender.send(frame(pair, sport, dport))
                n += 1
        deadline = time.monotonic() + 30
        while metered(pair) < n + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.0)  # two sweeps over the full cache before measuring
        c0, w0 = proc_cpu_s(proc.pid), time.monotonic()
        time.sleep(10.0)
        cpu = (proc_cpu_s(proc.pid) - c0) / (time.monotonic() - w0)
        rss = proc_status(proc.pid, "VmRSS") / 1024
        sender.close()
        out += [
            f"| start-up: process start to attached and exporting | {started:.2f} s |",
            f"| start-up: process start to the first packet metered | {first:.2f} s |",
            f"| steady RSS, idle | {rss_idle:.0f} MiB |",
            f"| steady RSS, 100k flows cached | {rss:.0f} MiB |",
            f"| agent CPU, 100k flows cached, default sweeps | {100 * cpu:.1f} % of one core |",
        ]
    finally:
        proc.terminate()
        proc.wait(60)
    return out


def lateness(pair: Pair, kind: str) -> list[float]:
    netns = ["ip", "netns", "exec", pair.b]
    if kind == "pyflow":
        argv = [*netns, PYFLOW, "run", "--interface", pair.b_if, "--target", f"127.0.0.1:{PORT}/9",
                "--inactive-flow-timeout", "1s", "--control-socket", ""]
    elif kind == "softflowd":
        argv = [*netns, "softflowd", "-d", "-i", pair.b_if, "-n", f"127.0.0.1:{PORT}", "-v", "5",
                "-t", "udp=1", "-t", "general=1", "-t", "expint=1"]
    else:
        argv = [*netns, "fprobe", "-l", "2", "-i", pair.b_if, "-d", "1", "-s", "1", "-n", "5", f"127.0.0.1:{PORT}"]
    sock = in_netns(pair.b, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sock.bind(("127.0.0.1", PORT))
    arrived: dict[int, float] = {}
    stop = threading.Event()
    cache = TemplateCache()

    def receive() -> None:
        while not stop.is_set():
            if not select.select([sock], [], [], 0.1)[0]:
                continue
            data, peer = sock.recvfrom(65535)
            now = time.time()
            for r in decode(data, peer, cache).records:
                if r.dport == 9 and r.sport is not None:
                    arrived.setdefault(r.sport, now)

    rx = threading.Thread(target=receive, daemon=True)
    rx.start()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sent: dict[int, float] = {}
    try:
        if kind == "pyflow":
            wait_line(proc, "exporting to")
        else:
            time.sleep(1.5)  # no ready line from the libpcap peers
        sender = raw_sender(pair)
        for i in range(100):
            sport = 40000 + i
            sender.send(frame(pair, sport))
            sent[sport] = time.time()
            time.sleep(0.02)
        sender.close()
        deadline = time.monotonic() + 30
        while len(arrived) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(30)
        stop.set()
        rx.join(2)
        sock.close()
    return [arrived[p] - t for p, t in sent.items() if p in arrived] + [float("inf")] * (len(sent) - len(arrived))


def run() -> None:
    print("## Agent footprint\n")
    with veth_pair("fp") as pair:
        rows = footprint(pair)
    print("| measure | value |\n|---|---:|")
    print("\n".join(rows))
    print()
    print("## Export lateness (inactive-flow-timeout 1 s; 100 one-packet flows)\n")
    print("| exporter | flows reported | median s | p99 s | max s |\n|---|---:|---:|---:|---:|")
    for kind in ("pyflow", "softflowd", "fprobe"):
        if kind != "pyflow" and shutil.which(kind) is None:
            print(f"| {kind} | not installed | | | |")
            continue
        with veth_pair("lt") as pair:
            late = sorted(lateness(pair, kind))
        got = sum(x != float("inf") for x in late)
        p99 = late[min(len(late) - 1, int(0.99 * len(late)))]
        print(f"| {kind} | {got}/100 | {statistics.median(late):.2f} | {p99:.2f} | {late[-1]:.2f} |")
    print()
