"""The early export of a nearly full cache, as pure functions (pyflow.sweep)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyflow.sweep import HIGH_WATER, LOW_WATER, Baseline, SweepRules, relief_threshold
from tests.unit.test_sweep import WALL, S, cache, sweep


def test_water_marks_are_routeros_like() -> None:
    assert (HIGH_WATER, LOW_WATER) == (0.90, 0.75)


def test_nothing_below_the_high_water_mark() -> None:
    assert relief_threshold(np.arange(89, dtype=np.uint64), 100) is None
    assert relief_threshold(np.zeros(0, dtype=np.uint64), 100) is None


def test_from_the_high_water_mark_the_idle_longest_down_to_the_low_one() -> None:
    last = np.array([50, 10, 40, 30, 20] + [100 + i for i in range(85)], dtype=np.uint64)  # 90 of 100
    cut = relief_threshold(last, 100)
    assert cut is not None
    leaving = np.flatnonzero(last < cut)
    assert len(leaving) == 90 - 75
    assert sorted(last[leaving].tolist()) == sorted(last.tolist())[:15]


def test_a_full_cache_keeps_the_low_water_mark() -> None:
    last = np.arange(64, dtype=np.uint64)[::-1].copy()
    cut = relief_threshold(last, 64)
    assert cut is not None and int(np.count_nonzero(last < cut)) == 64 - 48


def test_ties_leave_together() -> None:
    """Entries last seen at the same instant are one group: the threshold cannot split them."""
    last = np.array([5] * 10, dtype=np.uint64)
    cut = relief_threshold(last, 10)
    assert cut == 6 and int(np.count_nonzero(last < cut)) == 10


def test_bad_marks_are_refused() -> None:
    with pytest.raises(ValueError):
        relief_threshold(np.zeros(3, dtype=np.uint64), 4, high=0.5, low=0.8)
    with pytest.raises(ValueError):
        relief_threshold(np.zeros(3, dtype=np.uint64), 4, low=0.5, floor=0.6)


def test_a_surge_on_its_way_relieves_earlier_and_deeper_but_not_below_the_floor() -> None:
    last = np.arange(1, 86, dtype=np.uint64)  # 85 of 100, idle the longest first
    assert relief_threshold(last, 100) is None  # below high water
    assert relief_threshold(last, 100, incoming=4) is None  # 89 with what comes
    cut = relief_threshold(last, 100, incoming=14)  # 99 with what comes: down to 75 - 14 = 61
    assert cut is not None and int(np.count_nonzero(last < cut)) == 24
    cut = relief_threshold(last, 100, incoming=500)  # more than the map holds: down to the floor, 25
    assert cut is not None and int(np.count_nonzero(last < cut)) == 60
    assert relief_threshold(np.arange(1, 50, dtype=np.uint64), 100, incoming=500) is None  # 49: not half full
    cut = relief_threshold(np.arange(1, 51, dtype=np.uint64), 100, incoming=500)  # 50: down to the floor
    assert cut is not None and int(np.count_nonzero(np.arange(1, 51) < cut)) == 25


def test_relief_exports_what_the_cut_left_and_forgets_the_flow() -> None:
    rules = SweepRules(active_ns=10 * S, inactive_ns=15 * S, end_idle_ns=2 * S)
    keys, values = cache({"pk": 10, "by": 1000, "first": 0, "last": 9 * S, "id": 7},
                         {"pk": 3, "by": 300, "first": 0, "last": 9 * S, "id": 8})
    cut = sweep(keys, values, Baseline(), 10 * S, WALL, rules)  # both cut by the active timeout
    assert len(cut.records) == 2 and len(cut.baseline) == 2
    values["packets"] = [12, 3]  # flow 7 got 2 more packets, flow 8 none
    values["bytes"] = [1200, 300]
    values["last_seen_ns"] = [11 * S, 9 * S]
    out = sweep(keys, values, cut.baseline, 12 * S, WALL, rules, evict_ns=12 * S)
    assert [(int(r["src_port"]), int(r["packets"]), int(r["bytes"]), int(r["end_reason"])) for r in out.records] == [
        (1000, 2, 200, 5)]  # nothing new in flow 8: no record
    assert out.records[0]["start_ms"] == (WALL + 10 * S) // 10**6  # the record begins at the cut
    assert out.delete.all() and len(out.baseline) == 0


def test_relief_of_a_flow_never_cut() -> None:
    keys, values = cache({"pk": 4, "by": 400, "first": 2 * S, "last": 3 * S, "id": 9})
    keep = Baseline(np.array([5], dtype=np.uint64), np.array([1], dtype=np.uint64), np.array([1], dtype=np.uint64),
                    np.array([0], dtype=np.uint64))
    out = sweep(keys, values, keep, 4 * S, evict_ns=4 * S)
    assert (int(out.records[0]["packets"]), int(out.records[0]["start_ms"])) == (4, (WALL + 2 * S) // 10**6)
    assert out.baseline.ids.tolist() == [5]  # other flows' baselines untouched


@given(st.lists(st.tuples(st.integers(1, 10**6), st.integers(0, 10**6)), min_size=1, max_size=60),
       st.integers(1, 64))
def test_cut_then_relief_conserves(flows: list[tuple[int, int]], capacity: int) -> None:
    """Whatever is cut first, cut plus relief records add up to the kernel's counters, once."""
    keys, values = cache(*({"pk": pk, "by": pk * 40, "first": 0, "last": (i + 1) * S, "id": i + 1}
                           for i, (pk, _) in enumerate(flows)))
    rules = SweepRules(active_ns=S, inactive_ns=10**6 * S, end_idle_ns=S)
    now = (len(flows) + 1) * S
    cut = sweep(keys, values, Baseline(), now, WALL, rules)
    values["packets"] += np.array([more for _, more in flows], dtype=np.uint64)
    threshold = relief_threshold(values["last_seen_ns"], capacity) or 0
    out = sweep(keys, values, cut.baseline, now + 1, WALL, rules, evict_ns=threshold)
    victims = np.flatnonzero(out.delete)
    assert sorted(victims.tolist()) == np.flatnonzero(values["last_seen_ns"] < threshold).tolist()
    for i in victims.tolist():
        mine = out.records["src_port"] == keys["src_port"][i]
        got = int(cut.records["packets"][i]) + int(out.records["packets"][mine].sum())
        assert got == int(values["packets"][i]), i
    assert len(out.baseline) == len(flows) - len(victims)
