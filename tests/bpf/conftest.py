"""Fixtures for the tests that run the real XDP program in the kernel.

Everything here compiles bpf/flowmeter.c with bcc, loads it, and runs it on
crafted packets through BPF_PROG_TEST_RUN: no interface is attached and no
traffic is touched.  That needs root (CAP_BPF + CAP_SYS_ADMIN for test runs),
so the whole directory is skipped, with the reason, for anyone else.

The meters are session-scoped (one bcc compile each); every test gets one
through a function-scoped ``Harness`` that starts and ends with an empty flow
cache.  Counters are per-CPU and never reset, so tests compare deltas.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import numpy as np
import pytest

from pyflow.kernel import abi, bpfsys
from pyflow.kernel.loader import FlowMeter, KernelSettings

XDP_PASS = 2
#: ingress_ifindex of the xdp_md context: the kernel resolves it to a real
#: device for the run, so it must exist (1 is lo).
TEST_IFINDEX = 1

CACHE_ENTRIES = 256
TINY_CACHE_ENTRIES = 4


@pytest.fixture(scope="session", autouse=True)
def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip(
            "tests/bpf loads the eBPF flow meter and runs it with BPF_PROG_TEST_RUN, which needs "
            "root (CAP_BPF/CAP_SYS_ADMIN): run `sudo .venv/bin/python -m pytest tests/bpf`"
        )


def _meter(settings: KernelSettings) -> Iterator[FlowMeter]:
    with FlowMeter(settings) as meter:
        meter.load()
        yield meter


@pytest.fixture(scope="session")
def meter(_require_root: None) -> Iterator[FlowMeter]:
    """The meter with a small (256 entry) cache and default timeouts."""
    yield from _meter(KernelSettings(cache_entries=CACHE_ENTRIES))


@pytest.fixture(scope="session")
def tiny_meter(_require_root: None) -> Iterator[FlowMeter]:
    """A meter whose cache holds 4 entries, for the cache-full path."""
    yield from _meter(KernelSettings(cache_entries=TINY_CACHE_ENTRIES))


# -- helpers -------------------------------------------------------------------


def xdp_ctx(pkt: bytes, ifindex: int = TEST_IFINDEX) -> bytes:
    """struct xdp_md for a test run: data 0, data_end len(pkt) (the kernel insists)."""
    return struct.pack("<6I", 0, len(pkt), 0, ifindex, 0, 0)


TC_ACT_UNSPEC = 0xFFFFFFFF  # -1 as the u32 a TC test run reports: no verdict, as without pyflow


def skb_ctx(ifindex: int = TEST_IFINDEX, ingress_ifindex: int = 0, gso_segs: int = 0, gso_size: int = 0,
            mark: int = 0) -> bytes:
    """struct __sk_buff for a test run (192 bytes); only the fields the kernel lets a test set."""
    ctx = bytearray(192)
    struct.pack_into("<I", ctx, 8, mark)
    struct.pack_into("<I", ctx, 36, ingress_ifindex)
    struct.pack_into("<I", ctx, 40, ifindex)
    struct.pack_into("<I", ctx, 164, gso_segs)
    struct.pack_into("<I", ctx, 176, gso_size)
    return bytes(ctx)


def test_run(meter: FlowMeter, pkt: bytes) -> bpfsys.TestRunResult:
    assert meter.prog_fd is not None
    return bpfsys.prog_test_run(meter.prog_fd, pkt, ctx=xdp_ctx(pkt))


def run(meter: FlowMeter, pkt: bytes) -> int:
    """Run the program once on ``pkt``; the XDP return code."""
    return test_run(meter, pkt).retval


def clear_flows(meter: FlowMeter) -> int:
    """Delete every entry of the flows map; how many there were."""
    keys, _ = meter.read_flows()
    raw = [k.tobytes() for k in keys]  # copy: the view is reused by the next read
    for key in raw:
        bpfsys.map_delete(meter.flows_fd, key)
    left, _ = meter.read_flows()
    assert len(left) == 0, "flows map not empty after deleting every key"
    return len(raw)


def counter_snapshot(meter: FlowMeter) -> dict[abi.Counter, int]:
    return meter.read_counters()


def counter_delta(before: dict[abi.Counter, int], after: dict[abi.Counter, int]) -> dict[abi.Counter, int]:
    """The counters that moved between two snapshots (zero deltas left out)."""
    return {c: after[c] - before[c] for c in abi.Counter if after[c] != before[c]}


class Harness:
    """One meter plus the helpers above, bound to it."""

    XDP_PASS = XDP_PASS

    def __init__(self, meter: FlowMeter) -> None:
        self.meter = meter

    def test_run(self, pkt: bytes) -> bpfsys.TestRunResult:
        return test_run(self.meter, pkt)

    def run(self, pkt: bytes) -> int:
        return run(self.meter, pkt)

    def clear(self) -> int:
        return clear_flows(self.meter)

    def counters(self) -> dict[abi.Counter, int]:
        return counter_snapshot(self.meter)

    @staticmethod
    def delta(before: dict[abi.Counter, int], after: dict[abi.Counter, int]) -> dict[abi.Counter, int]:
        return counter_delta(before, after)

    def measure(self, pkt: bytes) -> tuple[bpfsys.TestRunResult, dict[abi.Counter, int]]:
        """Run once on ``pkt``: the result and the counters that moved."""
        before = self.counters()
        res = self.test_run(pkt)
        return res, counter_delta(before, self.counters())

    def flows(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) copies, sorted by flow_id (= creation order on one CPU)."""
        keys, values = self.meter.read_flows()
        order = np.argsort(values["flow_id"], kind="stable")
        return keys[order].copy(), values[order].copy()


def clean_harness(meter: FlowMeter) -> Iterator[Harness]:
    """A harness over ``meter`` with its maps and counters cleared before and after the test."""
    h = Harness(meter)
    h.clear()
    yield h
    h.clear()


@pytest.fixture
def harness(meter: FlowMeter) -> Iterator[Harness]:
    yield from clean_harness(meter)


@pytest.fixture
def tiny_harness(tiny_meter: FlowMeter) -> Iterator[Harness]:
    yield from clean_harness(tiny_meter)
