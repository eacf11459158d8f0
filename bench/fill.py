"""Synthetic flow caches for the benchmarks."""

from __future__ import annotations

import numpy as np

from pyflow.kernel import abi


def synthetic_cache(n: int, now_ns: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """n distinct IPv4/IPv6 flows; about a third idle-expired, a tenth past the active timeout."""
    rng = np.random.default_rng(seed)
    keys = np.zeros(n, dtype=abi.FLOW_KEY_DTYPE)
    raw_src = np.zeros((n, 16), dtype=np.uint8)
    raw_dst = np.zeros((n, 16), dtype=np.uint8)
    v6 = rng.random(n) < 0.2
    raw_src[~v6, 10:12] = 0xFF
    raw_dst[~v6, 10:12] = 0xFF
    raw_src[:, 12:16] = np.arange(n, dtype=">u4").view(np.uint8).reshape(n, 4)
    raw_dst[:, 12:16] = rng.integers(0, 256, size=(n, 4), dtype=np.uint8)
    raw_src[v6, 0:2] = [0x20, 0x01]
    raw_dst[v6, 0:2] = [0x20, 0x01]
    keys["src_addr"] = raw_src.view("V16").reshape(n)
    keys["dst_addr"] = raw_dst.view("V16").reshape(n)
    keys["ip_version"] = np.where(v6, 6, 4)
    keys["protocol"] = rng.choice([6, 17, 1], size=n)
    keys["src_port"] = rng.integers(1024, 65535, size=n)
    keys["dst_port"] = rng.integers(1, 1024, size=n)
    keys["ifindex"] = 2
    values = np.zeros(n, dtype=abi.FLOW_VALUE_DTYPE)
    values["packets"] = rng.integers(1, 10_000, size=n)
    values["bytes"] = values["packets"] * rng.integers(40, 1500, size=n)
    age = rng.integers(0, 40 * 60 * 10**9, size=n)
    idle = np.where(rng.random(n) < 0.33, 20 * 10**9, rng.integers(0, 10 * 10**9, size=n))
    values["first_seen_ns"] = now_ns - age - idle
    values["last_seen_ns"] = now_ns - idle
    values["flow_id"] = np.arange(1, n + 1)
    values["tcp_flags"] = 0x18
    return keys, values
