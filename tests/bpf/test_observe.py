"""Observers on the real maps (issue 15, finding 1): ``FlowMeter.scan`` reads the cache apart from
the sweep's reader, and the accounting gap's books, kept by the sweep, match the kernel's counters."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from pyflow.agent import Agent
from pyflow.config import Settings
from pyflow.errors import KernelError
from pyflow.kernel import abi
from pyflow.kernel.bpfsys import map_delete, map_update_batch
from pyflow.kernel.loader import FlowMeter, KernelSettings
from pyflow.metrics import Metrics
from tests.bpf.conftest import TEST_IFINDEX

if TYPE_CHECKING:
    from tests.bpf.conftest import Harness

pytestmark = pytest.mark.root


def udp(sport: int, payload: int = 20) -> bytes:
    return bytes(Ether() / IP(src="192.0.2.30", dst="198.51.100.31") / UDP(sport=sport, dport=53) / (b"o" * payload))


def ids(chunks: list[np.ndarray]) -> list[int]:
    return sorted(int(i) for c in chunks for i in c)


def test_a_scan_and_the_sweeps_reader_read_at_once_without_mixing_up(harness: Harness) -> None:
    for sport in range(1000, 1200):
        harness.run(udp(sport))
    _, values = harness.meter.read_flows()
    every = sorted(int(i) for i in values["flow_id"])
    assert len(every) == 200
    scanned: list[np.ndarray] = []
    swept: list[np.ndarray] = []
    with harness.meter.scan(64) as scan:
        readers = [(iter(scan), scanned), (harness.meter.read_chunks(64), swept)]
        while readers:  # one step of each in turn: both readers' buffers in use at once
            for pair in list(readers):
                step = next(pair[0], None)
                if step is None:
                    readers.remove(pair)
                else:
                    pair[1].append(step[2]["flow_id"].copy())
    assert ids(scanned) == every and ids(swept) == every


def test_a_scan_outlives_its_meter_and_a_closed_meter_gives_none() -> None:
    meter = FlowMeter(KernelSettings(cache_entries=64))
    try:
        meter.load()
        keys = np.zeros(5, abi.FLOW_KEY_DTYPE)
        keys["src_port"] = np.arange(5)
        values = np.zeros(5, abi.FLOW_VALUE_DTYPE)
        values["flow_id"] = np.arange(1, 6)
        map_update_batch(meter.flows_fd, keys, values)
        scan = meter.scan()
    finally:
        meter.close()
    assert ids([v["flow_id"].copy() for _, _, v in scan]) == [1, 2, 3, 4, 5]
    with pytest.raises(KernelError, match="closed"):
        meter.scan()


def test_the_sweeps_books_match_the_kernels_counters(harness: Harness) -> None:
    """metered - accounted (as of a sweep) stays put while packets are metered and recorded, and
    grows by what vanished from the cache without a record."""
    agent = Agent(Settings(interfaces=("lo",), cache_entries=256), harness.meter, [], log=lambda _m: None,
                  metrics=Metrics(CollectorRegistry(), process=False))

    def inside() -> int:
        seen = agent.observed
        assert seen.metered is not None and seen.accounted is not None and seen.meter is harness.meter
        return seen.metered.get(TEST_IFINDEX, 0) - seen.accounted.get(TEST_IFINDEX, 0)

    agent.tick()
    start = inside()  # earlier tests' packets: counted, cleared from the cache without records
    for sport in range(2000, 2010):
        for _ in range(3):
            harness.run(udp(sport))
    agent.tick()
    assert inside() == start and agent.observed.cached == 10
    keys, _ = harness.meter.read_flows()
    lost = keys[0].tobytes()
    assert map_delete(harness.meter.flows_fd, lost)  # an entry gone without a record: its 3 packets
    harness.run(udp(2000))
    agent.tick()
    assert inside() == start + 3
