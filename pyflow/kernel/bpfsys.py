"""Raw bpf(2) commands that bcc 0.26 does not expose, or exposes slowly.

* ``MapBatchReader``: BPF_MAP_LOOKUP_BATCH into buffers allocated once and
  viewed as numpy arrays (bcc's ``items_lookup_batch`` allocates the whole
  map as ctypes objects on every call; see docs/benchmarks.md).
* ``prog_test_run``: BPF_PROG_TEST_RUN, to run the meter on crafted packets.
* ``MapChunks``: the same, a chunk at a time (the sweep: memory bounded by a
  chunk whatever the map's size).
* single-element lookup/update/delete and batch update/delete.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyflow.kernel.libc import libc as _libc

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}

# bpf(2) commands
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_NEXT_ID = 11
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_BIND_MAP = 35

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_F_NO_PREALLOC = 1
BPF_ANY = 0
BPF_PROG_TEST_RUN = 10
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27



class BpfError(OSError):
    """A bpf(2) command failed; ``errno`` tells why."""


def _nr() -> int:
    try:
        return _SYS_BPF[platform.machine()]
    except KeyError as exc:  # pragma: no cover - exotic architectures
        raise BpfError(errno.ENOSYS, f"bpf(2) syscall number unknown for {platform.machine()}") from exc


_NR_BPF = _nr()


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    ret = _libc.syscall(_NR_BPF, ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, os.strerror(err))
    return int(ret)


class _ElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _BatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


def _addr(buf: np.ndarray | ctypes.Array | bytes | None) -> int:
    if buf is None:
        return 0
    if isinstance(buf, np.ndarray):
        return int(buf.ctypes.data)
    if isinstance(buf, bytes):
        raise TypeError("pass a mutable buffer, not bytes")
    return ctypes.addressof(buf)


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """One element's value, or None when the key is absent."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_size)
    attr = _ElemAttr(map_fd=map_fd, key=_addr(kbuf), value=_addr(vbuf))
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr)
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return vbuf.raw


def map_delete(map_fd: int, key: bytes) -> bool:
    """Delete one element; False when it was already gone."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    attr = _ElemAttr(map_fd=map_fd, key=_addr(kbuf))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, attr)
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


class MapBatchReader:
    """Reads a whole hash map with BPF_MAP_LOOKUP_BATCH into reused buffers.

    ``read()`` returns (keys, values) numpy views of the buffers, valid until
    the next ``read()``: callers copy what they keep.
    """

    def __init__(self, map_fd: int, key_dtype: np.dtype, value_dtype: np.dtype, max_entries: int,
                 chunk: int = 8192) -> None:
        self.map_fd = map_fd
        self.key_dtype = key_dtype
        self.value_dtype = value_dtype
        self.capacity = max_entries
        # A hash map bucket can hold more entries than a small chunk: ENOSPC
        # then; chunk >= 64 keeps that practically impossible and is retried.
        self.chunk = max(64, min(chunk, max_entries))
        self._keys = np.zeros(max_entries + self.chunk, dtype=key_dtype)
        self._values = np.zeros(max_entries + self.chunk, dtype=value_dtype)
        self._token_in = np.zeros(1, dtype=np.uint64)
        self._token_out = np.zeros(1, dtype=np.uint64)

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        total = 0
        first = True
        attr = _BatchAttr(map_fd=self.map_fd)
        while True:
            room = len(self._keys) - total
            if room <= 0:
                break
            attr.in_batch = 0 if first else _addr(self._token_in)
            attr.out_batch = _addr(self._token_out)
            attr.keys = int(self._keys.ctypes.data) + total * self.key_dtype.itemsize
            attr.values = int(self._values.ctypes.data) + total * self.value_dtype.itemsize
            attr.count = min(self.chunk, room)
            done = False
            try:
                _bpf(BPF_MAP_LOOKUP_BATCH, attr)
            except BpfError as exc:
                if exc.errno == errno.ENOENT:
                    done = True
                elif exc.errno == errno.ENOSPC and attr.count < room:
                    self.chunk *= 2
                    continue
                else:
                    raise
            total += attr.count
            first = False
            self._token_in[0] = self._token_out[0]
            if done:
                break
        return self._keys[:total], self._values[:total]


class MapChunks:
    """Reads a hash map in chunks of at most ``chunk`` entries with BPF_MAP_LOOKUP_BATCH.

    Iterating yields (keys, values) views of two reused buffers, each valid
    until the next step: memory stays at one chunk whatever the map's size.
    One pass walks the map's buckets once; an entry added or deleted during
    the pass may or may not be seen (the kernel's batch semantics).
    """

    def __init__(self, map_fd: int, key_dtype: np.dtype, value_dtype: np.dtype, chunk: int = 65536) -> None:
        self.map_fd = map_fd
        self.chunk = max(64, chunk)
        self._keys = np.zeros(self.chunk, dtype=key_dtype)
        self._values = np.zeros(self.chunk, dtype=value_dtype)
        self._token_in = np.zeros(1, dtype=np.uint64)
        self._token_out = np.zeros(1, dtype=np.uint64)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        first = True
        attr = _BatchAttr(map_fd=self.map_fd)
        while True:
            attr.in_batch = 0 if first else _addr(self._token_in)
            attr.out_batch = _addr(self._token_out)
            attr.keys = int(self._keys.ctypes.data)
            attr.values = int(self._values.ctypes.data)
            attr.count = self.chunk
            done = False
            try:
                _bpf(BPF_MAP_LOOKUP_BATCH, attr)
            except BpfError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                done = True
            first = False
            self._token_in[0] = self._token_out[0]
            if attr.count:
                yield self._keys[:attr.count], self._values[:attr.count]
            if done:
                return


def map_update_batch(map_fd: int, keys: np.ndarray, values: np.ndarray) -> int:
    """Insert or replace many elements at once (BPF_MAP_UPDATE_BATCH); returns how many."""
    keys = np.ascontiguousarray(keys)
    values = np.ascontiguousarray(values)
    attr = _BatchAttr(map_fd=map_fd, keys=int(keys.ctypes.data), values=int(values.ctypes.data), count=len(keys))
    _bpf(BPF_MAP_UPDATE_BATCH, attr)
    return int(attr.count)


def map_delete_batch(map_fd: int, keys: np.ndarray) -> int:
    """Delete many elements (BPF_MAP_DELETE_BATCH); keys already gone are skipped.

    Returns how many were deleted.  The kernel stops a batch at the first
    missing key, so the rest is retried after it.
    """
    keys = np.ascontiguousarray(keys)
    deleted = 0
    start = 0
    while start < len(keys):
        attr = _BatchAttr(map_fd=map_fd, keys=int(keys.ctypes.data) + start * keys.dtype.itemsize,
                          count=len(keys) - start)
        try:
            _bpf(BPF_MAP_DELETE_BATCH, attr)
        except BpfError as exc:
            if exc.errno != errno.ENOENT:
                raise
            deleted += attr.count
            start += attr.count + 1  # skip the missing key
            continue
        deleted += attr.count
        break
    return deleted


@dataclass(frozen=True)
class TestRunResult:
    retval: int
    duration_ns: int
    data_out: bytes


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1, ctx: bytes | None = None,
                  data_out_size: int | None = None) -> TestRunResult:
    """Run a loaded program on one packet (BPF_PROG_TEST_RUN)."""
    din = ctypes.create_string_buffer(data, len(data))
    out_size = data_out_size if data_out_size is not None else len(data) + 256
    dout = ctypes.create_string_buffer(out_size)
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(data),
        data_size_out=out_size,
        data_in=_addr(din),
        data_out=_addr(dout),
        repeat=repeat,
    )
    if ctx is not None:
        cin = ctypes.create_string_buffer(ctx, len(ctx))
        attr.ctx_size_in = len(ctx)
        attr.ctx_in = _addr(cin)
    _bpf(BPF_PROG_TEST_RUN, attr)
    return TestRunResult(retval=attr.retval, duration_ns=attr.duration, data_out=dout.raw[: attr.data_size_out])


# -- objects, ids, infos, map creation ------------------------------------------------------------------------


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32),
                ("path_fd", ctypes.c_int32), ("_pad", ctypes.c_uint32)]


class _IdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16)]


class _BindAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("map_fd", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class _ProgInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32), ("nr_map_ids", ctypes.c_uint32),
                ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16)]


class _MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


def obj_pin(fd: int, path: bytes) -> None:
    """BPF_OBJ_PIN: ``fd``'s map or program stays alive at ``path`` (in a bpffs)."""
    name = ctypes.create_string_buffer(path)
    _bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(name), bpf_fd=fd))


def obj_get(path: bytes) -> int:
    """BPF_OBJ_GET: a new fd on what is pinned at ``path``."""
    name = ctypes.create_string_buffer(path)
    return _bpf(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(name)))


def prog_fd_by_id(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id))


def map_fd_by_id(map_id: int) -> int:
    return _bpf(BPF_MAP_GET_FD_BY_ID, _IdAttr(id=map_id))


def prog_ids() -> Iterator[int]:
    """Every loaded program's id (BPF_PROG_GET_NEXT_ID; needs CAP_SYS_ADMIN)."""
    current = 0
    for _ in range(1 << 20):
        attr = _IdAttr(id=current)
        try:
            _bpf(BPF_PROG_GET_NEXT_ID, attr)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        current = attr.next_id
        yield current


@dataclass(frozen=True)
class ProgInfo:
    id: int
    name: str
    map_ids: tuple[int, ...]


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def prog_info(fd: int) -> ProgInfo:
    info = _ProgInfo()
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)))
    ids = (ctypes.c_uint32 * max(1, info.nr_map_ids))()
    n = info.nr_map_ids
    info2 = _ProgInfo(nr_map_ids=n, map_ids=ctypes.addressof(ids))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info2), info=ctypes.addressof(info2)))
    return ProgInfo(id=info2.id, name=info2.name.decode(errors="replace"),
                    map_ids=tuple(ids[i] for i in range(min(n, info2.nr_map_ids))))


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)))
    return MapInfo(id=info.id, type=info.type, key_size=info.key_size, value_size=info.value_size,
                   max_entries=info.max_entries, flags=info.map_flags, name=info.name.decode(errors="replace"))


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, name: str, flags: int = 0,
               inner_map_fd: int = 0) -> int:
    attr = _MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size, max_entries=max_entries,
                          map_flags=flags, inner_map_fd=inner_map_fd, map_name=name.encode()[:15])
    return _bpf(BPF_MAP_CREATE, attr)


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """BPF_MAP_UPDATE_ELEM of one element (for a map-in-map, ``value`` is the inner map's fd)."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    _bpf(BPF_MAP_UPDATE_ELEM, _ElemAttr(map_fd=fd, key=_addr(kbuf), value=_addr(vbuf), flags=flags))


def prog_bind_map(prog_fd: int, map_fd: int) -> None:
    """BPF_PROG_BIND_MAP: the program holds ``map`` (and lists it) without using it (Linux 5.10)."""
    _bpf(BPF_PROG_BIND_MAP, _BindAttr(prog_fd=prog_fd, map_fd=map_fd))


# -- per-CPU values ------------------------------------------------------------------


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many CPUs a per-CPU map has a value for (the kernel's num_possible_cpus)."""
    text = Path(path).read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n


def percpu_dtype(dtype: np.dtype, cpus: int) -> np.dtype:
    """One per-CPU value as the kernel copies it: every CPU's value, each rounded up to 8 bytes."""
    slot = (dtype.itemsize + 7) // 8 * 8
    one = np.dtype({"names": ["v"], "formats": [dtype], "offsets": [0], "itemsize": slot})
    return np.dtype((one, (cpus,)))


def percpu_lookup(fd: int, key: bytes, dtype: np.dtype, cpus: int) -> np.ndarray | None:
    """One key of a per-CPU map: an array of ``cpus`` values of ``dtype`` (None: no such key)."""
    pdt = percpu_dtype(dtype, cpus)
    raw = map_lookup(fd, key, pdt.itemsize)
    if raw is None:
        return None
    return np.frombuffer(raw, dtype=pdt.base, count=cpus)["v"].copy()


class PerCpuReader:
    """Every element of a per-CPU map (hash or array) with batch lookups: keys, values[n, cpus]."""

    def __init__(self, fd: int, key_dtype: np.dtype, value_dtype: np.dtype, max_entries: int, cpus: int) -> None:
        self.cpus = cpus
        self.value_dtype = value_dtype
        self._reader = MapBatchReader(fd, key_dtype, percpu_dtype(value_dtype, cpus), max_entries,
                                      chunk=min(max_entries, 1024))

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        keys, values = self._reader.read()
        return keys, values["v"]
