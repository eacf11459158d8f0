"""A real nfcapd on 127.0.0.1 for a test: send it datagrams, read back what nfdump stored.

Used by the v9 and IPFIX collector tests.  nfcapd runs in a temporary
directory, is stopped with SIGTERM (it then prints its per-ident totals,
including "Sequence Errors: N, Bad Packets: N"), and the flows are read
with ``nfdump -R dir -q -N -o csv`` (times in UTC) and ``-o raw`` (which
resolves interface names from the options records).
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.procs import wait_udp_drained

# The columns of nfdump 1.7.1's csv format (the header line, which -q suppresses).
CSV_COLUMNS = (
    *("ts", "te", "td", "sa", "da", "sp", "dp", "pr", "flg", "fwd", "stos", "ipkt", "ibyt", "opkt", "obyt"),
    *("in", "out", "sas", "das", "smk", "dmk", "dtos", "dir", "nh", "nhb", "svln", "dvln", "ismc", "odmc"),
    *("idmc", "osmc", *(f"mpls{i}" for i in range(1, 11)), "cl", "sl", "al", "ra", "eng", "exid", "tr"),
)

requires_nfdump = pytest.mark.skipif(
    shutil.which("nfcapd") is None or shutil.which("nfdump") is None,
    reason="nfcapd/nfdump are not installed (apt-get install nfdump)",
)


@dataclass
class Collected:
    flows: list[dict[str, str]]  # one csv row per stored flow, keyed by CSV_COLUMNS
    log: str  # nfcapd's own output, up to and including its exit totals
    raw: str  # nfdump -o raw

    def raw_records(self) -> list[dict[str, str]]:
        """The ``-o raw`` flow records as ``{label: value}``: ``first``/``last`` are epoch ms,
        ``input`` is the ifindex followed by the interface name nfdump learnt from options."""
        records: list[dict[str, str]] = []
        for line in self.raw.splitlines():
            if line.startswith("Flow Record"):
                records.append({})
            elif records and "=" in line:
                label, _, value = line.partition("=")
                records[-1][label.strip()] = value.strip()
        return records


def collect(datagrams: list[bytes], workdir: Path) -> Collected:
    """Run nfcapd, send ``datagrams`` to it in order, stop it, and return what it stored."""
    flowdir = workdir / "flows"
    flowdir.mkdir(parents=True)
    port = _free_udp_port()
    env = {**os.environ, "TZ": "UTC"}
    proc = subprocess.Popen(
        ["nfcapd", "-b", "127.0.0.1", "-p", str(port), "-w", str(flowdir), "-t", "3600", "-v"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        _wait_until_bound(port, proc)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for datagram in datagrams:
                sock.sendto(datagram, ("127.0.0.1", port))
                wait_udp_drained(port)  # never overrun its socket buffer; nfcapd reads one at a time
    finally:
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=30)
    read = ["nfdump", "-R", str(flowdir), "-q", "-N"]
    table = subprocess.run([*read, "-o", "csv"], capture_output=True, text=True, check=True, env=env).stdout
    raw = subprocess.run([*read, "-o", "raw"], capture_output=True, text=True, check=True, env=env).stdout
    rows = [dict(zip(CSV_COLUMNS, (v.strip() for v in row), strict=True)) for row in csv.reader(table.splitlines())]
    return Collected(rows, log, raw)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_bound(port: int, proc: subprocess.Popen[str]) -> None:
    """Poll /proc/net/udp until nfcapd listens (its log is block-buffered into the pipe)."""
    wanted = f"0100007F:{port:04X}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nfcapd exited early: {proc.communicate()[0]}")
        if any(line.split()[1] == wanted for line in Path("/proc/net/udp").read_text().splitlines()[1:]):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nfcapd did not bind 127.0.0.1:{port}")
