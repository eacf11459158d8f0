"""The Python view of bpf/flowmeter.h.

tests/bpf/test_abi_layout.py checks every offset and size here against the
ctypes types bcc generates from the header, and the counter ids against the
header's enum, so the two cannot drift apart silently.
"""

from __future__ import annotations

import enum
from pathlib import Path

import numpy as np


def find_bpf_dir() -> Path:
    """Where the eBPF sources (flowmeter.c, flowmeter.h) are.

    In a checkout (or an editable install) that is the top-level ``bpf/``, the
    one copy kept in git; an installed wheel carries the same two files as
    package data in ``pyflow/bpf/`` (setup.py maps ``bpf/`` there), which is
    used when no checkout surrounds this file.
    """
    here = Path(__file__).resolve().parent.parent  # the pyflow package
    for candidate in (here.parent / "bpf", here / "bpf"):
        if (candidate / "flowmeter.c").is_file() and (candidate / "flowmeter.h").is_file():
            return candidate
    return here.parent / "bpf"  # neither: the loader reports the missing source by this path


BPF_DIR = find_bpf_dir()

#: Hook names (the metrics' "hook" label) -> program entry point.
PROGRAMS = {"xdp": "pyflow_xdp", "tc_ingress": "pyflow_tc_ingress", "tc_egress": "pyflow_tc_egress"}

FLOW_KEY_DTYPE = np.dtype(
    {
        "names": ["src_addr", "dst_addr", "ifindex", "src_port", "dst_port", "protocol", "ip_version",
                  "tos", "direction", "vlan_id", "inner_vlan_id"],
        "formats": ["V16", "V16", "<u4", "<u2", "<u2", "u1", "u1", "u1", "u1", "<u2", "<u2"],
        "offsets": [0, 16, 32, 36, 38, 40, 41, 42, 43, 44, 46],
        "itemsize": 48,
    }
)

FLOW_VALUE_DTYPE = np.dtype(
    {
        "names": ["packets", "bytes", "first_seen_ns", "last_seen_ns", "flow_id", "tcp_flags",
                  "src_mac", "dst_mac", "reserved", "length_min", "length_max", "ttl_min", "ttl_max",
                  "tcp_seq", "tcp_ack", "tcp_window", "udp_length", "flow_label", "in_ifindex",
                  "out_ifindex", "ip_header_length", "igmp_type", "pad", "next_hop"],
        "formats": ["<u8", "<u8", "<u8", "<u8", "<u8", "<u8",
                    "V6", "V6", "<u2", "<u2", "<u2", "u1", "u1",
                    "<u4", "<u4", "<u2", "<u2", "<u4", "<u4",
                    "<u4", "u1", "u1", "V2", "V16"],
        "offsets": [0, 8, 16, 24, 32, 40,
                    48, 54, 60, 62, 64, 66, 67,
                    68, 72, 76, 78, 80, 84,
                    88, 92, 93, 94, 96],
        "itemsize": 112,
    }
)

OWN_KEY_DTYPE = np.dtype(
    {
        "names": ["src_addr", "dst_addr", "src_port", "dst_port"],
        "formats": ["V16", "V16", "<u2", "<u2"],
        "offsets": [0, 16, 32, 34],
        "itemsize": 36,
    }
)


class Counter(enum.IntEnum):
    """``enum pyflow_counter``: index into the per-CPU ``counters`` array."""

    PACKETS_SEEN = 0
    METERED = 1
    RESUMED = 2
    NOT_IP = 3
    UNPARSABLE = 4
    CACHE_FULL = 5
    RESUME_FULL = 6
    SAMPLED_OUT = 7
    OWN_EXPORT = 8
    SWEEP_BEHIND = 9


COUNTER_MAX = len(Counter)


class Hook(enum.IntEnum):
    """``enum pyflow_hook``: where a program runs."""

    XDP = 0
    TC_INGRESS = 1
    TC_EGRESS = 2


HOOK_LABELS = {Hook.XDP: "xdp", Hook.TC_INGRESS: "tc_ingress", Hook.TC_EGRESS: "tc_egress"}

IFACE_KEY_DTYPE = np.dtype({"names": ["ifindex", "hook"], "formats": ["<u4", "<u4"], "offsets": [0, 4],
                            "itemsize": 8})
IFACE_STATS_DTYPE = np.dtype(
    {
        "names": ["counters", "metered_bytes"],
        "formats": [("<u8", (COUNTER_MAX,)), "<u8"],
        "offsets": [0, 8 * COUNTER_MAX],
        "itemsize": 8 * COUNTER_MAX + 8,
    }
)

#: Counters that mean "this packet is not in any flow", by their metric reason label.
NOT_METERED_REASONS = {
    Counter.NOT_IP: "not_ip",
    Counter.UNPARSABLE: "unparsable",
    Counter.CACHE_FULL: "cache_full",
    Counter.RESUME_FULL: "resume_full",
    Counter.SAMPLED_OUT: "sampled_out",
    Counter.OWN_EXPORT: "own_export",
    Counter.SWEEP_BEHIND: "sweep_behind",
}

#: Counters of packets that are in a flow entry (the two maps of the cache).
METERED_COUNTERS = (Counter.METERED, Counter.RESUMED)


class CacheMap(enum.IntEnum):
    """``enum pyflow_cache_map``: the maps that make up the flow cache, and their evict_before slots."""

    FLOWS = 0
    RESUMED = 1


CACHE_MAP_NAMES = {CacheMap.FLOWS: "flows", CacheMap.RESUMED: "resumed"}
