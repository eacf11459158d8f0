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
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from pyflow.kernel import abi, bpfsys, pin
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
    n_possible = pin.possible_cpus()
    assert n_possible >= len(cpus)
    fd = harness.meter.maps["iface_slots"]
    slot = (TEST_IFINDEX * len(abi.Hook) + int(abi.Hook.XDP)).to_bytes(4, "little")
    before = pin.percpu_lookup(fd, slot, abi.IFACE_STATS_DTYPE, n_possible)
    assert before is not None and before.shape == (n_possible,)
    runs = {cpu: 3 + 2 * i for i, cpu in enumerate(cpus)}
    for cpu, n in runs.items():
        with on_cpu(cpu):
            for j in range(n):
                harness.run(udp(8000 + cpu, payload=j))
    after = pin.percpu_lookup(fd, slot, abi.IFACE_STATS_DTYPE, n_possible)
    assert after is not None
    moved = after["counters"][:, C.METERED] - before["counters"][:, C.METERED]
    assert {cpu: int(moved[cpu]) for cpu in cpus} == runs
    assert int(moved.sum()) == sum(runs.values())
    # and the per-CPU batch reader sees the same
    keys, per_cpu = pin.PerCpuReader(fd, np.dtype("<u4"), abi.IFACE_STATS_DTYPE, 3 * 1024, n_possible).read()
    row = int(np.flatnonzero(keys == int.from_bytes(slot, "little"))[0])
    assert per_cpu[row].tobytes() == after.tobytes()


# -- the ring buffer ------------------------------------------------------------------------

RING_SRC = rb"""
#include <uapi/linux/bpf.h>
BPF_RINGBUF_OUTPUT(rb, 1);   /* one page: wraps every few dozen records */
struct rec { __u32 seq; __u32 len; __u8 body[120]; };
int emit(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    __u32 *w = data;
    if ((void *)(w + 3) > end)
        return XDP_PASS;
    __u32 seq = w[0], len = w[1], discard = w[2];
    if (discard) {
        struct rec *r = rb.ringbuf_reserve(sizeof(struct rec));
        if (r) {
            r->seq = seq;
            rb.ringbuf_discard(r, 0);
        }
        return XDP_PASS;
    }
    struct rec r = {};
    r.seq = seq;
    r.len = len;
    r.body[0] = (__u8)seq;
    r.body[119] = (__u8)(seq >> 8);
    len &= 127;
    if (len < 8)
        len = 8;
    if (len > sizeof(r))
        len = sizeof(r);
    rb.ringbuf_output(&r, len, 0);
    return XDP_PASS;
}
"""


@pytest.fixture(scope="module")
def producer(_require_root: None) -> Iterator[tuple[Any, int]]:
    import bcc

    prog = bcc.BPF(text=RING_SRC)
    fn = prog.load_func(b"emit", bcc.BPF.XDP)
    try:
        yield prog, int(fn.fd)
    finally:
        prog.cleanup()


def emit(prog_fd: int, seq: int, length: int, discard: bool = False) -> None:
    pkt = (seq.to_bytes(4, "little") + length.to_bytes(4, "little") + int(discard).to_bytes(4, "little")
           + bytes(52))
    assert bpfsys.prog_test_run(prog_fd, pkt, ctx=xdp_ctx(pkt)).retval == 2


def test_ring_reader_delivers_every_record_in_order(producer: tuple[Any, int]) -> None:
    prog, fd = producer
    ring = pin.RingBuffer(int(prog[b"rb"].map_fd))
    assert ring.size == 4096
    rng = random.Random(7)
    got: list[tuple[int, int, bytes]] = []
    want: list[tuple[int, int]] = []

    def take(rec: memoryview) -> None:
        got.append((int.from_bytes(rec[0:4], "little"), len(rec), bytes(rec[8:9])))

    try:
        for seq in range(3000):  # ~100 times round a one-page ring
            length = rng.choice([8, 12, 13, 64, 100, 128])
            discard = rng.random() < 0.2
            emit(fd, seq, length, discard)
            if not discard:
                want.append((seq, min(max(length & 127, 8), 128)))
            if rng.random() < 0.1 or ring.producer_pos - ring.consumer_pos > 2048:
                ring.poll(take)
                ring.commit()
        ring.poll(take)
        ring.commit()
    finally:
        ring.close()
    assert [(s, n) for s, n, _ in got] == want
    assert all(b == bytes([s & 0xFF]) for s, n, b in got if n > 8)  # the record body came through


def test_ring_reader_redelivers_what_was_not_committed(producer: tuple[Any, int]) -> None:
    prog, fd = producer
    map_fd = int(prog[b"rb"].map_fd)
    first = pin.RingBuffer(map_fd)
    seen: list[int] = []
    try:
        first.poll(lambda _r: None)
        first.commit()  # an empty start
        for seq in range(5):
            emit(fd, 100 + seq, 16)
        assert first.poll(lambda r: seen.append(int.from_bytes(r[0:4], "little"))) == 5
    finally:
        first.close()  # "killed" before its commit
    again: list[int] = []
    second = pin.RingBuffer(map_fd)
    try:
        assert second.poll(lambda r: again.append(int.from_bytes(r[0:4], "little"))) == 5
        second.commit()
    finally:
        second.close()
    assert seen == again == [100, 101, 102, 103, 104]
    third = pin.RingBuffer(map_fd)
    try:
        assert third.poll(lambda _r: None) == 0  # committed: handed back
    finally:
        third.close()


def test_spill_events_come_in_order(_require_root: None) -> None:
    """The meter's own producer: with a 1 ns inactive timeout every packet after a flow's first
    is spilled; a one-page ring wraps many times; every event arrives, in order, none lost."""
    with FlowMeter(KernelSettings(cache_entries=64, inactive_timeout_ns=1, end_idle_ns=1,
                                  spill_ring_pages=1)) as meter:
        fd = meter.load()
        events: list[np.ndarray] = []
        meter.open_spill(events.append)
        pkt0 = udp(9100, payload=0)
        bpfsys.prog_test_run(fd, pkt0, ctx=xdp_ctx(pkt0))
        sizes = [1 + (i % 200) for i in range(2000)]
        for i, size in enumerate(sizes):
            pkt = udp(9100, payload=size)
            bpfsys.prog_test_run(fd, pkt, ctx=xdp_ctx(pkt))
            if i % 20 == 19:
                meter.poll_spill()
                meter.commit_spill()
        meter.poll_spill()
        meter.commit_spill()
        counters = meter.read_counters()
    got = np.concatenate(events)
    assert got["bytes"].tolist() == [28 + s for s in sizes]
    assert set(got["key"]["src_port"].tolist()) == {9100}
    assert counters[C.SPILL_LOST] == 0 and counters[C.SPILLED] == len(sizes)


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
    assert names == sorted([*pin.REQUIRED_MAPS, "prog_xdp", "prog_tc_ingress", "prog_tc_egress"])
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
    meter.save_baseline(Baseline(), base)
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
        loaded = meter2.load_baseline()
        assert [x.tolist() for x in (loaded.ids, loaded.packets, loaded.bytes, loaded.start_ns)] == \
            [x.tolist() for x in (base.ids, base.packets, base.bytes, base.start_ns)]
        meter2.save_baseline(loaded, Baseline())
        assert len(meter2.load_baseline()) == 0
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
