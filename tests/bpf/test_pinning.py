"""The agent's raw view of the maps, pinned instances, and the spill ring read through its pages.

* the raw-fd reads (batch, per-CPU sums) equal what bcc reads from the same maps;
* per-CPU values: what ran on each CPU is in that CPU's slot, and the sums are exact;
* the ring buffer reader delivers every record of a bcc-compiled producer, in order,
  skipping discarded ones, across many wrap-arounds, and hands back only what was
  committed (a new reader starts again from the last commit);
* a meter compiled in a child and pinned in a bpffs is the same program: it can be
  let go (as by a killed agent), found again by its pins or, with the pins gone,
  through its program, and its baseline survives;
* the manifest and the agent's own maps.

Pinned instances go into a bpffs the test mounts under its tmp_path (never the host's).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from pyflow.errors import KernelError
from pyflow.kernel import abi, bpfsys, pin
from pyflow.kernel.cache import EXPORTED_ROW_DTYPE
from pyflow.kernel.loader import FlowMeter, KernelSettings
from pyflow.sweep import Baseline
from tests.bpf.conftest import TEST_IFINDEX, xdp_ctx

if TYPE_CHECKING:
    from tests.bpf.conftest import Harness

pytestmark = pytest.mark.root

C = abi.Counter


def udp(sport: int, payload: int = 10, dport: int = 53) -> bytes:
    return bytes(Ether() / IP(src="192.0.2.31", dst="198.51.100.32") / UDP(sport=sport, dport=dport)
                 / (b"p" * payload))


def on_cpu(cpu: int) -> Any:
    class _Pin:
        def __enter__(self) -> None:
            self.old = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {cpu})

        def __exit__(self, *_exc: object) -> None:
            os.sched_setaffinity(0, self.old)

    return _Pin()


def bcc_sum(per_cpu: Any) -> np.ndarray:
    """bcc's per-CPU value (one ctypes struct per CPU) summed, the way the loader used to."""
    arr = np.frombuffer(b"".join(bytes(v) for v in per_cpu), dtype=abi.IFACE_STATS_DTYPE)
    out = np.zeros((), dtype=abi.IFACE_STATS_DTYPE)
    out["counters"] = arr["counters"].sum(axis=0)
    out["metered_bytes"] = arr["metered_bytes"].sum()
    return out


# -- raw reads equal bcc's ------------------------------------------------------------------


def test_raw_reads_equal_bccs(harness: Harness) -> None:
    meter = harness.meter
    for i in range(5):
        harness.run(udp(7000 + i, payload=i))
        harness.run(udp(7000 + i, payload=i))
    harness.run(bytes(Ether(type=0x0806) / (b"\0" * 28)))

    # the flow cache: batch read == bcc's item by item lookups
    keys, values = harness.flows()
    table = meter.table("flows")
    by_bcc = {bytes(k): bytes(v) for k, v in table.items()}
    assert {k.tobytes(): v.tobytes() for k, v in zip(keys, values, strict=True)} == by_bcc
    assert len(by_bcc) == 5

    # per-CPU counters: the raw batch reads, summed, == bcc's per-CPU values, summed
    raw = meter.read_iface_stats()
    expect: dict[tuple[int, int], np.ndarray] = {}
    for slot, per_cpu in meter.table("iface_slots").items():
        total = bcc_sum(per_cpu)
        if total["counters"].any():
            expect[divmod(int(slot.value), len(abi.Hook))] = total
    for k, per_cpu in meter.table("iface_stats").items():
        expect[(int(k.ifindex), int(k.hook))] = bcc_sum(per_cpu)
    assert raw.keys() == expect.keys()
    for key, st in raw.items():
        assert st.tobytes() == expect[key].tobytes(), key
    assert int(raw[(TEST_IFINDEX, int(abi.Hook.XDP))]["counters"][C.NOT_IP]) >= 1

    # flows created: the raw per-CPU lookup == bcc's getvalue
    assert meter.flows_created() == int(sum(meter.table("flow_seq").getvalue(ctypes.c_int(0))))


def test_per_cpu_values_land_on_their_cpu(harness: Harness) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    n_possible = bpfsys.possible_cpus()
    assert n_possible >= len(cpus)
    fd = harness.meter.maps["iface_slots"]
    slot = (TEST_IFINDEX * len(abi.Hook) + int(abi.Hook.XDP)).to_bytes(4, "little")
    before = bpfsys.percpu_lookup(fd, slot, abi.IFACE_STATS_DTYPE, n_possible)
    assert before is not None and before.shape == (n_possible,)
    runs = {cpu: 3 + 2 * i for i, cpu in enumerate(cpus)}
    for cpu, n in runs.items():
        with on_cpu(cpu):
            for j in range(n):
                harness.run(udp(8000 + cpu, payload=j))
    after = bpfsys.percpu_lookup(fd, slot, abi.IFACE_STATS_DTYPE, n_possible)
    assert after is not None
    moved = after["counters"][:, C.METERED] - before["counters"][:, C.METERED]
    assert {cpu: int(moved[cpu]) for cpu in cpus} == runs
    assert int(moved.sum()) == sum(runs.values())
    # and the per-CPU batch reader sees the same
    keys, per_cpu = bpfsys.PerCpuReader(fd, np.dtype("<u4"), abi.IFACE_STATS_DTYPE, 3 * 1024, n_possible).read()
    row = int(np.flatnonzero(keys == int.from_bytes(slot, "little"))[0])
    assert per_cpu[row].tobytes() == after.tobytes()


# -- the resume map -------------------------------------------------------------------------


def test_an_expired_entry_is_never_written_the_flow_goes_on_in_the_resume_map(_require_root: None) -> None:
    """With a 1 ns inactive timeout every entry has expired by the next packet: the second packet
    starts the flow's entry in the resume map, and with both expired (no agent here to take either
    out) the rest are counted as sweep_behind, never added to an expired entry."""
    with FlowMeter(KernelSettings(cache_entries=64, inactive_timeout_ns=1, end_idle_ns=1)) as meter:
        fd = meter.load()
        sizes = [1 + (i % 200) for i in range(50)]
        for size in sizes:
            pkt = udp(9100, payload=size)
            bpfsys.prog_test_run(fd, pkt, ctx=xdp_ctx(pkt))
        counters = meter.read_counters()
        flows = meter.read_map(abi.CacheMap.FLOWS)[1]
        resumed = meter.read_map(abi.CacheMap.RESUMED)[1]
        assert flows["packets"].tolist() == [1] and flows["bytes"].tolist() == [28 + sizes[0]]
        assert resumed["packets"].tolist() == [1] and resumed["bytes"].tolist() == [28 + sizes[1]]
        assert resumed["first_seen_ns"][0] > flows["last_seen_ns"][0]  # a new flow from its first packet
        assert resumed["flow_id"][0] != flows["flow_id"][0]
        assert (counters[C.METERED], counters[C.RESUMED], counters[C.SWEEP_BEHIND]) == (1, 1, len(sizes) - 2)
        # the agent takes the expired entry out of the cache: the next packet starts a new one there
        bpfsys.map_delete(meter.flows_fd, meter.read_map(abi.CacheMap.FLOWS)[0][0].tobytes())
        pkt = udp(9100, payload=7)
        bpfsys.prog_test_run(fd, pkt, ctx=xdp_ctx(pkt))
        flows = meter.read_map(abi.CacheMap.FLOWS)[1]
        assert flows["packets"].tolist() == [1] and flows["bytes"].tolist() == [35]
        assert meter.read_counters()[C.METERED] == 2


def test_evict_threshold_is_per_map(_require_root: None) -> None:
    """The agent's early-export threshold of one map never freezes the other map's entries."""
    with FlowMeter(KernelSettings(cache_entries=64)) as meter:
        fd = meter.load()
        pkt = udp(9200)
        bpfsys.prog_test_run(fd, pkt, ctx=xdp_ctx(pkt))
        meter.set_evict_threshold(abi.CacheMap.RESUMED, 1 << 62)
        assert meter.evict_threshold(abi.CacheMap.RESUMED) == 1 << 62
        assert meter.evict_threshold(abi.CacheMap.FLOWS) == 0
        bpfsys.prog_test_run(fd, pkt, ctx=xdp_ctx(pkt))
        assert meter.read_map(abi.CacheMap.FLOWS)[1]["packets"].tolist() == [2]
        meter.set_evict_threshold(abi.CacheMap.FLOWS, 1 << 62)
        bpfsys.prog_test_run(fd, pkt, ctx=xdp_ctx(pkt))  # frozen in flows: a new entry in resumed
        assert meter.read_map(abi.CacheMap.FLOWS)[1]["packets"].tolist() == [2]
        assert meter.read_map(abi.CacheMap.RESUMED)[1]["packets"].tolist() == [1]
        bpfsys.prog_test_run(fd, pkt, ctx=xdp_ctx(pkt))  # both frozen, neither taken out: the agent is behind
        assert meter.read_map(abi.CacheMap.RESUMED)[1]["packets"].tolist() == [1]
        assert meter.read_counters()[C.SWEEP_BEHIND] == 1


# -- pinned instances -------------------------------------------------------------------------


@pytest.fixture
def bpffs(tmp_path: Path, _require_root: None) -> Iterator[pin.NetnsPins]:
    """A bpffs of this test's own (and a lock directory), as NetnsPins."""
    root = tmp_path / "bpffs"
    root.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True)
    pins = pin.NetnsPins(root=root, run_dir=tmp_path / "run")
    try:
        pins.open(lambda _m: None)
        yield pins
    finally:
        pins.close()
        subprocess.run(["umount", str(root)], check=False)


def test_compiled_in_a_child_pinned_and_found_again(bpffs: pin.NetnsPins) -> None:
    settings = KernelSettings(cache_entries=128)
    inst = bpffs.compile(settings)
    assert inst.path is not None and inst.path.parent == bpffs.dir
    names = sorted(os.listdir(inst.path))
    assert names == sorted([*pin.REQUIRED_MAPS, pin.SESSION, "prog_xdp", "prog_tc_ingress", "prog_tc_egress"])
    meter = FlowMeter.from_instance(inst)
    assert meter.settings == settings and meter.bpf is None
    m = inst.manifest
    assert m["format"] == pin.FORMAT and m["netns"] == bpffs.netns and m["source"] == pin.source_hash()
    assert m["programs"] == {h: meter.prog_id(h) for h in pin.HOOKS}
    with pytest.raises(KeyError):
        meter.table("flows")  # no bcc here

    fd = meter.load("xdp")
    for i in range(3):
        pkt = udp(9200 + i)
        bpfsys.prog_test_run(fd, pkt, ctx=xdp_ctx(pkt))
    keys, values = meter.read_flows()
    assert sorted(keys["src_port"].tolist()) == [9200, 9201, 9202]
    created = meter.flows_created()
    base = Baseline(np.array([int(values["flow_id"][0])], dtype=np.uint64), np.array([1], dtype=np.uint64),
                    np.array([38], dtype=np.uint64), np.array([12345], dtype=np.uint64))
    meter.write_exported(*Baseline().changes(base, EXPORTED_ROW_DTYPE))
    assert meter.load_session() == b""  # a new instance: no export session yet
    session = b'{"format":1,"boot_unix_ms":1700000000000,"targets":{}}'
    assert meter.save_session(session)
    with pytest.raises(KernelError, match="export session would be"):
        meter.save_session(bytes(pin.SESSION_SIZE))
    path = meter.pinned_at
    meter.release()  # what a killed agent leaves: pinned, counting
    assert path is not None and path.is_dir()

    (again,) = bpffs.find(lambda _m: None)
    meter2 = FlowMeter.from_instance(again)
    try:
        assert meter2.pinned_at == path
        keys2, _ = meter2.read_flows()
        assert sorted(keys2["src_port"].tolist()) == [9200, 9201, 9202]
        assert meter2.flows_created() == created
        loaded = Baseline.from_rows(meter2.read_exported())
        assert [x.tolist() for x in (loaded.ids, loaded.packets, loaded.bytes, loaded.start_ns)] == \
            [x.tolist() for x in (base.ids, base.packets, base.bytes, base.start_ns)]
        assert meter2.load_session() == session  # the export session goes on with the instance
        meter2.write_exported(*loaded.changes(Baseline(), EXPORTED_ROW_DTYPE))
        assert len(meter2.read_exported()) == 0
    finally:
        meter2.close()
    assert not path.exists()  # closed: unpinned


def test_found_through_its_program_when_the_pins_are_gone(bpffs: pin.NetnsPins) -> None:
    """ip netns exec: the bpffs an agent mounted is gone with it; its attached program is not.
    (Here a held fd of the program stands for the attachment.)"""
    inst = bpffs.compile(KernelSettings(cache_entries=64))
    meter = FlowMeter.from_instance(inst)
    fd = meter.load("xdp")
    pkt = udp(9300)
    bpfsys.prog_test_run(fd, pkt, ctx=xdp_ctx(pkt))
    held = os.dup(fd)
    name = inst.name
    assert inst.path is not None
    pin.remove_pins(inst.path)
    meter.release()
    try:
        found = bpffs.find(lambda _m: None)
        mine = [i for i in found if i.name == name]
        assert len(mine) == 1 and mine[0].found_by == "programs"
        # the XDP program is alive (held), the TC ones went with their last fd: not complete,
        # so pyflow run drains it and replaces it with a new one; every map is there
        assert set(mine[0].progs) == {"xdp"} and not mine[0].complete
        assert set(pin.REQUIRED_MAPS) <= set(mine[0].maps)
        again = FlowMeter.from_instance(mine[0])
        try:
            assert again.pinned_at == bpffs.dir / name  # pinned again
            assert sorted(p for p in os.listdir(bpffs.dir / name) if p.startswith("prog_")) == ["prog_xdp"]
            keys, _ = again.read_flows()
            assert keys["src_port"].tolist() == [9300]
        finally:
            again.close()
        for other in found:
            if other is not mine[0]:
                other.close()
    finally:
        os.close(held)


def test_a_broken_compile_leaves_nothing_pinned(bpffs: pin.NetnsPins, tmp_path: Path) -> None:
    from pyflow.errors import KernelError

    bad = tmp_path / "bpf"
    bad.mkdir()
    (bad / "flowmeter.h").write_text((abi.BPF_DIR / "flowmeter.h").read_text())
    (bad / "flowmeter.c").write_text("this is not C\n")
    with pytest.raises(KernelError, match="compiling"):
        bpffs.compile(KernelSettings(cache_entries=64), bpf_dir=bad)
    assert not bpffs.dir.exists() or os.listdir(bpffs.dir) == []


def test_one_agent_per_network_namespace(bpffs: pin.NetnsPins) -> None:
    from pyflow.errors import PyflowError

    second = pin.NetnsPins(root=bpffs.root, run_dir=bpffs.lock.path.parent)
    with pytest.raises(PyflowError, match=rf"another pyflow agent \(pid {os.getpid()}\) is running"):
        second.open(lambda _m: None)


def test_fin_seen_counts_each_flows_first_fin_or_rst(_require_root: None) -> None:
    """The agent's cue to sweep an end-idle timeout later: once per flow, at its first FIN or RST
    (a flow that starts with one counts at once), never for later ones or for other packets."""
    from scapy.layers.inet import TCP

    def tcp(sport: int, flags: str) -> bytes:
        return bytes(Ether() / IP(src="192.0.2.1", dst="198.51.100.1") / TCP(sport=sport, dport=443, flags=flags))

    with FlowMeter(KernelSettings(cache_entries=64)) as meter:
        fd = meter.load()
        for pkt in (tcp(1, "S"), tcp(1, "A"), tcp(1, "FA"), tcp(1, "FA"), tcp(1, "RA"),  # flow 1: one
                    tcp(2, "R"), tcp(2, "A"),  # flow 2 starts with RST: one
                    udp(9300), tcp(3, "A")):  # no FIN, no RST: none
            bpfsys.prog_test_run(fd, pkt, ctx=xdp_ctx(pkt))
        assert meter.fin_events() == 2
