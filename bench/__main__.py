"""Run every benchmark and print a Markdown report (figures + ratios within this run).

    sudo make bench                 # all of them
    sudo .venv/bin/python -m bench --only sweep --sizes 10000,100000

Each figure is the median of --repeat runs; each has a baseline measured in
the same run, because these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        bcc_v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "python3-bpfcc"], capture_output=True,
                               text=True).stdout
    except OSError:
        bcc_v = "?"
    return (f"{cpu}, {os.cpu_count()} CPUs, kernel {platform.release()}, Python {platform.python_version()}, "
            f"numpy {np.__version__}, bcc {bcc_v}")


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def write_report(args: argparse.Namespace, path: Path) -> int:
    """Run the benchmarks (printing as usual) and replace the report section of ``path``."""
    argv = [a for a in sys.argv[1:] if not a.startswith("--write") and a != str(path)]
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "bench", *argv], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    if out.returncode != 0:
        return out.returncode
    report = out.stdout.replace("# pyflow benchmarks\n", "## Latest `make bench` report\n", 1)
    report += f"\n(the whole run took {time.monotonic() - started:.0f} s)\n"
    text = path.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
    else:
        head, tail = text.rstrip() + "\n\n", "\n"
    path.write_text(f"{head}{BEGIN}\n{report}{END}{tail}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("hotpath", "mapread", "sweep", "conntrack", "live", "footprint", "scale",
                                       "surge", "observe", "analytics"), action="append")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="cache sizes for mapread/sweep")
    ap.add_argument("--scale-sizes", default="100000,451000",
                    help="flows per burst for scale (one row per size and exporter)")
    ap.add_argument("--scale-target-options", default="", metavar="OPTION=VALUE[,...]",
                    help="appended to pyflow's target in scale (e.g. max-rate=20000); default: none")
    ap.add_argument("--surge-runs", default="200000:50000:65536,1096704:200000:1048576",
                    metavar="FLOWS:RATE:CACHE[,...]",
                    help="surge runs: FLOWS one-packet flows at RATE a second into a cache of CACHE")
    ap.add_argument("--baseline-tree", type=Path, default=None, metavar="DIR",
                    help="surge: also run the pyflow of this checkout (e.g. a worktree of an earlier commit)")
    ap.add_argument("--observe-size", type=int, default=1_000_000,
                    help="cached flows for observe (sweeps with and without 20 scrapes/s + 20 status/s)")
    ap.add_argument("--observe-seconds", type=float, default=30.0, help="length of each observe run")
    ap.add_argument("--conntrack-size", type=int, default=20_000, help="conntrack entries to decode")
    ap.add_argument("--write", metavar="FILE",
                    help="also put the report in FILE between its '<!-- bench:begin -->' and "
                         "'<!-- bench:end -->' lines (make bench: docs/benchmarks.md)")
    args = ap.parse_args()
    if args.write:
        return write_report(args, Path(args.write))
    sizes = [int(x) for x in args.sizes.split(",")]
    which = args.only or ["hotpath", "mapread", "sweep", "conntrack", "live", "footprint", "scale", "surge",
                          "observe", "analytics"]
    print(f"# pyflow benchmarks\n\nmachine: {machine()}\n\ncommand: `{' '.join(sys.argv)}`\n")
    if os.geteuid() != 0 and any(w in which for w in ("hotpath", "mapread", "live", "footprint", "scale", "surge",
                                                      "observe")):
        print("hotpath, mapread, live, footprint, scale, surge and observe need root (BPF, namespaces); skipped\n")
        which = [w for w in which if w in ("sweep", "conntrack", "analytics")]
    # each suite is imported when it runs: --only X does not depend on the other suites' imports
    if "hotpath" in which:
        from bench import hotpath

        hotpath.run(args.repeat)
    if "mapread" in which:
        from bench import mapread

        mapread.run(sizes, args.repeat, median_time)
        mapread.run_tick(sizes)
    if "sweep" in which:
        from bench import sweep_export

        sweep_export.run(sizes, args.repeat, median_time)
        sweep_export.run_formats(max(sizes), args.repeat, median_time)
    if "conntrack" in which:
        from bench import conntrack

        conntrack.run(args.conntrack_size, args.repeat, median_time)
    if "live" in which:
        from bench import live

        live.run(min(args.repeat, 3))
    if "footprint" in which:
        from bench import footprint

        footprint.run()
    if "scale" in which:
        from bench import scale

        scale.run([int(x) for x in args.scale_sizes.split(",")], args.scale_target_options)
    if "surge" in which:
        from bench import surge

        surge.run([(int(f), int(r), int(c)) for f, r, c in (x.split(":") for x in args.surge_runs.split(","))],
                  args.baseline_tree)
    if "observe" in which:
        from bench import observe

        observe.run(args.observe_size, args.observe_seconds)
    if "analytics" in which:
        from bench import analytics

        analytics.run(args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
