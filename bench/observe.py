"""Watching the agent: sweeps and exports with 20 metrics scrapes/s and 20 `pyflow status`/s against a
large cache, against the same run without them (issue 15: within 5 %).

One kernel flow cache (a real BPF map, no interface attached, no traffic) holds N synthetic flows;
a tenth of them go idle at instants spread over the run, the rest stay cached.  A real agent runs
its loop on it (``Agent.run``: sweeps when flows fall due, sends at its pace) with its metrics
endpoint (HTTP on loopback) and its control socket, and one IPFIX target to a loopback socket
nobody reads.  Each run lasts --observe-seconds; runs alternate quiet / watched.  Watched: another
process scrapes /metrics 20 times a second and asks `status` 20 times a second (a new connection
each, as `pyflow status` does), each on its own schedule.

Figures per run: sweeps, sweep duration (every sweep's, as the agent measures it: barrier, read,
rules, records queued), export lateness of every record (send time minus last packet + inactive
timeout: the sweep's schedule and duration plus the wait in the send queue), and what the
watchers got (requests answered, their latency).  The agent does not flush at the end of a run
(the records of the flows still cached would only add a burst unrelated to watching).
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.fill import synthetic_cache

S = 10**9
INACTIVE_S = 60
EXPIRING = 0.1  # share of the cache that goes idle during a run
SCRAPES_PER_S = 20
STATUS_PER_S = 20


@dataclass
class RunFigures:
    sweeps: list[float] = field(default_factory=list)
    lateness: list[np.ndarray] = field(default_factory=list)
    load: dict[str, Any] = field(default_factory=dict)


def fill(meter: Any, n: int, seconds: float) -> None:
    """Empty the flow cache, then put n flows in it: EXPIRING of them go idle during the run."""
    from pyflow.agent import boot_ns
    from pyflow.kernel.abi import CacheMap
    from pyflow.kernel.bpfsys import map_delete_batch, map_update_batch

    with meter.scan(65536) as scan:  # chunks: no buffer of the map's size
        old = [k.copy() for which, k, _ in scan if which == CacheMap.FLOWS]
    if old:
        map_delete_batch(meter.flows_fd, np.concatenate(old))
    now = boot_ns()
    keys, values = synthetic_cache(n, now)
    rng = np.random.default_rng(7)
    going = rng.random(n) < EXPIRING
    idle_at = now + rng.integers(2 * S, int((seconds - 3) * S), n)  # when each expiring flow falls due
    last = np.where(going, idle_at - INACTIVE_S * S, now - rng.integers(0, 10 * S, n))
    values["last_seen_ns"] = last
    values["first_seen_ns"] = last - rng.integers(0, 10 * S, n)
    values["tcp_flags"] = 0x10
    for lo in range(0, n, 65536):
        map_update_batch(meter.flows_fd, keys[lo:lo + 65536], values[lo:lo + 65536])


def recording(metrics: Any, figures: RunFigures) -> Any:
    """``metrics``, every sweep duration and lateness it observes also kept in ``figures``."""
    sweep_observe = metrics.sweep_duration.observe
    lateness_observe = metrics.export_lateness.observe_many

    def on_sweep(seconds_: float, exemplar: dict[str, str] | None = None) -> None:
        figures.sweeps.append(seconds_)
        sweep_observe(seconds_, exemplar)

    def on_sent(values: np.ndarray, label: str) -> None:
        figures.lateness.append(values.copy())
        lateness_observe(values, label)

    setattr(metrics.sweep_duration, "observe", on_sweep)  # noqa: B010
    setattr(metrics.export_lateness, "observe_many", on_sent)  # noqa: B010
    return metrics


def one_run(meter: Any, n: int, seconds: float, watched: bool) -> RunFigures:
    from prometheus_client import CollectorRegistry

    from pyflow.agent import Agent
    from pyflow.config import Settings, TargetSettings
    from pyflow.control import ControlServer
    from pyflow.export.registry import encoder_for
    from pyflow.export.target import Target
    from pyflow.metrics import Metrics, serve

    class Unflushed(Agent):
        def flush(self) -> None:  # the flows still cached stay there (see the module docstring)
            pass

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    settings = Settings(interfaces=("lo",), cache_entries=meter.settings.cache_entries,
                        inactive_flow_timeout_ns=INACTIVE_S * S)
    target = Target(TargetSettings("127.0.0.1", sink.getsockname()[1], "ipfix"), encoder_for("ipfix"))
    target.open()
    figures = RunFigures()
    metrics = recording(Metrics(CollectorRegistry()), figures)
    fill(meter, n, seconds)
    agent = Unflushed(settings, meter, [target], log=lambda _m: None, metrics=metrics)
    metrics.attach(agent, interfaces=lambda: [("bench0", 2, "xdp", "native")], rx_packets=lambda: {2: 0})
    server = serve(metrics, "127.0.0.1:0")
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    with tempfile.TemporaryDirectory() as tmp:
        sock = str(Path(tmp) / "pyflow.sock")
        control = ControlServer(agent, sock)
        control.start()
        stop = threading.Event()
        loop = threading.Thread(target=agent.run, args=(stop,), name="agent")
        loop.start()
        try:
            if watched:
                out = subprocess.run([sys.executable, "-m", "bench.observe", "--load", url, sock, str(seconds)],
                                     capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
                figures.load = json.loads(out.stdout)
            else:
                time.sleep(seconds)
        finally:
            stop.set()
            loop.join()
            control.close()
            server.shutdown()
            server.server_close()
            target.close()
            sink.close()
    return figures


def load(url: str, sock: str, seconds: float) -> dict[str, Any]:
    """The watchers (run in their own process): SCRAPES_PER_S scrapes and STATUS_PER_S status a second."""
    from pyflow.control import ControlClient

    def scrape() -> None:
        with urllib.request.urlopen(url, timeout=10) as r:
            r.read()

    def status() -> None:
        with ControlClient(sock) as client:
            client.status()

    got: dict[str, list[float]] = {"scrape": [], "status": []}
    failed: dict[str, int] = {"scrape": 0, "status": 0}
    end = time.monotonic() + seconds

    def paced(name: str, fn: Any, rate: float) -> None:
        due = time.monotonic()
        while due < end:
            time.sleep(max(0.0, due - time.monotonic()))
            t0 = time.monotonic()
            try:
                fn()
                got[name].append(time.monotonic() - t0)
            except Exception:
                failed[name] += 1
            due = max(due + 1 / rate, time.monotonic() - 1 / rate)  # late: no catching up in a burst

    threads = [threading.Thread(target=paced, args=("scrape", scrape, SCRAPES_PER_S)),
               threading.Thread(target=paced, args=("status", status, STATUS_PER_S))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {name: {"answered": len(v), "failed": failed[name],
                   "p50": statistics.median(v) if v else None,
                   "max": max(v) if v else None} for name, v in got.items()}


def _q(values: np.ndarray, q: float) -> float:
    return float(np.quantile(values, q)) if len(values) else float("nan")


def run(n: int, seconds: float = 30.0, repeat: int = 2) -> None:
    from pyflow.kernel.loader import FlowMeter, KernelSettings

    print(f"## Watching the agent: {SCRAPES_PER_S} scrapes/s and {STATUS_PER_S} `status`/s, {n:,} cached flows\n")
    print(f"each run {seconds:g} s, a tenth of the flows going idle during it (inactive timeout {INACTIVE_S} s); "
          "runs alternate quiet / watched; sweep = every sweep's duration; lateness = every record's\n")
    print("| run | sweeps | sweep p50 s | sweep p95 s | sweep max s | records | lateness p50 s | lateness p99 s "
          "| scrapes answered (p50 s, max s) | status answered (p50 s, max s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    runs: dict[bool, list[RunFigures]] = {False: [], True: []}
    with FlowMeter(KernelSettings(cache_entries=2 * n)) as meter:  # half full: no early export
        meter.load()
        for _ in range(repeat):
            for watched in (False, True):
                f = one_run(meter, n, seconds, watched)
                runs[watched].append(f)
                sw = np.array(f.sweeps)
                late = np.concatenate(f.lateness) if f.lateness else np.zeros(0)
                cells = ["-", "-"]
                if f.load:
                    cells = [f"{w['answered']} ({w['p50']:.3f}, {w['max']:.3f})" + (
                        f", {w['failed']} failed" if w["failed"] else "") for w in (f.load["scrape"], f.load["status"])]
                print(f"| {'watched' if watched else 'quiet'} | {len(sw)} | {_q(sw, 0.5):.3f} | {_q(sw, 0.95):.3f} "
                      f"| {sw.max() if len(sw) else float('nan'):.3f} | {len(late):,} | {_q(late, 0.5):.3f} "
                      f"| {_q(late, 0.99):.3f} | {cells[0]} | {cells[1]} |")
    _ratios(runs)


def _ratios(runs: dict[bool, list[RunFigures]]) -> None:
    def pooled(watched: bool) -> tuple[np.ndarray, np.ndarray]:
        fs = runs[watched]
        sweeps = np.array([s for f in fs for s in f.sweeps])
        late = np.concatenate([a for f in fs for a in f.lateness]) if any(f.lateness for f in fs) else np.zeros(0)
        return sweeps, late

    (qs, ql), (ws, wl) = pooled(False), pooled(True)
    figures = [("sweep p50", _q(ws, 0.5), _q(qs, 0.5)), ("sweep p95", _q(ws, 0.95), _q(qs, 0.95)),
               ("lateness p50", _q(wl, 0.5), _q(ql, 0.5)), ("lateness p99", _q(wl, 0.99), _q(ql, 0.99))]
    text = ", ".join(f"{name} {w / q:.3f}x" if q > 0 else f"{name} {w:.3f} s vs {q:.3f} s" for name, w, q in figures)
    print(f"\nwatched / quiet (all runs pooled): {text} (target: within 5 %, at most 1.05x)\n")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--load":
        print(json.dumps(load(sys.argv[2], sys.argv[3], float(sys.argv[4]))))
    else:
        sys.exit("usage: python -m bench.observe --load URL SOCKET SECONDS (the watchers; "
                 "the benchmark itself: python -m bench --only observe)")
