"""The flow cache as the agent uses it: reads in chunks, the RCU barrier, thresholds, the commit
of a sweep, the exported table and the kernel's counters -- over the maps' raw fds.

``FlowCacheMaps`` is the part of ``FlowMeter`` that the agent's ``FlowCache`` protocol names
(pyflow/agent.py); attaching, loading and pinning live beside it (loader.py, attach.py, pin.py).
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import threading
from collections.abc import Iterator

import numpy as np

from pyflow.errors import KernelError
from pyflow.kernel import abi, bpfsys, pin
from pyflow.kernel.bpfsys import MapBatchReader, MapChunks, map_delete_batch, map_lookup, map_update_batch
from pyflow.kernel.settings import KernelSettings

#: One row of what was exported of a flow cut by the active timeout (the agent's baseline).
EXPORTED_ROW_DTYPE = np.dtype([("id", "<u8"), ("packets", "<u8"), ("bytes", "<u8"), ("start_ns", "<u8")])


class FlowCacheMaps:
    """The cache operations of a flow meter, over ``maps`` (name -> fd)."""

    maps: dict[str, int]
    _readers: dict[abi.CacheMap, MapBatchReader]
    _chunks: dict[tuple[abi.CacheMap, int], MapChunks]
    _stats_readers: dict[str, bpfsys.PerCpuReader]
    _stats_lock: threading.Lock
    _cpus: int
    _closed: bool
    settings: KernelSettings

    def read_exported(self) -> np.ndarray:
        """What was already exported of flows cut by the active timeout (``pf_exported``), rows of
        ``EXPORTED_ROW_DTYPE`` sorted by flow id: a new agent goes on from there, so nothing is
        exported twice."""
        fd = self.maps[pin.EXPORTED]
        reader = MapBatchReader(fd, np.dtype("<u8"), pin.EXPORTED_VALUE_DTYPE, bpfsys.map_info(fd).max_entries)
        keys, values = reader.read()
        order = np.argsort(keys, kind="stable")
        rows = np.zeros(len(keys), dtype=EXPORTED_ROW_DTYPE)
        rows["id"] = keys[order]
        for name in ("packets", "bytes", "start_ns"):
            rows[name] = values[name][order]
        return rows

    def write_exported(self, gone: np.ndarray, rows: np.ndarray) -> None:
        """``pf_exported`` without the flow ids ``gone``, with ``rows`` (EXPORTED_ROW_DTYPE) new or changed."""
        fd = self.maps[pin.EXPORTED]
        if len(gone):
            map_delete_batch(fd, np.ascontiguousarray(gone, dtype=np.uint64))
        if len(rows):
            vals = np.zeros(len(rows), dtype=pin.EXPORTED_VALUE_DTYPE)
            for name in ("packets", "bytes", "start_ns"):
                vals[name] = rows[name]
            map_update_batch(fd, np.ascontiguousarray(rows["id"], dtype=np.uint64), vals)

    def commit(self, deletes: dict[abi.CacheMap, np.ndarray], gone: np.ndarray, rows: np.ndarray) -> int:
        """After an export: the kernel forgets what was exported -- the final entries of each
        cache map are deleted, the exported table updated (``write_exported``).  An agent
        killed before this leaves it all for the next one to export; how many entries were deleted."""
        deleted = 0
        for which, keys in deletes.items():
            if len(keys):
                deleted += map_delete_batch(self.cache_fd(which), np.ascontiguousarray(keys))
        self.write_exported(gone, rows)
        return deleted

    @property
    def flows_fd(self) -> int:
        return self.maps["flows"]

    def cache_fd(self, which: abi.CacheMap) -> int:
        return self.maps[abi.CACHE_MAP_NAMES[which]]

    def capacity(self, which: abi.CacheMap) -> int:
        """Entries one cache map holds at most (cache-entries, resume entries)."""
        if which == abi.CacheMap.FLOWS:
            return self.settings.cache_entries
        return bpfsys.map_info(self.cache_fd(which)).max_entries

    def read_chunks(self, chunk: int = 65536) -> Iterator[tuple[abi.CacheMap, np.ndarray, np.ndarray]]:
        """Every entry of both cache maps, in chunks: (map, keys, values) views of reused buffers,
        each valid until the next step (see MapChunks)."""
        for which in abi.CacheMap:
            reader = self._chunks.get((which, chunk))
            if reader is None:  # buffers reused from one sweep to the next
                reader = MapChunks(self.cache_fd(which), abi.FLOW_KEY_DTYPE, abi.FLOW_VALUE_DTYPE, chunk)
                self._chunks[(which, chunk)] = reader
            for keys, values in reader:
                yield which, keys, values

    def read_map(self, which: abi.CacheMap) -> tuple[np.ndarray, np.ndarray]:
        """All entries of one cache map as (keys, values) views (see MapBatchReader)."""
        reader = self._readers.get(which)
        if reader is None:
            reader = MapBatchReader(self.cache_fd(which), abi.FLOW_KEY_DTYPE, abi.FLOW_VALUE_DTYPE,
                                    self.capacity(which))
            self._readers[which] = reader
        return reader.read()

    def read_flows(self) -> tuple[np.ndarray, np.ndarray]:
        """All entries of the flow cache, both maps, as (keys, values) arrays."""
        parts = [self.read_map(which) for which in abi.CacheMap]
        if not len(parts[1][0]):
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def scan(self, chunk: int = 8192) -> CacheScan:
        """Both cache maps in chunks, read by a reader of its own (``CacheScan``): safe alongside the
        sweep's ``read_chunks`` and after this meter is closed.  Call it where the meter cannot be
        closed meanwhile (the agent holds its lock); read it anywhere."""
        if self._closed:
            raise KernelError("the flow meter is closed (replaced by a reload or stopping)")
        return CacheScan({which: self.cache_fd(which) for which in abi.CacheMap}, chunk)

    def evict_threshold(self, which: abi.CacheMap) -> int:
        """The kernel's ``evict_before`` instant for one cache map (0: none)."""
        got = map_lookup(self.maps["evict_before"], struct.pack("=I", int(which)), 8)
        return 0 if got is None else int.from_bytes(got, sys.byteorder)

    def set_evict_threshold(self, which: abi.CacheMap, ns: int) -> None:
        """Entries of this map last seen before ``ns`` are expired for the kernel from now on."""
        bpfsys.map_update(self.maps["evict_before"], struct.pack("=I", int(which)), struct.pack("=Q", ns))

    def _percpu(self, name: str, key_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        reader = self._stats_readers.get(name)
        if reader is None:
            fd = self.maps[name]
            size = bpfsys.map_info(fd).max_entries
            reader = bpfsys.PerCpuReader(fd, key_dtype, abi.IFACE_STATS_DTYPE, size, self._cpus)
            self._stats_readers[name] = reader
        return reader.read()

    def read_iface_stats(self) -> dict[tuple[int, int], np.ndarray]:
        """Per (ifindex, hook): the counters summed over CPUs, as one IFACE_STATS_DTYPE record.

        Key (0, 0) holds what the overflow slot counted (interfaces beyond
        MAX_IFACE_STATS); it is normally absent.
        """
        out: dict[tuple[int, int], np.ndarray] = {}
        with self._stats_lock:  # the readers' buffers are reused: one read at a time
            slots, per_cpu = self._percpu("iface_slots", np.dtype("<u4"))
            counters = per_cpu["counters"].sum(axis=1)
            used = np.flatnonzero(counters.any(axis=1))
            for i in used.tolist():
                ifindex, hook = divmod(int(slots[i]), len(abi.Hook))
                out[(ifindex, hook)] = _sum_cpus(per_cpu[i])
            keys, per_cpu = self._percpu("iface_stats", abi.IFACE_KEY_DTYPE)
            for i in range(len(keys)):
                out[(int(keys[i]["ifindex"]), int(keys[i]["hook"]))] = _sum_cpus(per_cpu[i])
        overflow = bpfsys.percpu_lookup(self.maps["overflow_stats"], b"\0\0\0\0", abi.IFACE_STATS_DTYPE, self._cpus)
        if overflow is not None:
            total = _sum_cpus(overflow)
            if total["counters"].any():
                out[(0, 0)] = total
        return out

    def fin_events(self) -> int:
        """Flows that saw their first TCP FIN or RST since the program was loaded (all CPUs)."""
        n = bpfsys.percpu_lookup(self.maps["fin_seen"], b"\0\0\0\0", np.dtype("<u8"), self._cpus)
        return 0 if n is None else int(n.sum())

    def flows_created(self) -> int:
        """Entries the kernel has created since the program was loaded (all CPUs)."""
        seq = bpfsys.percpu_lookup(self.maps["flow_seq"], b"\0\0\0\0", np.dtype("<u8"), self._cpus)
        return 0 if seq is None else int(seq.sum())

    def read_counters(self) -> dict[abi.Counter, int]:
        """The counters summed over every interface, hook and CPU."""
        totals = np.zeros(abi.COUNTER_MAX, dtype=np.uint64)
        for st in self.read_iface_stats().values():
            totals += st["counters"]
        return {c: int(totals[c]) for c in abi.Counter}

    def barrier(self) -> None:
        """Wait until every program run that started before this call has ended.

        Updating a map-in-map element makes the kernel wait for an RCU grace
        period (synchronize_rcu), and the meter runs inside an RCU read-side
        section; this is the barrier of the idle-delete protocol.
        """
        bpfsys.map_update(self.maps["barrier"], b"\0\0\0\0", struct.pack("=I", self.maps["barrier_inner"]))


class CacheScan:
    """One pass over both cache maps for an observer (``pyflow flows``), apart from the sweep.

    Its own duplicates of the maps' fds (the maps stay readable, and the fd numbers cannot
    be reused by something else, if the meter is closed meanwhile) and its own chunk buffers
    (the sweep's are reused).  Iterating yields (map, keys, values) views valid until the next
    step, as ``FlowMeter.read_chunks``; an entry added or deleted during the pass may or may
    not be seen.  The fds are closed at the end of the pass or by ``close()``.
    """

    def __init__(self, fds: dict[abi.CacheMap, int], chunk: int = 8192) -> None:
        self._fds: dict[abi.CacheMap, int] = {}
        try:
            for which, fd in fds.items():
                self._fds[which] = os.dup(fd)
        except OSError as exc:
            self.close()
            raise KernelError(f"cannot read the flow cache: {exc.strerror or exc}") from None
        self.chunk = chunk

    def __iter__(self) -> Iterator[tuple[abi.CacheMap, np.ndarray, np.ndarray]]:
        try:
            for which, fd in list(self._fds.items()):
                for keys, values in MapChunks(fd, abi.FLOW_KEY_DTYPE, abi.FLOW_VALUE_DTYPE, self.chunk):
                    yield which, keys, values
        finally:
            self.close()

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> CacheScan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sum_cpus(arr: np.ndarray) -> np.ndarray:
    """One per-CPU value (an IFACE_STATS_DTYPE array, one per CPU) summed into one record."""
    out = np.zeros((), dtype=abi.IFACE_STATS_DTYPE)
    out["counters"] = arr["counters"].sum(axis=0)
    out["metered_bytes"] = arr["metered_bytes"].sum()
    return out
