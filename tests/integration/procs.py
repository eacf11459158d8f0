"""Processes the integration tests start and always stop: pyflow, nfcapd."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYFLOW = str(Path(sys.executable).parent / "pyflow")


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


@contextmanager
def nfcapd_in(ns: str, workdir: Path, port: int, host: str = "127.0.0.1") -> Iterator[Nfcapd]:
    """nfcapd listening on host:port inside ``ns``.

    On exit it is stopped with SIGTERM, which makes it write its file and
    print its statistics (read them with ``summary()`` afterwards).
    """
    if shutil.which("nfcapd") is None:
        raise AssertionError("nfcapd is not installed: run `sudo make setup`")
    flowdir = workdir / f"nfcapd-{port}"
    flowdir.mkdir()
    pidfile = workdir / f"nfcapd-{port}.pid"
    argv = ["ip", "netns", "exec", ns, "nfcapd", "-w", str(flowdir), "-p", str(port), "-b", host,
            "-P", str(pidfile)]
    proc = Proc(argv)
    try:
        proc.wait_for_line("Startup", timeout=15)
        yield Nfcapd(flowdir, proc)
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
