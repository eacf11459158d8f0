"""Pin pyflow/kernel/abi.py to bpf/flowmeter.h as bcc compiles it.

bcc turns the map key/value types it compiled into ctypes structures; every
field name, offset and size of the numpy dtypes the agent reads maps with
must match them, and the counter ids must match ``enum pyflow_counter``.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from pyflow.kernel import abi
from pyflow.kernel.loader import FlowMeter

pytestmark = pytest.mark.root

HEADER = abi.BPF_DIR / "flowmeter.h"


def ctypes_layout(ctype: Any) -> list[tuple[str, int, int]]:
    """[(name, offset, size)] of a bcc-generated ctypes structure, in order."""
    return [(name, getattr(ctype, name).offset, getattr(ctype, name).size) for name, *_ in ctype._fields_]


def dtype_layout(dtype: np.dtype) -> list[tuple[str, int, int]]:
    assert dtype.names is not None and dtype.fields is not None
    return [(name, dtype.fields[name][1], dtype.fields[name][0].itemsize) for name in dtype.names]


def assert_same_layout(ctype: Any, dtype: np.dtype) -> None:
    assert ctypes_layout(ctype) == dtype_layout(dtype)
    assert dtype.itemsize == ctypes.sizeof(ctype)


def test_flow_key_layout(meter: FlowMeter) -> None:
    assert_same_layout(meter.table("flows").Key, abi.FLOW_KEY_DTYPE)
    assert abi.FLOW_KEY_DTYPE.itemsize == 48


def test_flow_value_layout(meter: FlowMeter) -> None:
    assert_same_layout(meter.table("flows").Leaf, abi.FLOW_VALUE_DTYPE)
    assert abi.FLOW_VALUE_DTYPE.itemsize == 112


def test_flow_dtypes_are_little_endian_unsigned() -> None:
    """The kernel writes host (little-endian) unsigned integers; addresses are raw bytes."""
    for dtype in (abi.FLOW_KEY_DTYPE, abi.FLOW_VALUE_DTYPE):
        assert dtype.fields is not None
        for name in dtype.names or ():
            field = dtype.fields[name][0]
            if name.endswith(("_addr", "next_hop")):
                assert field == np.dtype("V16")
            elif name.endswith("_mac"):
                assert field == np.dtype("V6")
            elif name == "pad":
                assert field.kind == "V"
            else:
                assert field.kind == "u" and field.str[0] in "<|", name


@pytest.fixture(scope="module")
def own_layout_prog(_require_root: None) -> Iterator[Any]:
    """A tiny bcc program that only declares a map of struct own_key."""
    import bcc

    text = b'#include "flowmeter.h"\nBPF_ARRAY(own_layout, struct own_key, 1);\n'
    prog = bcc.BPF(text=text, cflags=[f"-I{abi.BPF_DIR}"])
    try:
        yield prog
    finally:
        prog.cleanup()


def test_own_key_layout(own_layout_prog: Any) -> None:
    assert_same_layout(own_layout_prog[b"own_layout"].Leaf, abi.OWN_KEY_DTYPE)


def test_resume_map_has_the_flow_layout(meter: FlowMeter) -> None:
    """The resume map holds the same entries as the flow cache (one sweep reads both)."""
    for name in abi.CACHE_MAP_NAMES.values():
        table = meter.table(name)
        assert_same_layout(table.Key, abi.FLOW_KEY_DTYPE)
        assert_same_layout(table.Leaf, abi.FLOW_VALUE_DTYPE)


def header_counters() -> dict[str, int]:
    """``enum pyflow_counter`` from the header: {NAME without PF_CNT_: value}."""
    src = HEADER.read_text()
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    body = re.search(r"enum\s+pyflow_counter\s*\{(.*?)\};", src, flags=re.S)
    assert body is not None, f"enum pyflow_counter not found in {HEADER}"
    values: dict[str, int] = {}
    nxt = 0
    for item in body.group(1).split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"PF_CNT_([A-Z0-9_]+)\s*(?:=\s*(\d+))?", item)
        assert m is not None, f"unexpected enumerator {item!r}"
        nxt = int(m.group(2)) if m.group(2) is not None else nxt
        values[m.group(1)] = nxt
        nxt += 1
    return values


def test_counter_enum_matches_header() -> None:
    hdr = header_counters()
    assert hdr.pop("MAX") == abi.COUNTER_MAX == len(abi.Counter)
    assert hdr == {c.name: c.value for c in abi.Counter}
    assert "PACKETS_SEEN" in hdr and hdr["PACKETS_SEEN"] == 0


def test_iface_stats_layout(meter: FlowMeter) -> None:
    table = meter.table("iface_stats")
    assert_same_layout(table.Key, abi.IFACE_KEY_DTYPE)
    # per-CPU table: sLeaf is one CPU's value; its counters array has one slot per counter id
    assert_same_layout(table.sLeaf, abi.IFACE_STATS_DTYPE)
    assert abi.IFACE_STATS_DTYPE["counters"].shape == (abi.COUNTER_MAX,)
    assert ctypes.sizeof(meter.table("overflow_stats").sLeaf) == abi.IFACE_STATS_DTYPE.itemsize


def test_cache_map_enum_matches_header() -> None:
    found = dict(re.findall(r"PF_MAP_(\w+)\s*=\s*(\d+)", HEADER.read_text()))
    assert {k: int(v) for k, v in found.items()} == {m.name: m.value for m in abi.CacheMap}


def test_hook_enum_matches_header() -> None:
    text = HEADER.read_text()
    found = dict(re.findall(r"PF_HOOK_(\w+)\s*=\s*(\d+)", text))
    assert {k: int(v) for k, v in found.items()} == {h.name: h.value for h in abi.Hook}
