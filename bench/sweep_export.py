"""Sweep + IPFIX encode + UDP send of a synthetic cache, against a struct-loop baseline."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable

import numpy as np

from bench.fill import synthetic_cache
from pyflow.export import ipfix
from pyflow.export.context import ExportClock
from pyflow.sweep import Baseline, Horizon, SweepRules, sweep_chunk

S = 10**9
RULES = SweepRules(active_ns=30 * 60 * S, inactive_ns=15 * S, end_idle_ns=2 * S)
NOW = 10**6 * S
WALL = 1_700_000_000 * S
CLOCK = ExportClock(unix_ns=WALL, uptime_ms=NOW // 10**6)


def sweep(keys: np.ndarray, values: np.ndarray, final: bool = False) -> np.ndarray:
    """The pure sweep over a whole synthetic cache (one chunk): its records."""
    return sweep_chunk(keys, values, Baseline(), Horizon(NOW, NOW), WALL, RULES, None, final).records


def _struct_loop_encode(records: np.ndarray) -> int:
    """Baseline: the obvious per-record struct.pack encoder (same fields as template 256)."""
    rec = struct.Struct("!4s4sHHBBBIIBBQQQQB")
    n = 0
    for r in records.tolist():
        n += len(rec.pack(bytes(r[0])[12:], bytes(r[1])[12:], r[4], r[5], r[6], r[8], r[10], r[2], r[3], r[7],
                          r[9], r[13], r[12], r[14], r[15], r[11]))
    return n


def run(sizes: list[int], repeat: int, median_time: Callable[[Callable[[], object], int], float]) -> None:
    print("## Sweep, encode, send\n")
    print("| cache | sweep s | records | IPFIX encode s | records/s | send s | datagrams | total s "
          "| struct-loop encode s | encode speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.connect(sink.getsockname())
    for n in sizes:
        keys, values = synthetic_cache(n, NOW)
        recs = sweep(keys, values)
        t_sweep = median_time(lambda k=keys, v=values: sweep(k, v), repeat)
        msgs, _ = ipfix.encode(recs, ipfix.IpfixState(), CLOCK, True, 1472)
        t_enc = median_time(lambda r=recs: ipfix.encode(r, ipfix.IpfixState(), CLOCK, True, 1472), repeat)

        def send_all(ms: list[bytes] = msgs) -> None:
            for m in ms:
                with contextlib.suppress(BlockingIOError):
                    out.send(m)
            sink.setblocking(False)
            try:
                while True:
                    sink.recv(65535)
            except BlockingIOError:
                pass

        t_send = median_time(send_all, repeat)
        sub = recs[: min(len(recs), 50_000)]
        t_loop = median_time(lambda s=sub: _struct_loop_encode(s), max(1, repeat // 2)) * len(recs) / max(1, len(sub))
        total = t_sweep + t_enc + t_send
        rate = len(recs) / t_enc if t_enc else float("inf")
        print(f"| {n:,} | {t_sweep:.4f} | {len(recs):,} | {t_enc:.4f} | {rate:,.0f} | {t_send:.4f} | {len(msgs):,} "
              f"| {total:.4f} | {t_loop:.3f} | {t_loop / t_enc:.1f}x |")
    print()


def run_formats(n: int, repeat: int, median_time: Callable[[Callable[[], object], int], float]) -> None:
    """Encode the same record batch in every format (what each target does per sweep)."""
    from pyflow.export.context import ExportContext
    from pyflow.export.registry import ENCODERS

    keys, values = synthetic_cache(n, NOW)
    recs = sweep(keys, values, final=True)
    v4 = recs[recs["ip_version"] == 4]
    sub = v4[: min(len(v4), 50_000)]
    t_loop = median_time(lambda: _struct_loop_encode(sub), max(1, repeat // 2)) * len(recs) / len(sub)
    print(f"## Encoding {len(recs):,} records in each format\n")
    print(f"baseline: a per-record `struct.pack` loop, {t_loop:.3f} s for the same number of records\n")
    print("| format | records in | s | records/s | datagrams | vs struct loop |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, version, ctx in (("IPFIX", "ipfix", ExportContext()),
                                ("IPFIX time=routeros", "ipfix", ExportContext(time_mode="routeros")),
                                ("NetFlow v9", "9", ExportContext()), ("NetFlow v5", "5", ExportContext()),
                                ("NetFlow v1", "1", ExportContext())):
        enc = ENCODERS[version]
        batch = recs if enc.carries_ipv6 else v4
        out, _ = enc.encode(batch, enc.initial_state(0), CLOCK, True, 1472, ctx)
        t = median_time(lambda e=enc, b=batch, c=ctx: e.encode(b, e.initial_state(0), CLOCK, True, 1472, c), repeat)
        print(f"| {label} | {len(batch):,} | {t:.3f} | {len(batch) / t:,.0f} | {len(out):,} "
              f"| {t_loop * len(batch) / len(recs) / t:.1f}x |")
    print()
