"""Scale: N one-packet UDP flows in one burst, all idle-expired at once; what reaches the collector.

Host a sends N one-packet UDP flows (distinct source port and source address) to host b in ONE
trafgen burst at full speed; b runs one exporter at a time on its end of the veth (pyflow with
TC, fprobe, softflowd: both libpcap) and a stock nfcapd (``-w DIR -p PORT -b 127.0.0.1``, its
default socket buffer) on b's loopback.  Every exporter: inactive (idle) timeout 5 s, active
timeout 30 min, a cache that holds N, expiry scan every second (fprobe ``-s 1``, softflowd
``expint=1``; pyflow sweeps when flows fall due, at least every 2 s), libpcap capture buffer 64 MiB for the two libpcap
exporters and fprobe's pending queue 10,000 (so that capture is not what limits them).  Figures per run:

* records nfcapd stored / flows sent, and the packets in them (nfdump after nfcapd's SIGTERM;
  nfcapd is stopped *before* the exporter, so nothing an exporter flushes at exit is counted);
* datagrams the kernel dropped at nfcapd's socket (its buffer was full: Udp RcvbufErrors);
* the exporter's CPU seconds (utime + stime of the process, all its threads, /proc/PID/stat) from
  just before the burst until its last export datagram was captured;
* its peak RSS: the largest VmRSS sampled every 0.1 s from just before the burst to the end of
  the run, and VmHWM (the high-water mark since the process started, BPF compile included);
* its RSS with N cached: VmRSS sampled once, after the burst's last packet reached b and at least
  2.5 s after its first, before the idle timeout expired any flow (pyflow's cache is a BPF map:
  kernel memory, not in any process's RSS; the libpcap exporters hold theirs in the heap); the
  notes say when the sample was late (a long burst) and whether any flow had reached the capture by then;
* export lateness p50/p99/max per flow: when the first record of the flow reached b's loopback
  (an AF_PACKET capture with kernel timestamps, decoded with ``pyflow.collect``) minus (when the
  burst's first packet reached b + the 5 s idle timeout).  Measured from the burst's start, so
  a flow sent later in the burst looks later by up to the burst's duration (shown): conservative.

A run ends when every flow was seen in the capture, or 8 s after the last datagram (not before
the idle timeout), and after 120 s at the latest (1M records at pyflow's default max-rate of
100,000 records/s take 10 s).  The capture is decoded during the run only after
1 s without datagrams and with the exporter idle (the decoder would otherwise compete with the
exporter for the CPUs, and, holding the GIL, slow the capturing thread down to a datagram per
switch interval); the capture is read to its end before the last decode.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.footprint import proc_cpu_s, proc_status  # noqa: E402
from pyflow.collect import TemplateCache, decode  # noqa: E402
from tests.integration.netns import Pair, in_netns, veth_pair  # noqa: E402
from tests.integration.procs import Proc, nfcapd_in, nfdump_records  # noqa: E402
from tests.integration.reliability import metric_sum, metrics_in  # noqa: E402

PYFLOW = str(Path(sys.executable).with_name("pyflow"))
PORT = 20955
IDLE_S = 5
ACTIVE_S = 1800
QUIET_S = 8.0  # a run ends this long after the last export datagram ...
CAP_S = 120.0  # ... or this long after the burst started, whichever is first
CACHE = 1 << 20  # pyflow's 1M
PCAP_BUFFER = 64 << 20
FPROBE_QUEUE = 10_000  # its pending queue (capture thread -> flow thread); the default 100 drops most of a burst
KINDS = ("pyflow", "fprobe", "softflowd")
# Flow i: source 198.18.0.(1 + i % 17), source port 1024 + i % 64512 (17 is prime to 64512: every
# i below 17 x 64512 = 1,096,704 is a distinct key); to 198.19.0.1:9, which b neither owns nor
# forwards to (no ICMP replies of b's making: every metered packet is one trafgen sent).
SRC_NET, SRC_COUNT, SPORT_LO, SPORT_COUNT, DST, DPORT = "198.18.0.0", 17, 1024, 64512, "198.19.0.1", 9
MAX_FLOWS = SRC_COUNT * SPORT_COUNT
TRAFGEN_CONF = """\
{{
  eth(da={da}, sa={sa}, type=0x0800),
  ipv4(saddr={src}, saddr[3]=dinc(1, {src_count}), daddr={dst}, ttl=64, proto=17),
  udp(sp=dinc({sp_lo}, {sp_hi}), dp={dport}),
  fill(0x42, 18),
}}
"""
SOL_PACKET, PACKET_STATISTICS, PACKET_OUTGOING, ETH_P_IP = 263, 6, 4, 0x0800
SO_TIMESTAMPNS, SO_RCVBUFFORCE = 35, 33
STEADY_S = 2.5  # the RSS "with N cached" is sampled this long after the burst's first packet at b (or later) ...
STEADY_GAP_S = 0.3  # ... and at least this long after its last
NOTEWORTHY = re.compile(r"error|warn|fail|drop|lost|traceback|exception|full", re.IGNORECASE)


def flow_key(src: str, sport: int) -> int:
    return (int(ipaddress.IPv4Address(src)) << 16) | sport


def sent_keys(n: int) -> set[int]:
    base = int(ipaddress.IPv4Address(SRC_NET))
    return {((base + 1 + i % SRC_COUNT) << 16) | (SPORT_LO + i % SPORT_COUNT) for i in range(n)}


def netns_read(ns: str, name: str) -> str:
    """/proc/net/<name> of ``ns`` (thread-self: the reading thread's network namespace)."""
    return in_netns(ns, lambda: Path(f"/proc/thread-self/net/{name}").read_text())


def udp_rcvbuf_errors(ns: str) -> int:
    """Datagrams dropped at full UDP socket buffers in ``ns`` (nfcapd's is its only UDP socket)."""
    udp = [line.split() for line in netns_read(ns, "snmp").splitlines() if line.startswith("Udp:")]
    return int(dict(zip(udp[0], udp[1], strict=True))["RcvbufErrors"])


def rx_packets(dev_text: str, dev: str) -> int:
    for line in dev_text.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == dev:
            return int(rest.split()[1])
    raise KeyError(dev)


class BurstClock:
    """When the burst's first and last packet reached ``dev`` in ``ns`` (its rx counter, polled every ms)."""

    def __init__(self, ns: str, dev: str, n: int) -> None:
        self.first = self.last = 0.0
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=in_netns, args=(ns, lambda: self._poll(dev, n)), daemon=True)
        self._thread.start()

    def _poll(self, dev: str, n: int) -> None:
        def rx() -> int:
            return rx_packets(Path("/proc/thread-self/net/dev").read_text(), dev)

        rx0 = rx()
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            got = rx() - rx0
            now = time.time()
            if got and not self.first:
                self.first = now
            if got > self.received:
                self.received, self.last = got, now
            if got >= n or (self.last and now - self.last > 2.0):
                return
            time.sleep(0.001)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float) -> None:
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(5)


class ExportCapture:
    """UDP datagrams to ``port`` on ``ns``'s loopback, with kernel receive timestamps (AF_PACKET)."""

    def __init__(self, ns: str, port: int, limit: int = 4_000_000) -> None:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.bind(("lo", ETH_P_IP))
            s.settimeout(0.1)
            return s

        self.port, self.limit = port, limit
        self.sock = in_netns(ns, make)
        self.datagrams: list[tuple[float, str, int, bytes]] = []  # (arrival, exporter address, port, payload)
        self.drops = 0
        self.empty_at = 0.0  # when the thread last found the socket's queue empty (it has read all before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.datagrams) < self.limit:
            try:
                data, anc, _flags, addr = self.sock.recvmsg(65535, socket.CMSG_SPACE(16))
            except TimeoutError:
                self.empty_at = time.time()
                continue
            except OSError:
                return
            if addr[2] == PACKET_OUTGOING or len(data) < 28 or data[9] != 17:
                continue
            ihl = (data[0] & 15) * 4
            sport, dport = struct.unpack_from("!HH", data, ihl)
            if dport != self.port:
                continue
            stamp = time.time()
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
                    sec, nsec = struct.unpack("=qq", raw[:16])
                    stamp = sec + nsec / 1e9
            self.datagrams.append((stamp, socket.inet_ntoa(data[12:16]), sport, data[ihl + 8:]))

    def caught_up(self, since: float) -> bool:
        """Whether the thread has found the queue empty after ``since`` (read everything that came before)."""
        return self.empty_at > since

    def drain(self, timeout: float = 30.0) -> None:
        """Until everything queued to the socket now has been read (bounded by ``timeout``)."""
        since, deadline = time.time(), time.monotonic() + timeout
        while not self.caught_up(since) and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(OSError):
            self.drops = struct.unpack("II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))[1]
        self.sock.close()


@dataclass
class Arrivals:
    """The capture decoded so far: first arrival per flow key sent, records of ours, problems."""

    wanted: set[int]
    cache: TemplateCache = field(default_factory=TemplateCache)
    first: dict[int, float] = field(default_factory=dict)
    done: int = 0
    records: int = 0
    last_record: float = 0.0
    problems: int = 0

    def feed(self, datagrams: list[tuple[float, str, int, bytes]]) -> None:
        upto = len(datagrams)  # the capture thread may append while this runs
        for stamp, addr, port, payload in datagrams[self.done:upto]:
            out = decode(payload, (addr, port), self.cache)
            self.problems += len(out.problems)
            for r in out.records:
                if r.options or r.proto != 17 or r.dport != DPORT or r.src is None or r.sport is None:
                    continue
                key = flow_key(r.src, r.sport)
                if key in self.wanted:
                    self.records += 1
                    self.last_record = max(self.last_record, stamp)
                    self.first.setdefault(key, stamp)
        self.done = upto


def peer_argv(kind: str, pair: Pair, tmp: Path, port: int, idle_s: int, cache: int) -> list[str]:
    """fprobe's or softflowd's command line in b: idle ``idle_s``, active 30 min, a 1 s expiry scan;
    softflowd holds ``cache`` flows, fprobe has no limit (-m 0)."""
    netns = ["ip", "netns", "exec", pair.b]
    if kind == "fprobe":  # -m 0: no memory limit for the flow cache; NetFlow v5 (its best)
        return [*netns, "fprobe", "-l", "2", "-i", pair.b_if, "-f", "ip", "-d", str(idle_s), "-e", str(ACTIVE_S),
                "-s", "1", "-m", "0", "-q", str(FPROBE_QUEUE), "-B", str(PCAP_BUFFER >> 10), "-n", "5",
                f"127.0.0.1:{port}"]
    return [*netns, "softflowd", "-d", "-i", pair.b_if, "-n", f"127.0.0.1:{port}", "-v", "10", "-m", str(cache),
            "-B", str(PCAP_BUFFER), "-c", str(tmp / "softflowd.ctl"), "-p", str(tmp / "softflowd.pid"),
            *[x for t in ("general", "tcp", "udp", "icmp") for x in ("-t", f"{t}={idle_s}")],
            "-t", f"maxlife={ACTIVE_S}", "-t", "expint=1"]


def exporter_argv(kind: str, pair: Pair, tmp: Path, extra: str) -> list[str]:
    """The exporter's command line in b: idle 5 s, active 30 min, a cache for N, a 1 s expiry scan."""
    if kind != "pyflow":
        return peer_argv(kind, pair, tmp, PORT, IDLE_S, CACHE)
    target = f"127.0.0.1:{PORT}/ipfix" + (f",{extra}" if extra else "")
    return ["ip", "netns", "exec", pair.b, PYFLOW, "run", "--interface", pair.b_if, "--hook", "tc", "--target",
            target, "--cache-entries", "1M", "--inactive-flow-timeout", f"{IDLE_S}s", "--active-flow-timeout",
            f"{ACTIVE_S // 60}m", "--control-socket", "", "--metrics-address", "127.0.0.1:9796"]


def start_exporter(kind: str, pair: Pair, tmp: Path, extra: str) -> Proc:
    return started(Proc(exporter_argv(kind, pair, tmp, extra)), kind)


def started(proc: Proc, kind: str) -> Proc:
    """``proc`` once it is ready: pyflow says so, the libpcap exporters get 1.5 s."""
    if kind.startswith("pyflow"):
        proc.wait_for_line("exporting to", timeout=60)
    else:
        time.sleep(1.5)  # the libpcap exporters print nothing when ready
    if proc.p.poll() is not None:
        raise RuntimeError(f"{kind} exited at start:\n{proc.output()}")
    return proc


def trafgen(pair: Pair, conf: Path, n: int) -> subprocess.Popen[bytes]:
    argv = ["ip", "netns", "exec", pair.a, "trafgen", "--dev", pair.a_if, "--conf", str(conf), "--num", str(n),
            "--cpus", "1", "-q"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def exporter_stats(kind: str, pair: Pair, tmp: Path) -> str:
    """What the exporter itself counted (pyflow: its metrics; softflowd: softflowctl), for the notes."""
    try:
        if kind == "pyflow":
            m = metrics_in(pair.b)
            names = ("packets_metered_total", "flows_created_total", "export_records_total",
                     "export_datagrams_total", "export_send_errors_total", "export_queue_dropped_records_total")
            return ", ".join(f"{name} {metric_sum(m, 'pyflow_' + name):,.0f}" for name in names)
        if kind == "softflowd":
            out = pair.run(pair.b, "softflowctl", "-c", str(tmp / "softflowd.ctl"), "statistics", timeout=10).stdout
            keep = ("Packets processed", "Packets received by libpcap", "Packets dropped by libpcap", "Flows exported")
            return "; ".join(line.strip() for line in out.splitlines() if line.strip().startswith(keep))
    except Exception as exc:  # a note only: never fail the run for it
        return f"(could not read its counters: {exc!r})"
    return ""


def sample(pid: int) -> tuple[float, float, int] | None:
    """(wall time, CPU seconds, VmRSS KiB) of ``pid``; None once it is gone."""
    try:
        return time.time(), proc_cpu_s(pid), proc_status(pid, "VmRSS")
    except (OSError, KeyError, ValueError):
        return None


def idle(samples: list[tuple[float, float, int]], span: float = 1.0, share: float = 0.05) -> bool:
    """Whether the exporter used under ``share`` of a core over the last ``span`` seconds: decoding the
    capture then (to see whether every flow is in) does not compete with it for the CPUs."""
    now, cpu, _ = samples[-1]
    past = next((s for s in reversed(samples) if s[0] <= now - span), None)
    return past is not None and cpu - past[1] <= share * (now - past[0])


def watch(pair: Pair, pid: int, n: int, conf: Path, cap: ExportCapture, arr: Arrivals) -> dict[str, Any]:
    """Send the burst, then sample the exporter every 0.1 s until its records are out (bounded: CAP_S)."""
    first = sample(pid)
    if first is None:
        raise RuntimeError("the exporter is gone before the burst")
    samples = [first]
    clock = BurstClock(pair.b, pair.b_if, n)
    tg = trafgen(pair, conf, n)
    start, checked, steady = time.monotonic(), -1, None
    try:
        while time.monotonic() - start < CAP_S:
            time.sleep(0.1)
            s = sample(pid)
            if s is None:
                break
            samples.append(s)
            if tg.poll() is None:
                continue
            steady = steady or steady_sample(s, clock)
            if not clock.first:
                if clock.done():
                    break  # nothing arrived at b at all
                continue
            if not cap.caught_up(s[0] - 0.5):
                continue  # the capture is behind: its newest timestamp is not the newest arrival
            last = cap.datagrams[-1][0] if cap.datagrams else 0.0
            quiet = s[0] - max(last, clock.first + IDLE_S)
            if quiet >= QUIET_S:
                break
            if quiet >= 1.0 and idle(samples) and len(cap.datagrams) != checked:
                checked = len(cap.datagrams)
                arr.feed(cap.datagrams)
                if len(arr.first) >= n:
                    break
    finally:
        if tg.poll() is None:
            tg.kill()
        tg.wait(10)
        clock.wait(5)
    cap.drain()
    arr.feed(cap.datagrams)
    res = summarize(pid, n, samples, clock, arr, tg)
    res["steady"] = steady and (steady[0] - clock.first, steady[1] / 1024,
                                sum(1 for t in arr.first.values() if t <= steady[0]))
    return res


def steady_sample(s: tuple[float, float, int], clock: BurstClock) -> tuple[float, int] | None:
    """(when, VmRSS KiB) of ``s`` if it is the moment for the "with N cached" figure: the burst is over
    (trafgen exited, its last packet at b STEADY_GAP_S ago) and STEADY_S have passed since its first."""
    if not clock.first or s[0] < max(clock.first + STEADY_S, clock.last + STEADY_GAP_S):
        return None
    return s[0], s[2]


def summarize(pid: int, n: int, samples: list[tuple[float, float, int]], clock: BurstClock, arr: Arrivals,
              tg: subprocess.Popen[bytes]) -> dict[str, Any]:
    end = arr.last_record or samples[-1][0]
    after = [s for s in samples if s[0] >= end]
    cpu_end = after[0][1] if after else samples[-1][1]
    try:
        hwm: int | None = proc_status(pid, "VmHWM")
    except (OSError, KeyError, ValueError):
        hwm = None
    zero = clock.first + IDLE_S
    late = sorted(t - zero for t in arr.first.values())
    stderr = tg.stderr.read().decode(errors="replace").strip() if tg.stderr else ""
    return {"received": clock.received, "burst_s": clock.last - clock.first, "cpu_s": cpu_end - samples[0][1],
            "rss_mib": max(s[2] for s in samples) / 1024, "hwm_mib": None if hwm is None else hwm / 1024,
            "captured": len(arr.first), "captured_records": arr.records, "problems": arr.problems,
            "datagrams": arr.done,
            "late": late, "export_s": end - clock.first if arr.last_record else None,
            "trafgen": f"exit {tg.returncode}: {stderr[-200:]}" if tg.returncode else ""}


def nfcapd_totals(flowdir: Path, wanted: set[int]) -> tuple[int, int, int]:
    """(records of ours nfcapd stored, distinct flows among them, packets in them)."""
    records, packets, seen = 0, 0, set()
    for row in nfdump_records(flowdir):
        try:
            key = flow_key(row["sa"], int(row["sp"]))
        except (ValueError, KeyError):
            continue
        if key in wanted and row.get("dp") == str(DPORT):
            records += 1
            packets += int(row["ipkt"])
            seen.add(key)
    return records, len(seen), packets


def one_run(pair: Pair, kind: str, n: int, conf: Path, wanted: set[int], extra: str) -> dict[str, Any]:
    """One exporter, one burst of n flows; nfcapd stops before the exporter (its exit flush is not counted)."""
    tmp = Path(tempfile.mkdtemp(prefix="pyflow-scale-"))
    cap = ExportCapture(pair.b, PORT)
    exp: Proc | None = None
    try:
        drops0 = udp_rcvbuf_errors(pair.b)
        with nfcapd_in(pair.b, tmp, PORT) as col:
            exp = start_exporter(kind, pair, tmp, extra)
            res = watch(pair, exp.p.pid, n, conf, cap, Arrivals(wanted))
            res["alive"] = exp.p.poll() is None
            res["sock_drops"] = udp_rcvbuf_errors(pair.b) - drops0
            res["own"] = exporter_stats(kind, pair, tmp) if res["alive"] else ""
        res["nfcapd"] = "; ".join(line.strip() for line in col.proc.lines if "Sequence Errors" in line)
        res["records"], res["flows"], res["packets"] = nfcapd_totals(col.flowdir, wanted)
        if not res["alive"]:
            res["output"] = exp.output()[-2000:]
        res["said"] = run_output(exp)
    finally:
        if exp is not None:
            exp.stop(signal.SIGTERM, timeout=30)
        cap.close()
        shutil.rmtree(tmp, ignore_errors=True)
    res["capture_drops"] = cap.drops
    return res


def run_output(exp: Proc) -> tuple[int, list[str]]:
    """(lines the exporter printed after its start-up, those of them that look like trouble)."""
    lines = list(exp.lines)
    ready = next((i for i, line in enumerate(lines) if "exporting to" in line), -1)
    after = lines[ready + 1:]
    return len(after), [line for line in after if NOTEWORTHY.search(line)]


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def row(n: int, kind: str, r: dict[str, Any], base: dict[str, Any] | None) -> str:
    late = r["late"]
    lat = (f"{statistics.median(late):.2f} | {pct(late, 0.99):.2f} | {late[-1]:.2f}" if late else "- | - | -")
    cpu_x = f"{r['cpu_s'] / base['cpu_s']:.2f}x" if base and base["cpu_s"] > 0 else "-"
    rss_x = f"{r['rss_mib'] / base['rss_mib']:.2f}x" if base and base["rss_mib"] > 0 else "-"
    hwm = f"{r['hwm_mib']:.0f}" if r["hwm_mib"] is not None else "-"
    export = f"{r['export_s']:.1f}" if r["export_s"] is not None else "-"
    steady = f"{r['steady'][1]:.0f}" if r["steady"] else "-"
    return (f"| {n:,} | {kind} | {r['received']:,} | {r['records']:,} ({100 * r['records'] / n:.1f} %) | "
            f"{r['packets']:,} | {r['sock_drops']:,} | {r['captured']:,} | {r['cpu_s']:.2f} | {cpu_x} | "
            f"{steady} | {r['rss_mib']:.0f} | {rss_x} | {hwm} | {lat} | {export} |")


def notes(n: int, kind: str, r: dict[str, Any]) -> list[str]:
    out = []
    if not r["alive"]:
        out.append(f"- {n:,} {kind}: the exporter had exited before the end of the run; its last output:\n"
                   + "\n".join(f"      {line}" for line in r.get("output", "").splitlines()[-15:]))
    if r["trafgen"]:
        out.append(f"- {n:,} {kind}: trafgen {r['trafgen']}")
    if r["capture_drops"] or r["problems"]:
        out.append(f"- {n:,} {kind}: capture dropped {r['capture_drops']} datagrams; decoder problems: "
                   f"{r['problems']}")
    if r["records"] != r["flows"] or r["captured_records"] != r["captured"]:
        out.append(f"- {n:,} {kind}: more than one record for some flows: nfcapd {r['records']:,} records for "
                   f"{r['flows']:,} flows; capture {r['captured_records']:,} records for {r['captured']:,} flows")
    if r["own"]:
        out.append(f"- {n:,} {kind}: its own counters: {r['own']}")
    if r["nfcapd"]:
        out.append(f"- {n:,} {kind}: nfcapd says: {r['nfcapd']}")
    return out + steady_notes(n, kind, r)


def steady_notes(n: int, kind: str, r: dict[str, Any]) -> list[str]:
    out = []
    steady = r.get("steady")
    if not steady:
        out.append(f"- {n:,} {kind}: no RSS with N cached (the burst never ended at b, or the exporter died)")
    elif steady[0] >= IDLE_S or steady[2]:
        out.append(f"- {n:,} {kind}: RSS with N cached sampled {steady[0]:.1f} s after the burst's first packet, "
                   f"when {steady[2]:,} flows had already reached the capture: not all N were cached")
    early = [x for x in r["late"] if x < 0]
    if early:
        out.append(f"- {n:,} {kind}: {len(early):,} flows reached the capture before the idle timeout had passed "
                   f"(exported early), the earliest {-early[0]:.2f} s before it, the last {-early[-1]:.2f} s before")
    printed, trouble = r.get("said", (0, []))
    if trouble:
        out.append(f"- {n:,} {kind}: {len(trouble)} of the {printed} lines it printed after start-up look like "
                   "trouble; the first ones:\n" + "\n".join(f"      {line}" for line in trouble[:10]))
    return out


def write_conf(pair: Pair, path: Path) -> None:
    path.write_text(TRAFGEN_CONF.format(da=pair.macs["b"], sa=pair.macs["a"], src=SRC_NET, src_count=SRC_COUNT,
                                        dst=DST, sp_lo=SPORT_LO, sp_hi=SPORT_LO + SPORT_COUNT - 1, dport=DPORT))


def run(sizes: list[int], extra: str = "") -> None:
    """The scale table: one row per (N, exporter); ``extra`` is appended to pyflow's target (e.g. max-rate=N)."""
    print("## Scale: N one-packet flows in one burst, all idle-expired at once\n")
    missing = [t for t in ("trafgen", "fprobe", "softflowd", "nfcapd", "nfdump") if shutil.which(t) is None]
    if missing:
        print(f"skipped: {', '.join(missing)} not installed (`sudo make setup`, `scripts/bench-deps.sh`)\n")
        return
    sizes = [min(n, MAX_FLOWS) for n in sizes]
    results: dict[tuple[int, str], dict[str, Any]] = {}
    started = time.monotonic()
    with veth_pair("sc") as pair, tempfile.TemporaryDirectory(prefix="pyflow-scale-") as tmp:
        conf = Path(tmp) / "flows.cfg"
        write_conf(pair, conf)
        for n in sizes:
            wanted = sent_keys(n)
            for kind in KINDS:
                results[(n, kind)] = one_run(pair, kind, n, conf, wanted, extra)
    print_table(results, extra, time.monotonic() - started)


def print_table(results: dict[tuple[int, str], dict[str, Any]], extra: str, took: float) -> None:
    target = f"/ipfix,{extra}" if extra else "/ipfix (default target options)"
    print(f"trafgen a -> b at full speed, one packet per flow; exporters on b: inactive timeout {IDLE_S} s, "
          f"active {ACTIVE_S // 60} min, cache for N; pyflow --hook tc (sweeps when flows fall due), target "
          f"127.0.0.1:{PORT}{target}, --cache-entries 1M; fprobe NetFlow v5, -m 0 (no cache limit), -s 1, "
          f"-q {FPROBE_QUEUE} (pending queue; its default 100 loses most of a burst); "
          f"softflowd IPFIX, -m {CACHE}, expint=1; both libpcap ones with a {PCAP_BUFFER >> 20} MiB capture "
          "buffer. Collector: stock nfcapd on b's loopback, stopped before the exporter. CPU = the exporter "
          "process's utime+stime from just before the burst to its last record captured; RSS with N cached = "
          f"VmRSS once the burst is over and >= {STEADY_S} s after its first packet, before the {IDLE_S} s idle "
          "timeout (pyflow's flow cache is a BPF map, kernel memory outside its RSS); peak RSS = largest "
          "VmRSS sampled every 0.1 s over the same span (VmHWM: since process start, BPF compile included). "
          f"Lateness = first record of a flow captured on b's loopback - (burst's first packet at b + {IDLE_S} s), "
          "over the flows captured: a flow sent later in the burst looks later (conservative by up to the "
          "burst's duration). 'last' = the last record, seconds after the burst's first packet.\n")
    print("| flows sent | exporter | packets at b | records at nfcapd | packets at nfcapd | datagrams dropped "
          "at nfcapd socket | flows in capture | CPU s | CPU vs fprobe | RSS with N cached, MiB | peak RSS MiB | "
          "peak RSS vs fprobe | "
          "VmHWM MiB | lateness p50 s | p99 s | max s | last s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    extra_notes: list[str] = []
    for (n, kind), r in results.items():
        print(row(n, kind, r, results.get((n, "fprobe"))))
        extra_notes += notes(n, kind, r)
    bursts = ", ".join(f"{n:,}: {r['burst_s']:.2f} s" for (n, kind), r in results.items() if kind == "pyflow")
    print(f"\nburst durations at b (pyflow runs) {bursts}; the suite took {took:.0f} s\n")
    if extra_notes:
        print("\n".join(extra_notes) + "\n")
