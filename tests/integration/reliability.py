"""Helpers of the reliability tests: a fast paced sender, interface counters, collectors
with big socket buffers, and waiting for a collector to have read everything."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tests.integration.netns import in_netns, ip
from tests.integration.procs import Nfcapd, nfcapd_in

#: the most a collector's socket may buffer (net.core.rmem_max caps it; 4 MB on the test VMs)
COLLECTOR_BUFFER = 4 << 20


def link_stats(ns: str, dev: str) -> dict[str, int]:
    """The interface's own counters (rx/tx packets, bytes, dropped), read with ip -s."""
    info = json.loads(ip("-n", ns, "-s", "-j", "link", "show", "dev", dev).stdout)[0]["stats64"]
    return {f"{side}_{k}": int(v) for side in ("rx", "tx") for k, v in info[side].items() if isinstance(v, int)}


#: A send schedule: bursts of one frame, sorted by time (seconds after the start).
SCHEDULE_DTYPE = np.dtype([("at", "<f8"), ("frame", "<i4"), ("count", "<i4")])


def schedule(at: Sequence[float] | np.ndarray, frame: Sequence[int] | np.ndarray,
             count: Sequence[int] | np.ndarray) -> np.ndarray:
    """Bursts (``count`` copies of frame number ``frame`` at time ``at``), sorted by time."""
    out = np.zeros(len(at), dtype=SCHEDULE_DTYPE)
    out["at"], out["frame"], out["count"] = at, frame, count
    return out[np.argsort(out["at"], kind="stable")]


def send_schedule(ns: str, dev: str, frames: Sequence[bytes], bursts: np.ndarray,
                  timeout: float) -> tuple[int, float]:
    """Send ``bursts`` (see ``schedule``) of raw ``frames`` out of ``dev`` inside ``ns``, each at
    its time, with an AF_PACKET socket.  Returns (frames sent, how late the latest burst went, s).

    Never runs longer than ``timeout`` (raises if the schedule could not be kept).
    """

    def go() -> tuple[int, float]:
        sent = 0
        late = 0.0
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((dev, 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            start = time.monotonic()
            for lo in range(0, len(bursts), 8192):  # plain Python numbers, a chunk at a time
                chunk = bursts[lo:lo + 8192]
                for at, index, count in zip(chunk["at"].tolist(), chunk["frame"].tolist(), chunk["count"].tolist(),
                                            strict=True):
                    now = time.monotonic() - start
                    if now > timeout:
                        raise AssertionError(f"sender: schedule not kept within {timeout}s ({sent} frames sent)")
                    if at > now:
                        time.sleep(at - now)
                    else:
                        late = max(late, now - at)
                    frame = frames[index]
                    for _ in range(count):
                        s.send(frame)
                    sent += count
        return sent, late

    return in_netns(ns, go)


def udp_drops_in(ns: str, port: int) -> int:
    """Datagrams the socket on 127.0.0.1:port dropped (its buffer was full)."""

    def read() -> int:
        wanted = f"0100007F:{port:04X}"
        for line in Path("/proc/thread-self/net/udp").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[1] == wanted:
                return int(cols[-1])
        return 0

    return in_netns(ns, read)


@contextmanager
def nfcapd(ns: str, workdir: Path, port: int, name: str | None = None) -> Iterator[Nfcapd]:
    """nfcapd on 127.0.0.1:port in ``ns`` with a 4 MB socket buffer (procs.nfcapd_in)."""
    with nfcapd_in(ns, workdir, port, name=name, buffer=COLLECTOR_BUFFER) as col:
        yield col


def metrics_in(ns: str, address: str = "127.0.0.1:9796") -> dict[str, float]:
    """The agent's Prometheus samples in ``ns``: 'name{label="v",...}' -> value (labels sorted)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = in_netns(ns, lambda: urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode())
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


def metric_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def wait_until(what: str, pred: Callable[[], bool], timeout: float = 30.0, every: float = 0.05) -> None:
    """Poll ``pred`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
ETH_P_ALL = 0x0003


class Sniffer:
    """Every frame ``dev`` (in ``ns``) receives, byte for byte, from an AF_PACKET socket.

    A VLAN tag the kernel took out of the frame into the skb's metadata is put
    back where it was (PACKET_AUXDATA), as libpcap does: the bytes are the
    frame as it came in.  Frames the host itself sends are left out.
    """

    def __init__(self, ns: str, dev: str) -> None:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((dev, 0))
            s.settimeout(0.1)
            return s

        self.sock = in_netns(ns, make)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, anc, _flags, addr = self.sock.recvmsg(65535, socket.CMSG_SPACE(20))
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] == PACKET_OUTGOING:
                continue
            for level, kind, raw in anc:
                if level == SOL_PACKET and kind == PACKET_AUXDATA and len(raw) >= 20:
                    status, _len, _snap, _mac, _net, tci, tpid = struct.unpack("=IIIHHHH", raw[:20])
                    if status & TP_STATUS_VLAN_VALID:
                        tpid = tpid if status & TP_STATUS_VLAN_TPID_VALID else 0x8100
                        data = data[:12] + struct.pack("!HH", tpid, tci) + data[12:]
            self.frames.append(data)

    def wait(self, n: int, timeout: float = 15.0) -> list[bytes]:
        wait_until(f"{n} frames (have {len(self.frames)})", lambda: len(self.frames) >= n, timeout)
        return list(self.frames)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def send_frames(ns: str, dev: str, frames: Sequence[bytes], gap: float = 0.0,
                on_first: Callable[[float], None] | None = None) -> None:
    """Send raw frames out of ``dev`` in ``ns``, in order, ``gap`` seconds apart; ``on_first``
    gets the monotonic time just before the first one goes."""

    def go() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((dev, 0))
            for i, f in enumerate(frames):
                if i and gap:
                    time.sleep(gap)
                elif not i and on_first is not None:
                    on_first(time.monotonic())
                s.send(f)

    in_netns(ns, go)
