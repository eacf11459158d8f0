"""In-memory fakes of the seams the agent works against (defined where they are consumed)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from pyflow.kernel import abi
from pyflow.kernel.cache import EXPORTED_ROW_DTYPE


@dataclass
class MemoryFlowCache:
    """The flow cache the agent works against (pyflow.agent.FlowCache), over two in-memory maps:
    the sweep tick, relief and reloads run on it without root."""

    maps: dict[abi.CacheMap, tuple[np.ndarray, np.ndarray]]
    capacity_: int = 1000
    evict: dict[abi.CacheMap, int] = field(default_factory=lambda: {m: 0 for m in abi.CacheMap})
    barriers: int = 0
    commits: list[int] = field(default_factory=list)
    fins: int = 0

    @property
    def settings(self) -> object:
        return type("K", (), {"cache_entries": self.capacity_})()

    def read_exported(self) -> np.ndarray:
        return np.zeros(0, EXPORTED_ROW_DTYPE)

    def barrier(self) -> None:
        self.barriers += 1

    def read_chunks(self, chunk: int = 65536) -> Iterator[tuple[abi.CacheMap, np.ndarray, np.ndarray]]:
        for which, (keys, values) in self.maps.items():
            for lo in range(0, len(keys), chunk):
                yield which, keys[lo:lo + chunk], values[lo:lo + chunk]

    def commit(self, deletes: dict[abi.CacheMap, np.ndarray], gone: np.ndarray, rows: np.ndarray) -> int:
        n = 0
        for which, keys in deletes.items():
            k, v = self.maps[which]
            raw = np.dtype((np.void, abi.FLOW_KEY_DTYPE.itemsize))
            gone = np.isin(k.view(raw), keys.view(raw))
            self.maps[which] = (k[~gone], v[~gone])
            n += int(np.count_nonzero(gone))
        self.commits.append(n)
        return n

    def capacity(self, which: abi.CacheMap) -> int:
        return self.capacity_

    def evict_threshold(self, which: abi.CacheMap) -> int:
        return self.evict[which]

    def set_evict_threshold(self, which: abi.CacheMap, ns: int) -> None:
        self.evict[which] = ns

    def detach_all(self) -> None:
        pass

    def fin_events(self) -> int:
        return self.fins

    def read_iface_stats(self) -> dict[tuple[int, int], np.ndarray]:
        return {}

    def flows_created(self) -> int:
        return sum(len(k) for k, _ in self.maps.values()) + sum(self.commits)

    def scan(self, chunk: int = 8192) -> MemoryScan:
        return MemoryScan(self, chunk)


class MemoryScan:
    """``MemoryFlowCache.scan``: copies of both maps in chunks."""

    def __init__(self, cache: MemoryFlowCache, chunk: int) -> None:
        self.parts = [(w, k[lo:lo + chunk].copy(), v[lo:lo + chunk].copy())
                      for w, (k, v) in cache.maps.items() for lo in range(0, len(k), chunk)]

    def __iter__(self) -> Iterator[tuple[abi.CacheMap, np.ndarray, np.ndarray]]:
        return iter(self.parts)

    def __enter__(self) -> MemoryScan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.parts = []


def cache_entries(recs: np.ndarray, first_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """The cache entries (kernel dtypes) of flow records, as a sweep sees them first (started at
    ``first_ns``, lasting what the record says so far)."""
    keys = np.zeros(len(recs), abi.FLOW_KEY_DTYPE)
    values = np.zeros(len(recs), abi.FLOW_VALUE_DTYPE)
    for name in ("src_addr", "dst_addr", "src_port", "dst_port", "protocol"):
        keys[name] = recs[name]
    values["packets"], values["bytes"] = recs["packets"], recs["bytes"]
    values["first_seen_ns"] = first_ns
    values["last_seen_ns"] = first_ns + (recs["end_ms"] - recs["start_ms"]).astype(np.uint64) * 10**6
    return keys, values
