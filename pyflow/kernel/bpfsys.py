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
import ctypes.util
import errno
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_DELETE_ELEM = 3
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long


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
