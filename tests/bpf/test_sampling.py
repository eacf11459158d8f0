"""RouterOS packet sampling in the kernel: sampling-interval N packets sampled, sampling-space M skipped.

The position in the pattern is per CPU, so each test pins itself to one CPU
for its runs; every packet is either metered or counted as sampled_out.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from pyflow.kernel import abi
from pyflow.kernel.loader import FlowMeter, KernelSettings
from tests.bpf.conftest import Harness, _meter

pytestmark = pytest.mark.root

PKT = bytes(Ether() / IP(src="192.0.2.1", dst="198.51.100.2") / UDP(sport=1, dport=2) / (b"s" * 18))


@pytest.fixture
def one_cpu() -> Iterator[None]:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def meter_with(interval: int, space: int) -> Iterator[FlowMeter]:
    yield from _meter(KernelSettings(cache_entries=256, sampling_interval=interval, sampling_space=space))


@pytest.fixture
def two_of_five(_require_root: None) -> Iterator[FlowMeter]:
    yield from meter_with(2, 3)


@pytest.fixture
def one_in_four(_require_root: None) -> Iterator[FlowMeter]:
    yield from meter_with(4, 0)


def run_pattern(meter: FlowMeter, n: int) -> tuple[list[int], dict[abi.Counter, int]]:
    """Run ``n`` packets; which of them were metered (by index), and the counter deltas."""
    h = Harness(meter)
    before = h.counters()
    taken = []
    for i in range(n):
        pk_before = int(h.flows()[1]["packets"].sum())
        assert h.run(PKT) == h.XDP_PASS
        if int(h.flows()[1]["packets"].sum()) > pk_before:
            taken.append(i)
    return taken, h.delta(before, h.counters())


def test_interval_then_space(two_of_five: FlowMeter, one_cpu: None) -> None:
    """sampling-interval=2 sampling-space=3: packets 0,1 in, 2,3,4 out, 5,6 in, ..."""
    taken, delta = run_pattern(two_of_five, 12)
    assert taken == [0, 1, 5, 6, 10, 11]
    assert delta == {abi.Counter.PACKETS_SEEN: 12, abi.Counter.METERED: 6, abi.Counter.SAMPLED_OUT: 6}


def test_no_space_is_one_in_interval(one_in_four: FlowMeter, one_cpu: None) -> None:
    taken, delta = run_pattern(one_in_four, 12)
    assert taken == [0, 4, 8]
    assert delta == {abi.Counter.PACKETS_SEEN: 12, abi.Counter.METERED: 3, abi.Counter.SAMPLED_OUT: 9}


def test_space_without_interval_is_refused() -> None:
    from pyflow.errors import KernelError

    with pytest.raises(KernelError, match="sampling-space needs a sampling-interval"):
        KernelSettings(sampling_space=3)
    with pytest.raises(KernelError, match="sampling_interval"):
        KernelSettings(sampling_interval="1; system()")  # type: ignore[arg-type]
