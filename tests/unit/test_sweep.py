"""The timeout rules as a pure function: entries + clocks in, records + deletes out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pyflow.kernel import abi
from pyflow.records import EndReason, addr_to_16
from pyflow.sweep import NEVER, Baseline, Horizon, SweepRules, expiry_ns, sweep_chunk

S = 10**9
RULES = SweepRules(active_ns=30 * 60 * S, inactive_ns=15 * S, end_idle_ns=2 * S)
WALL = 1_700_000_000 * S  # wall clock = boot clock + WALL


@dataclass
class Swept:
    records: np.ndarray
    delete: np.ndarray  # bool mask over the entries
    baseline: Baseline
    next_due_ns: int


def sweep(keys: np.ndarray, values: np.ndarray, base: Baseline, now_ns: int, wall_offset_ns: int = WALL,
          rules: SweepRules = RULES, final: bool = False, final_ns: int | None = None, evict_ns: int = 0,
          skip: np.ndarray | None = None) -> Swept:
    """One chunk swept as the agent does, its baseline changes applied (final_ns: the barrier's start)."""
    horizon = Horizon(now_ns if final_ns is None else final_ns, now_ns, evict_ns)
    r = sweep_chunk(keys, values, base, horizon, wall_offset_ns, rules, skip, final)
    mask = np.zeros(len(values), dtype=bool)
    mask[r.delete] = True
    nb = base.updated(r.drop_ids, r.cuts.ids, r.cuts.packets, r.cuts.bytes, r.cuts.start_ns)
    return Swept(r.records, mask, nb, r.next_due_ns)


def cache(*flows: dict) -> tuple[np.ndarray, np.ndarray]:
    keys = np.zeros(len(flows), dtype=abi.FLOW_KEY_DTYPE)
    values = np.zeros(len(flows), dtype=abi.FLOW_VALUE_DTYPE)
    for i, f in enumerate(flows):
        keys[i]["src_addr"] = addr_to_16("192.0.2.1")
        keys[i]["dst_addr"] = addr_to_16("198.51.100.2")
        keys[i]["ip_version"] = 4
        keys[i]["protocol"] = 6
        keys[i]["src_port"] = f.get("sport", 1000 + i)
        keys[i]["dst_port"] = 443
        keys[i]["ifindex"] = 3
        values[i]["in_ifindex"] = 3
        values[i]["packets"] = f["pk"]
        values[i]["bytes"] = f["by"]
        values[i]["first_seen_ns"] = f["first"]
        values[i]["last_seen_ns"] = f["last"]
        values[i]["flow_id"] = f.get("id", i + 1)
        values[i]["tcp_flags"] = f.get("flags", 0x10)
    return keys, values


def test_idle_flow_is_exported_and_deleted() -> None:
    keys, values = cache({"pk": 5, "by": 500, "first": 100 * S, "last": 110 * S})
    res = sweep(keys, values, Baseline(), now_ns=125 * S, wall_offset_ns=WALL, rules=RULES)
    assert res.delete.tolist() == [True]
    (r,) = res.records
    assert (r["packets"], r["bytes"], r["end_reason"]) == (5, 500, EndReason.IDLE)
    assert r["start_ms"] == (WALL + 100 * S) // 10**6
    assert r["end_ms"] == (WALL + 110 * S) // 10**6
    assert r["src_port"] == 1000 and r["ifindex"] == 3 and r["tcp_flags"] == 0x10


def test_idle_edge_is_inclusive() -> None:
    keys, values = cache({"pk": 1, "by": 40, "first": 0, "last": 10 * S})
    just_before = sweep(keys, values, Baseline(), 25 * S - 1, WALL, RULES)
    at = sweep(keys, values, Baseline(), 25 * S, WALL, RULES)
    assert len(just_before.records) == 0 and not just_before.delete.any()
    assert len(at.records) == 1 and at.delete.all()


def test_active_flow_exports_deltas_and_stays() -> None:
    keys, values = cache({"pk": 100, "by": 10_000, "first": 0, "last": 30 * 60 * S})
    now = 30 * 60 * S + S // 2
    first = sweep(keys, values, Baseline(), now, WALL, RULES)
    assert not first.delete.any()
    (r,) = first.records
    assert (r["packets"], r["bytes"], r["end_reason"]) == (100, 10_000, EndReason.ACTIVE)

    # The kernel keeps counting; the next cut exports only what came since.
    values["packets"] = 160
    values["bytes"] = 16_000
    values["last_seen_ns"] = 60 * 60 * S
    nothing_yet = sweep(keys, values, first.baseline, 45 * 60 * S, WALL, RULES)
    assert len(nothing_yet.records) == 0
    second = sweep(keys, values, nothing_yet.baseline, now + 30 * 60 * S, WALL, RULES)
    (r2,) = second.records
    assert (r2["packets"], r2["bytes"], r2["end_reason"]) == (60, 6_000, EndReason.ACTIVE)
    assert r2["start_ms"] == (WALL + now) // 10**6  # the next record begins at the cut

    # Then it goes idle: the last delta leaves, the entry is deleted, the baseline forgets it.
    values["packets"] = 170
    values["bytes"] = 17_000
    values["last_seen_ns"] = 61 * 60 * S
    last = sweep(keys, values, second.baseline, 61 * 60 * S + 15 * S, WALL, RULES)
    (r3,) = last.records
    assert (r3["packets"], r3["bytes"], r3["end_reason"]) == (10, 1_000, EndReason.IDLE)
    assert last.delete.all() and len(last.baseline) == 0


def test_active_cut_without_new_packets_sends_nothing() -> None:
    keys, values = cache({"pk": 3, "by": 300, "first": 0, "last": 30 * 60 * S - S})
    cut = sweep(keys, values, Baseline(), 30 * 60 * S, WALL, RULES)
    assert len(cut.records) == 1
    again = sweep(keys, values, cut.baseline, 60 * 60 * S - 1, WALL, RULES)
    # idle now (no packet for 31 minutes): the entry goes, with no empty record
    assert len(again.records) == 0 and again.delete.all()


def test_fin_or_rst_ends_the_flow_after_end_idle() -> None:
    keys, values = cache(
        {"pk": 4, "by": 400, "first": 0, "last": 10 * S, "flags": 0x11},  # FIN|ACK
        {"pk": 2, "by": 120, "first": 0, "last": 10 * S, "flags": 0x14},  # RST|ACK
        {"pk": 2, "by": 120, "first": 0, "last": 10 * S, "flags": 0x10},  # ACK only
    )
    res = sweep(keys, values, Baseline(), 12 * S, WALL, RULES)
    assert res.delete.tolist() == [True, True, False]
    assert [int(r["end_reason"]) for r in res.records] == [EndReason.END_OF_FLOW] * 2


def test_final_sweep_forces_everything_out_without_deleting() -> None:
    keys, values = cache({"pk": 7, "by": 700, "first": 0, "last": S}, {"pk": 1, "by": 60, "first": 0, "last": S})
    res = sweep(keys, values, Baseline(), 2 * S, WALL, RULES, final=True)
    assert not res.delete.any()
    assert [int(r["end_reason"]) for r in res.records] == [EndReason.FORCED] * 2
    assert res.records["packets"].tolist() == [7, 1]


def test_expiry_is_last_seen_plus_the_timeout_that_applies() -> None:
    _keys, values = cache(
        {"pk": 1, "by": 1, "first": 0, "last": 5 * S},
        {"pk": 1, "by": 1, "first": 0, "last": 5 * S, "flags": 0x11},
    )
    assert expiry_ns(values, RULES).tolist() == [20 * S, 7 * S]


def test_an_entry_that_expired_after_the_barrier_began_waits_for_the_next_sweep() -> None:
    """Final only if it expired before the barrier: a run that began before may still have written it."""
    keys, values = cache({"pk": 3, "by": 300, "first": 0, "last": 10 * S})
    expires = 25 * S
    late = sweep(keys, values, Baseline(), now_ns=expires + 5, final_ns=expires - 1)
    assert len(late.records) == 0 and not late.delete.any()
    assert late.next_due_ns == expires  # due already: the next sweep takes it
    on_time = sweep(keys, values, Baseline(), now_ns=expires + 5, final_ns=expires)
    assert on_time.delete.all() and int(on_time.records["packets"].sum()) == 3


def test_below_the_evict_threshold_is_final_with_lack_of_resources() -> None:
    keys, values = cache({"pk": 2, "by": 200, "first": 0, "last": 3 * S},
                         {"pk": 5, "by": 500, "first": 0, "last": 4 * S})
    res = sweep(keys, values, Baseline(), now_ns=5 * S, evict_ns=4 * S)
    assert res.delete.tolist() == [True, False]
    (r,) = res.records
    assert (r["packets"], r["end_reason"]) == (2, EndReason.LACK_OF_RESOURCES)


def test_pending_entries_are_skipped() -> None:
    """Entries exported by an earlier sweep and waiting for their delete are not exported again."""
    keys, values = cache({"pk": 2, "by": 200, "first": 0, "last": S, "id": 7},
                         {"pk": 1, "by": 100, "first": 0, "last": S, "id": 8})
    res = sweep(keys, values, Baseline(), now_ns=100 * S, skip=np.array([7], dtype=np.uint64))
    assert res.delete.tolist() == [False, True]
    assert res.records["packets"].tolist() == [1]
    forced = sweep(keys, values, Baseline(), now_ns=100 * S, final=True, skip=np.array([8], dtype=np.uint64))
    assert forced.records["packets"].tolist() == [2]


def test_next_due_is_the_earliest_idle_or_active_timeout() -> None:
    rules = SweepRules(active_ns=60 * S, inactive_ns=15 * S, end_idle_ns=2 * S)
    keys, values = cache({"pk": 1, "by": 1, "first": 0, "last": 10 * S},
                         {"pk": 1, "by": 1, "first": 0, "last": 12 * S, "flags": 0x01})
    assert sweep(keys, values, Baseline(), 11 * S, rules=rules).next_due_ns == 14 * S  # FIN + end-idle
    keys, values = cache({"pk": 1, "by": 1, "first": 0, "last": 50 * S})
    assert sweep(keys, values, Baseline(), 51 * S, rules=rules).next_due_ns == 60 * S  # active cut
    assert sweep(keys[:0], values[:0], Baseline(), 51 * S, rules=rules).next_due_ns == NEVER


def test_a_cut_flow_with_nothing_new_is_due_when_it_goes_idle() -> None:
    rules = SweepRules(active_ns=10 * S, inactive_ns=15 * S, end_idle_ns=2 * S)
    keys, values = cache({"pk": 4, "by": 40, "first": 0, "last": 9 * S})
    cut = sweep(keys, values, Baseline(), 10 * S, rules=rules)
    assert len(cut.records) == 1 and cut.next_due_ns == 20 * S
    again = sweep(keys, values, cut.baseline, 21 * S, rules=rules)
    assert len(again.records) == 0 and again.next_due_ns == 24 * S  # idle expiry, not a cut with nothing


def test_detail_columns_and_interfaces_come_from_the_kernel_value() -> None:
    keys, values = cache({"pk": 2, "by": 120, "first": 100 * S, "last": 101 * S})
    keys["direction"] = 1  # TC egress on ifindex 3, came in on 9
    values["in_ifindex"], values["out_ifindex"] = 9, 3
    values["src_mac"] = bytes.fromhex("020000000001")
    values["ttl_min"], values["ttl_max"] = 37, 64
    values["length_min"], values["length_max"] = 52, 1500
    values["tcp_seq"], values["tcp_ack"], values["tcp_window"] = 0xDEADBEEF, 7, 29200
    keys["vlan_id"], keys["inner_vlan_id"] = 42, 7  # QinQ: the tags are part of the key
    values["next_hop"] = addr_to_16("192.0.2.254")
    (r,) = sweep(keys, values, Baseline(), now_ns=125 * S, wall_offset_ns=WALL, rules=RULES).records
    assert (r["ifindex"], r["egress_ifindex"], r["meter_ifindex"], r["direction"]) == (9, 3, 3, 1)
    assert bytes(r["src_mac"]) == bytes.fromhex("020000000001")
    assert (r["ttl_min"], r["ttl_max"], r["length_min"], r["length_max"]) == (37, 64, 52, 1500)
    assert (r["tcp_seq"], r["tcp_ack"], r["tcp_window"]) == (0xDEADBEEF, 7, 29200)
    assert (r["vlan_id"], r["inner_vlan_id"]) == (42, 7)
    assert bytes(r["next_hop"]) == addr_to_16("192.0.2.254")


def test_icmp_type_and_code_from_the_key() -> None:
    keys, values = cache({"pk": 1, "by": 84, "first": 100 * S, "last": 100 * S})
    keys["protocol"], keys["src_port"], keys["dst_port"] = 1, 0, 3 * 256 + 13
    (r,) = sweep(keys, values, Baseline(), now_ns=125 * S, wall_offset_ns=WALL, rules=RULES).records
    assert (r["icmp_type"], r["icmp_code"]) == (3, 13)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 50), st.integers(0, 3 * S), st.integers(0, 40 * S)), min_size=1,
             max_size=20),
    st.integers(1, 60),
)
def test_conservation_over_many_sweeps(increments: list[tuple[int, int, int]], sweeps: int) -> None:
    """Whatever the timing, the records of one flow add up to what the kernel counted."""
    rules = SweepRules(active_ns=5 * S, inactive_ns=3 * S, end_idle_ns=S)
    keys, values = cache({"pk": 0, "by": 0, "first": 0, "last": 0})
    base = Baseline()
    now = 0
    exported_pk = exported_by = 0
    counted_pk = counted_by = 0
    alive = True
    for pk, gap, _ in increments:
        now += gap
        if not alive:  # a deleted entry comes back as a new one (new flow id)
            keys, values = cache({"pk": 0, "by": 0, "first": now, "last": now, "id": now + 1})
            alive = True
        values["packets"] += pk
        values["bytes"] += pk * 100
        values["last_seen_ns"] = now
        counted_pk += pk
        counted_by += pk * 100
        for _ in range(max(1, sweeps // len(increments))):
            now += S // 2
            res = sweep(keys, values, base, now, WALL, rules)
            exported_pk += int(res.records["packets"].sum())
            exported_by += int(res.records["bytes"].sum())
            base = res.baseline
            if res.delete.any():
                alive = False
                keys, values = keys[:0], values[:0]
                break
    if alive:
        res = sweep(keys, values, base, now, WALL, rules, final=True)
        exported_pk += int(res.records["packets"].sum())
        exported_by += int(res.records["bytes"].sum())
    assert (exported_pk, exported_by) == (counted_pk, counted_by)


ROW = np.dtype([("id", "<u8"), ("packets", "<u8"), ("bytes", "<u8"), ("start_ns", "<u8")])
BASE_ROWS = st.dictionaries(st.integers(1, 40), st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
                            max_size=20)


def _base(d: dict[int, tuple[int, int, int]]) -> Baseline:
    ids = sorted(d)
    return Baseline(*(np.array(col, dtype=np.uint64) for col in
                      (ids, [d[i][0] for i in ids], [d[i][1] for i in ids], [d[i][2] for i in ids])))


@given(BASE_ROWS, BASE_ROWS)
def test_baseline_changes_turn_the_old_table_into_the_new(old: dict[int, tuple[int, int, int]],
                                                          new: dict[int, tuple[int, int, int]]) -> None:
    """What the kernel's exported table gets at a commit: applied to the old rows, the new ones,
    and no row that did not change is written."""
    gone, rows = _base(old).changes(_base(new), ROW)
    table = {k: v for k, v in old.items() if k not in set(gone.tolist())}
    table |= {int(r["id"]): (int(r["packets"]), int(r["bytes"]), int(r["start_ns"])) for r in rows}
    assert table == new
    assert all(old.get(int(r["id"])) != new[int(r["id"])] for r in rows)
    assert Baseline.from_rows(rows).ids.tolist() == sorted(int(r["id"]) for r in rows)
