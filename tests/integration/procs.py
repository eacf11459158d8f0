"""Processes the integration tests start and always stop: pyflow, nfcapd."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.integration.netns import in_netns

REPO = Path(__file__).resolve().parents[2]
PYFLOW = str(Path(sys.executable).parent / "pyflow")


def agent_config(iface: str, ports: Sequence[int], cache: str = "4k", *, traffic_flow: str = "",
                 sections: str = "", pyflow: str = 'sweep-interval = "250ms"\ncontrol-socket = ""\n') -> str:
    """A config file for an agent that meters ``iface`` (inactive timeout 1 s) and exports IPFIX to
    127.0.0.1 on each of ``ports``; ``traffic_flow`` adds lines to [traffic-flow], ``sections`` adds
    sections, ``pyflow`` is the [pyflow] section's body (last: lines appended to the text land there)."""
    targets = "".join(f'\n[[target]]\ndst-address = "127.0.0.1"\nport = {port}\nversion = "ipfix"\n' for port in ports)
    return (f'[traffic-flow]\nenabled = "yes"\ninterfaces = ["{iface}"]\ncache-entries = "{cache}"\n'
            f'inactive-flow-timeout = "1s"\n{traffic_flow}{targets}{sections}\n[pyflow]\n{pyflow}')


class Proc:
    """A subprocess whose stderr is collected line by line in the background."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_for_line(self, needle: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.p.poll() is not None and not self._t.is_alive()):
                    raise AssertionError(f"{self.argv[0:6]}: no line with {needle!r}; output:\n" + self.output())
                self._cv.wait(min(left, 0.2))

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._t.join(5)
        return int(self.p.returncode)


@contextmanager
def pyflow_in(ns: str, *args: str) -> Iterator[Proc]:
    proc = Proc(["ip", "netns", "exec", ns, PYFLOW, "run", *args])
    try:
        proc.wait_for_line("exporting to")
        yield proc
    finally:
        proc.stop()


class Nfcapd:
    def __init__(self, flowdir: Path, proc: Proc) -> None:
        self.flowdir = flowdir
        self.proc = proc

    def summary(self) -> str:
        """nfcapd's own closing statistics line (flows, sequence errors, bad packets)."""
        return next((ln for ln in self.proc.lines if "Sequence Errors" in ln), "")


def udp_queue_in(ns: str, port: int) -> int | None:
    """Bytes queued to the UDP socket bound to 127.0.0.1:port in ``ns`` (None: nothing bound)."""

    def read() -> int | None:
        wanted = f"0100007F:{port:04X}"
        # thread-self: this thread's network namespace (self would be the process's)
        for line in Path("/proc/thread-self/net/udp").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[1] == wanted:
                return int(cols[4].split(":")[1], 16)
        return None

    return in_netns(ns, read)


def wait_drained(ns: str, ports: Sequence[int], timeout: float = 30.0) -> None:
    """Until every collector on 127.0.0.1:port in ``ns`` has read all that was sent to it."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while (queued := udp_queue_in(ns, port)) not in (0, None):
            if time.monotonic() > deadline:
                raise AssertionError(f"127.0.0.1:{port} still has {queued} bytes queued after {timeout}s")
            time.sleep(0.02)


@contextmanager
def nfcapd_in(ns: str, workdir: Path, port: int, name: str | None = None,
              buffer: int | None = None) -> Iterator[Nfcapd]:
    """nfcapd on 127.0.0.1:port inside ``ns`` (``buffer``: its socket buffer, bytes).

    On exit it reads what is still queued to it, then it is stopped with SIGTERM, which
    makes it write its file and print its statistics (``summary()`` afterwards): nfcapd
    leaves its loop at SIGTERM without reading the datagrams still queued.  ``name``
    keeps the files of several runs on one port apart (a restarted collector).
    """
    if shutil.which("nfcapd") is None:
        raise AssertionError("nfcapd is not installed: run `sudo make setup`")
    tag = name or str(port)
    flowdir = workdir / f"nfcapd-{tag}"
    flowdir.mkdir()
    pidfile = workdir / f"nfcapd-{tag}.pid"
    argv = ["ip", "netns", "exec", ns, "nfcapd", "-w", str(flowdir), "-p", str(port), "-b", "127.0.0.1",
            *(["-B", str(buffer)] if buffer else []), "-P", str(pidfile)]
    proc = Proc(argv)
    try:
        proc.wait_for_line("Startup", timeout=15)
        yield Nfcapd(flowdir, proc)
        wait_drained(ns, [port])
    finally:
        proc.stop(signal.SIGTERM)
        if pidfile.exists():
            pidfile.unlink()


def nfdump_records(flowdir: Path) -> list[dict[str, str]]:
    """Every record nfcapd stored, as nfdump's CSV rows."""
    out = subprocess.run(["nfdump", "-R", str(flowdir), "-q", "-N", "-o", "csv"], capture_output=True,
                         text=True, check=True).stdout
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if not lines:
        return []
    header = [
        "ts", "te", "td", "sa", "da", "sp", "dp", "pr", "flg", "fwd", "stos",
        "ipkt", "ibyt", "opkt", "obyt", "in", "out",
    ]
    rows = []
    for ln in lines:
        if ln.startswith("ts,") or "," not in ln:
            continue
        vals = [v.strip() for v in ln.split(",")]
        rows.append(dict(zip(header, vals[: len(header)], strict=True)))
    return rows


def env_ok() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, BPF)"
    return None


class Capture:
    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    def captured(self) -> int:
        return sum(" UDP " in line for line in self.proc.lines)

    def wait_captured(self, n: int, timeout: float = 30.0) -> None:
        """Until ``n`` datagrams are in the capture (dumpcap pulls its ring buffer in batches)."""
        deadline = time.monotonic() + timeout
        while self.captured() < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"tshark captured {self.captured()} of {n} datagrams:\n{self.proc.output()}")
            time.sleep(0.05)


@contextmanager
def tshark_capture_in(ns: str, pcap: Path, ports: list[int], iface: str = "lo") -> Iterator[Capture]:
    """Capture the UDP datagrams to ``ports`` on ``iface`` inside ``ns`` into ``pcap``.

    ``-P -l`` prints a summary line per packet as it is written, so the test
    can wait for the count it expects before stopping the capture.
    """
    if shutil.which("tshark") is None:
        raise AssertionError("tshark is not installed: run `sudo make setup`")
    filt = "udp and (" + " or ".join(f"dst port {p}" for p in ports) + ")"
    proc = Proc(["ip", "netns", "exec", ns, "tshark", "-n", "-l", "-P", "-i", iface, "-f", filt, "-w", str(pcap)])
    try:
        proc.wait_for_line("Capturing on", timeout=30)
        yield Capture(proc)
    finally:
        proc.stop(signal.SIGINT)


def tshark_cflow(pcap: Path, ports: list[int], fields: list[str], display_filter: str = "cflow") -> list[list[str]]:
    """Decode ``pcap`` with tshark's cflow dissector: one row per packet, one list per field."""
    argv = ["tshark", "-n", "-r", str(pcap)]
    for p in ports:
        argv += ["-d", f"udp.port=={p},cflow"]
    argv += ["-Y", display_filter, "-T", "fields", "-E", "aggregator=;", "-E", "occurrence=a"]
    for f in fields:
        argv += ["-e", f]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return [line.split("\t") for line in out.splitlines() if line.strip()]


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every dict inside a tshark JSON layer, depth first."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


# debug: true logs each datagram the core reads, so a test knows when all arrived.
NFACCTD_CONFIG = """\
daemonize: false
debug: true
nfacctd_ip: {host}
nfacctd_port: {port}
plugins: print
aggregate: src_host, dst_host, src_port, dst_port, proto
print_output: csv
print_output_file: {csv}
print_output_file_append: true
print_refresh_time: 1
print_num_protos: true
"""


class Nfacctd:
    def __init__(self, proc: Proc, csv_path: Path) -> None:
        self.proc = proc
        self.csv_path = csv_path

    def received(self) -> int:
        """Datagrams its core has read so far."""
        return sum("Received NetFlow" in line or "Received IPFIX" in line for line in self.proc.lines)

    def wait_received(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.received() < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"nfacctd read {self.received()} of {n} datagrams:\n{self.proc.output()}")
            time.sleep(0.05)

    def totals(self) -> dict[tuple[str, str, int, int, int], tuple[int, int]]:
        """Packets and bytes per (src, dst, sport, dport, proto), summed over every purge in the CSV."""
        if not self.csv_path.exists():
            return {}
        totals: dict[tuple[str, str, int, int, int], tuple[int, int]] = {}
        with self.csv_path.open() as f:
            for row in csv.DictReader(f):
                if row.get("SRC_IP") in (None, "SRC_IP"):  # each purge repeats the header line
                    continue
                key = (row["SRC_IP"], row["DST_IP"], int(row["SRC_PORT"]), int(row["DST_PORT"]),
                       int(row["PROTOCOL"]))
                packets, octets = totals.get(key, (0, 0))
                totals[key] = (packets + int(row["PACKETS"]), octets + int(row["BYTES"]))
        return totals


@contextmanager
def nfacctd_in(ns: str | None, workdir: Path, port: int, host: str = "127.0.0.1") -> Iterator[Nfacctd]:
    """pmacct's nfacctd on host:port (inside ``ns`` unless None), printing CSV.

    Its core hands the last records to the print plugin only when more data
    comes or it exits, so: wait_received(n), then leave the block; it is
    stopped with SIGINT (SIGTERM does not stop it), which flushes a last purge.
    """
    if shutil.which("nfacctd") is None:
        raise AssertionError("nfacctd is not installed: run `sudo make setup`")
    out = workdir / f"nfacctd-{port}.csv"
    conf = workdir / f"nfacctd-{port}.conf"
    conf.write_text(NFACCTD_CONFIG.format(host=host, port=port, csv=out))
    prefix = ["ip", "netns", "exec", ns] if ns else []
    proc = Proc([*prefix, "nfacctd", "-f", str(conf)])
    try:
        proc.wait_for_line("waiting for NetFlow", timeout=30)
        yield Nfacctd(proc, out)
    finally:
        proc.stop(signal.SIGINT)


def udp_rx_queue(port: int, host_hex: str = "0100007F", proc_net: Path = Path("/proc/net/udp")) -> int | None:
    """Bytes waiting in the receive queue of the UDP socket bound to host:port, or None if unbound.

    Reads /proc/net/udp of the caller's network namespace (``host_hex`` is the
    address as the kernel prints it: 127.0.0.1 -> 0100007F).
    """
    wanted = f"{host_hex}:{port:04X}"
    for line in proc_net.read_text().splitlines()[1:]:
        cols = line.split()
        if cols[1] == wanted:
            return int(cols[4].split(":")[1], 16)
    return None


def wait_udp_drained(port: int, timeout: float = 15.0) -> None:
    """Until the collector on 127.0.0.1:port has read every datagram queued to it."""
    deadline = time.monotonic() + timeout
    while (queued := udp_rx_queue(port)) not in (0, None):
        if time.monotonic() > deadline:
            raise AssertionError(f"127.0.0.1:{port} still has {queued} bytes queued after {timeout}s")
        time.sleep(0.01)
