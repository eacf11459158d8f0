"""Surge: more new flows than the cache holds, arriving at a steady rate; how many find room.

Host a sends N one-packet UDP flows (the scale suite's flows: distinct source address and port)
to host b with trafgen at RATE packets a second; b runs one exporter at a time on its end of the
veth with a cache of CACHE flows and RouterOS's default timeouts (inactive 15 s, active 30 min),
and a stock nfcapd on b's loopback.  The surge is over in N / RATE seconds, long before any flow
times out, so whatever an exporter gets out of it, it gets because it makes room as the cache
fills: pyflow exports the entries idle the longest (lack of resources) when a sweep finds the
flows map at 90 %, and a surge brings that sweep forward (docs/reliability.md, "A full cache");
softflowd (``-m CACHE``) expires its oldest flows when it has CACHE; fprobe has no limit on
flows (``-m 0``) and is there as the exporter that never runs out of room (its own capture is
what limits it).  With ``--baseline-tree DIR`` another pyflow checkout (say, the commit before
a change) runs too, from that tree, in the same run.

Figures per run: flows sent; flows with a record at nfcapd and the packets in them; for pyflow
its kernel counts (cache_full, lack-of-resources records, sweeps brought forward); the
exporter's CPU seconds from just before the surge to the end of the run.  A run ends
IDLE_S + 2 x SWEEP_S + 10 s after the surge (every cached flow timed out, swept and sent);
nfcapd is stopped before the exporter, so what an exporter flushes at exit is not counted.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.footprint import proc_cpu_s  # noqa: E402
from bench.scale import ACTIVE_S, nfcapd_totals, peer_argv, sent_keys, started, write_conf  # noqa: E402
from tests.integration.netns import Pair, veth_pair  # noqa: E402
from tests.integration.procs import Proc, nfcapd_in  # noqa: E402
from tests.integration.reliability import metric_sum, metrics_in  # noqa: E402

PYFLOW = str(Path(sys.executable).with_name("pyflow"))
PORT = 20957
IDLE_S = 15  # RouterOS's defaults (active: 30 min)
SWEEP_S = 10
KINDS = ("pyflow", "softflowd", "fprobe")


def exporter_argv(kind: str, pair: Pair, tmp: Path, cache: int, tree: Path | None) -> list[str]:
    if not kind.startswith("pyflow"):
        return peer_argv(kind, pair, tmp, PORT, IDLE_S, cache)
    env = ["env", f"PYTHONPATH={tree}"] if kind == "pyflow-baseline" and tree else []
    return ["ip", "netns", "exec", pair.b, *env, PYFLOW, "run", "--interface", pair.b_if, "--hook", "tc",
            "--target", f"127.0.0.1:{PORT}/ipfix", "--cache-entries", str(cache), "--control-socket", "",
            "--metrics-address", "127.0.0.1:9796"]


def surge(pair: Pair, conf: Path, n: int, rate: int) -> float:
    """trafgen: n frames at ``rate`` a second; the seconds it took."""
    t0 = time.monotonic()
    subprocess.run(["ip", "netns", "exec", pair.a, "trafgen", "--dev", pair.a_if, "--conf", str(conf), "--num",
                    str(n), "--cpus", "1", "-b", f"{rate}pps", "-q"], check=True, capture_output=True,
                   timeout=n / rate * 3 + 60)
    return time.monotonic() - t0


def pyflow_counts(pair: Pair) -> dict[str, float]:
    m = metrics_in(pair.b)
    return {"cache_full": metric_sum(m, "pyflow_packets_not_metered_total", reason="cache_full"),
            "early": metric_sum(m, "pyflow_flow_records_total", reason="lack_of_resources"),
            "fill_sweeps": metric_sum(m, "pyflow_fill_sweeps_total")}


def one_run(pair: Pair, kind: str, n: int, rate: int, cache: int, conf: Path, tree: Path | None) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="pyflow-surge-"))
    exp: Proc | None = None
    res: dict[str, Any] = {}
    try:
        with nfcapd_in(pair.b, tmp, PORT) as col:
            exp = started(Proc(exporter_argv(kind, pair, tmp, cache, tree)), kind)
            cpu0 = proc_cpu_s(exp.p.pid)
            res["surge_s"] = surge(pair, conf, n, rate)
            time.sleep(IDLE_S + 2 * SWEEP_S + 10)
            res["cpu_s"] = proc_cpu_s(exp.p.pid) - cpu0
            if kind.startswith("pyflow"):
                res.update(pyflow_counts(pair))
        res["records"], res["flows"], res["packets"] = nfcapd_totals(col.flowdir, sent_keys(n))
    finally:
        if exp is not None:
            exp.stop(signal.SIGTERM, timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def row(n: int, rate: int, cache: int, kind: str, r: dict[str, Any]) -> str:
    own = (f"{r['cache_full']:,.0f} | {r['early']:,.0f} | {r['fill_sweeps']:,.0f}" if kind.startswith("pyflow")
           else "- | - | -")
    return (f"| {n:,} | {rate:,}/s | {cache:,} | {kind} | {r['flows']:,} | {100 * r['flows'] / n:.1f} % | "
            f"{r['packets']:,} | {own} | {r['cpu_s']:.2f} | {r['surge_s']:.1f} |")


def run(runs: list[tuple[int, int, int]], tree: Path | None = None) -> None:
    """One row per (flows, rate, cache) and exporter."""
    print("## Surge: more new flows than the cache holds\n")
    missing = [t for t in ("trafgen", "fprobe", "softflowd", "nfcapd", "nfdump") if shutil.which(t) is None]
    if missing:
        print(f"skipped: {', '.join(missing)} not installed (`sudo make setup`, `scripts/bench-deps.sh`)\n")
        return
    kinds = [*KINDS[:1], *(["pyflow-baseline"] if tree else []), *KINDS[1:]]
    started = time.monotonic()
    lines = []
    with veth_pair("su") as pair, tempfile.TemporaryDirectory(prefix="pyflow-surge-") as tmp:
        conf = Path(tmp) / "flows.cfg"
        write_conf(pair, conf)
        for n, rate, cache in runs:
            for kind in kinds:
                lines.append(row(n, rate, cache, kind, one_run(pair, kind, n, rate, cache, conf, tree)))
    print(f"trafgen a -> b, one packet per flow, at the rate shown; exporters on b with a cache of the size shown "
          f"and RouterOS's default timeouts (inactive {IDLE_S} s, active {ACTIVE_S // 60} min): pyflow --hook tc, "
          f"IPFIX, sweep-interval {SWEEP_S} s (its default); softflowd IPFIX, -m = the cache, expint=1; fprobe "
          f"NetFlow v5, -m 0 (no limit on flows), -s 1. Collector: stock nfcapd on b's loopback, stopped before "
          f"the exporter (exit flushes not counted). A run ends {IDLE_S + 2 * SWEEP_S + 10} s after the surge. "
          "cache_full = packets pyflow's kernel found no room for; early = lack-of-resources records; fill "
          "sweeps = sweeps a surge brought forward. CPU = the exporter's utime+stime over the run."
          + (f" pyflow-baseline = the checkout at {tree}, same run." if tree else "") + "\n")
    print("| flows sent | rate | cache | exporter | flows at nfcapd | of sent | packets at nfcapd | cache_full | "
          "early | fill sweeps | CPU s | surge s |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(lines))
    print(f"\nthe suite took {time.monotonic() - started:.0f} s\n")
