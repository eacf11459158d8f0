"""Live traffic on a veth: whole-machine CPU per million packets, pyflow against fprobe and softflowd.

Host a sends UDP frames over 1,000 flows to host b with trafgen (netsniff-ng) at a fixed
offered rate, then at the highest rate it reaches; b runs one meter at a time on its end
of the veth: nothing (the baseline), pyflow with native XDP, generic XDP and TC, fprobe and
softflowd (both libpcap).  For each run: packets b's interface received, the whole
machine's busy CPU time from /proc/stat (user + nice + system + irq + softirq + steal:
(the sender, the veth and the receive path, which runs in the sender's context, the meter
and its exporter together); the machine must be otherwise idle.  For pyflow, the packets it
metered (its Prometheus counters), which must equal the packets received.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration.netns import Pair, in_netns, veth_pair  # noqa: E402

FLOWS = 1000
USER_HZ = os.sysconf("SC_CLK_TCK")
PYFLOW = str(Path(sys.executable).with_name("pyflow"))

TRAFGEN_CONF = """\
{{
  eth(da={da}, sa={sa}, type=0x0800),
  ipv4(saddr={src}, daddr={dst}, ttl=64, proto=17),
  udp(sp=dinc(10000, {last}), dp=9),
  fill(0x42, 64),
}}
"""


def busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal


def rx_packets(pair: Pair) -> int:
    out = subprocess.run(["ip", "-n", pair.b, "-s", "-j", "link", "show", pair.b_if], capture_output=True,
                         text=True, check=True).stdout
    import json

    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def metered(pair: Pair) -> int:
    def get() -> str:
        return urllib.request.urlopen("http://127.0.0.1:9796/metrics", timeout=5).read().decode()

    text = in_netns(pair.b, get)
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("pyflow_packets_metered_total")))


def start_meter(pair: Pair, kind: str, tmp: Path) -> subprocess.Popen[str] | None:
    netns = ["ip", "netns", "exec", pair.b]
    if kind == "nothing":
        return None
    if kind.startswith("pyflow"):
        hook = {"pyflow xdp native": ["--xdp-mode", "native"], "pyflow xdp generic": ["--xdp-mode", "generic"],
                "pyflow tc": ["--hook", "tc"]}[kind]
        argv = [*netns, PYFLOW, "run", "--interface", pair.b_if, *hook, "--target", "127.0.0.1:2055/ipfix",
                "--control-socket", ""]
        ready = "exporting to"
    elif kind == "fprobe":
        argv = [*netns, "fprobe", "-l", "2", "-i", pair.b_if, "-d", "15", "-e", "1800", "127.0.0.1:2055"]
        ready = ""
    else:  # softflowd
        argv = [*netns, "softflowd", "-d", "-i", pair.b_if, "-n", "127.0.0.1:2055", "-t", "maxlife=1800"]
        ready = ""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if ready:
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        for line in proc.stdout:
            if ready in line:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start")
    else:
        time.sleep(1.0)  # libpcap peers print nothing when ready; give them their capture socket
    return proc


def stop_meter(proc: subprocess.Popen[str] | None) -> None:
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def send(pair: Pair, conf: Path, packets: int, rate: int | None) -> tuple[float, float]:
    """Send; (wall seconds, the sender's own CPU seconds, receive path included when it ran in its context)."""
    argv = ["ip", "netns", "exec", pair.a, "trafgen", "--dev", pair.a_if, "--conf", str(conf), "--num", str(packets),
            "--cpus", "1", "-q"]
    if rate:
        argv += ["--rate", f"{rate}pps"]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.monotonic() - t0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def one_run(pair: Pair, kind: str, conf: Path, packets: int, rate: int | None, tmp: Path) -> dict[str, Any]:
    proc = start_meter(pair, kind, tmp)
    try:
        rx0, cpu0, m0 = rx_packets(pair), busy_jiffies(), (metered(pair) if kind.startswith("pyflow") else 0)
        seconds, sender_cpu = send(pair, conf, packets, rate)
        deadline = time.monotonic() + 10
        while rx_packets(pair) - rx0 < packets and time.monotonic() < deadline:
            time.sleep(0.01)
        cpu1, rx1 = busy_jiffies(), rx_packets(pair)
        m1 = metered(pair) if kind.startswith("pyflow") else 0
    finally:
        stop_meter(proc)
    received = rx1 - rx0
    busy = (cpu1 - cpu0) / USER_HZ
    return {"kind": kind, "received": received, "seconds": seconds, "sender_cpu": sender_cpu,
            "cpu_s_per_mpkt": busy / max(received, 1) * 1e6,
            "metered": m1 - m0 if kind.startswith("pyflow") else None}


def run(repeat: int) -> None:
    if not (shutil.which("trafgen") and shutil.which("fprobe") and shutil.which("softflowd")):
        print("## Live traffic on veth\n\nskipped: trafgen (netsniff-ng), fprobe and softflowd are needed "
              "(`sudo make setup` installs them)\n")
        return
    kinds = ["nothing", "pyflow xdp native", "pyflow xdp generic", "pyflow tc", "fprobe", "softflowd"]
    fixed_rate, fixed_packets, max_packets = 100_000, 300_000, 1_000_000
    with veth_pair("bl") as pair:
        tmp = Path(f"/tmp/pyflow-bench-{os.getpid()}")
        tmp.mkdir(exist_ok=True)
        conf = tmp / "udp.cfg"
        conf.write_text(TRAFGEN_CONF.format(da=pair.macs["b"], sa=pair.macs["a"], src=pair.a_v4, dst=pair.b_v4,
                                            last=10000 + FLOWS - 1))
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for label, packets, rate in (("100 kpps", fixed_packets, fixed_rate), ("max rate", max_packets, None)):
            for _ in range(repeat):
                for kind in kinds:
                    results.setdefault((label, kind), []).append(one_run(pair, kind, conf, packets, rate, tmp))
        shutil.rmtree(tmp, ignore_errors=True)
    print("## Live traffic on veth (trafgen a -> b, 1,000 UDP flows, one meter at a time on b)\n")
    print(f"median of {repeat}; CPU = whole machine busy time (/proc/stat: user, nice, system, irq, softirq, "
          "steal) per million packets received, sender included; 'accounted' = pyflow's metered packets / "
          "packets received\n")
    print("| load | meter | packets received | send s | CPU s / M packets | vs nothing | accounted |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (label, kind), runs in results.items():
        base = statistics.median(r["cpu_s_per_mpkt"] for r in results[(label, "nothing")])
        cpu = statistics.median(r["cpu_s_per_mpkt"] for r in runs)
        rec = statistics.median(r["received"] for r in runs)
        sec = statistics.median(r["seconds"] for r in runs)
        acc = "-"
        if runs[0]["metered"] is not None:
            exact = sum(r["metered"] == r["received"] for r in runs)
            acc = f"{exact}/{len(runs)} exact"
        print(f"| {label} | {kind} | {rec:,.0f} | {sec:.2f} | {cpu:.3f} | {cpu / base:.2f}x | {acc} |")
    print()
