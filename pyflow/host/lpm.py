"""Longest-prefix match over IPv4 and IPv6 prefixes, vectorised with numpy.

A ``PrefixTable`` is built once from a list of prefixes (routes, the AS file)
and then answers, for a whole batch of addresses at once, which prefix is the
longest one that contains each address.

How: the prefixes of one family cut its address space into elementary
intervals (every prefix start, and every prefix end + 1, is a boundary).
Inside one interval the set of covering prefixes does not change, so neither
does the longest one.  The table keeps the sorted boundaries and, for each,
the longest prefix covering it (found at build time, one prefix length at a
time).  A lookup is then one ``searchsorted`` per family: O(n log m) for n
addresses and m prefixes, whatever the prefix lengths are.

Keys: IPv4 as unsigned 32-bit integers (the low four bytes of the v4-mapped
address, as the encoders read it), IPv6 as the 16 address bytes viewed as a
numpy ``S16`` string, whose order (byte-wise, big-endian) is the numeric one.

Addresses are the records' 16-byte form (``V16``; IPv4 v4-mapped,
``pyflow.records.addr_to_16``) and the family is the records' ``ip_version``
(4 or 6; anything else matches nothing).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from pyflow.records import addr_to_16

_MASK_BYTES = np.zeros((129, 16), dtype=np.uint8)
for _bits in range(129):
    _full, _rest = divmod(_bits, 8)
    _MASK_BYTES[_bits, :_full] = 0xFF
    if _rest:
        _MASK_BYTES[_bits, _full] = (0xFF << (8 - _rest)) & 0xFF


_V4_MASKS = np.array([(0xFFFFFFFF << (32 - p)) & 0xFFFFFFFF for p in range(33)], dtype=np.uint32)


def _v4_mask(plen: int) -> np.uint32:
    return _V4_MASKS[plen]


def as_bytes16(addrs: np.ndarray) -> np.ndarray:
    """``(n, 16) uint8`` view (or copy) of an array of 16-byte addresses (``V16``, ``S16`` or ``(n, 16) u1``)."""
    a = np.asarray(addrs)
    if a.dtype == np.uint8 and a.ndim == 2 and a.shape[1] == 16:
        return a
    if a.dtype.itemsize != 16:
        raise TypeError(f"addresses must be 16 bytes each, got dtype {a.dtype}")
    return np.ascontiguousarray(a).view(np.uint8).reshape(-1, 16)


def v4_keys(b16: np.ndarray) -> np.ndarray:
    """IPv4 keys (uint32) from ``(n, 16) uint8`` v4-mapped addresses: their last four bytes."""
    return np.ascontiguousarray(b16[:, 12:16]).view(">u4").reshape(-1).astype(np.uint32)


def v6_keys(b16: np.ndarray) -> np.ndarray:
    """IPv6 keys (``S16``, ordered like the numbers) from ``(n, 16) uint8`` addresses."""
    return np.ascontiguousarray(b16).view("S16").reshape(-1)


@dataclass(frozen=True)
class AddrKeys:
    """A batch of addresses as lookup keys, ready for any number of ``PrefixTable`` lookups.

    Converting addresses to keys costs about as much as a lookup; a caller
    that looks the same addresses up in several tables converts them once.
    """

    n: int
    v4: np.ndarray  # bool: rows of IPv4
    k4: np.ndarray  # uint32 keys of those rows
    v6: np.ndarray  # bool: rows of IPv6
    k6: np.ndarray  # S16 keys of those rows

    @classmethod
    def of(cls, addrs: np.ndarray | AddrKeys, ip_version: np.ndarray | None = None) -> AddrKeys:
        """Keys of ``addrs`` (V16 / S16 / (n, 16) uint8) with ``ip_version`` per address (already keys: as is)."""
        if isinstance(addrs, AddrKeys):
            return addrs
        if ip_version is None:
            raise TypeError("ip_version is required with an array of addresses")
        b16 = as_bytes16(addrs)
        ver = np.asarray(ip_version).reshape(-1)
        if len(ver) != len(b16):
            raise ValueError("addrs and ip_version must have the same length")
        v4 = ver == 4
        v6 = ver == 6
        k4 = v4_keys(b16)[v4]
        k6 = v6_keys(b16[v6]) if v6.any() else np.zeros(0, dtype="S16")
        return cls(len(b16), v4, k4, v6, k6)


@dataclass(frozen=True)
class _Family:
    """One family's elementary intervals: sorted boundaries and the entry that owns each (-1: none)."""

    bounds: np.ndarray  # uint32 (IPv4) or S16 (IPv6), sorted, bounds[0] is the lowest address
    owner: np.ndarray  # int64 entry index per interval, -1 = no prefix covers it

    def find(self, keys: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.bounds, keys, side="right") - 1
        return self.owner[pos]


def _assign(bounds: np.ndarray, masked_by_len: dict[int, tuple[np.ndarray, np.ndarray]],
            mask_fn: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """For each boundary, the entry of the longest prefix that contains it (-1 if none).

    ``masked_by_len[plen] = (sorted network keys, entry index)`` for the
    prefixes of that length; ``mask_fn(keys, plen)`` masks keys to ``plen`` bits.
    """
    owner = np.full(len(bounds), -1, dtype=np.int64)
    pending = np.arange(len(bounds))
    for plen in sorted(masked_by_len, reverse=True):
        if len(pending) == 0:
            break
        nets, entries = masked_by_len[plen]
        keys = mask_fn(bounds[pending], plen)
        pos = np.minimum(np.searchsorted(nets, keys), len(nets) - 1)
        hit = nets[pos] == keys
        owner[pending[hit]] = entries[pos[hit]]
        pending = pending[~hit]
    return owner


def _compress(bounds: np.ndarray, owner: np.ndarray) -> _Family:
    """Merge neighbouring intervals with the same owner."""
    keep = np.ones(len(owner), dtype=bool)
    keep[1:] = owner[1:] != owner[:-1]
    return _Family(bounds[keep], owner[keep])


def _build_v4(nets: np.ndarray, plens: np.ndarray, entries: np.ndarray) -> _Family:
    starts = nets.astype(np.uint64)
    ends1 = starts + (np.uint64(1) << (32 - plens.astype(np.uint64)))  # end + 1, up to 2**32
    allb = np.unique(np.concatenate([np.zeros(1, np.uint64), starts, ends1]))
    allb = allb[allb < (1 << 32)].astype(np.uint32)  # 2**32: past every address, owns nothing
    by_len: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for plen in np.unique(plens):
        sel = plens == plen
        order = np.argsort(nets[sel], kind="stable")
        by_len[int(plen)] = (nets[sel][order], entries[sel][order])

    def mask(keys: np.ndarray, plen: int) -> np.ndarray:
        return keys & _v4_mask(plen)

    return _compress(allb, _assign(allb, by_len, mask))


def _plus_one_128(b16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(address + 1 as (n, 16) uint8, did not overflow) for big-endian 128-bit numbers."""
    hi = np.ascontiguousarray(b16[:, :8]).view(">u8").reshape(-1).astype(np.uint64)
    lo = np.ascontiguousarray(b16[:, 8:]).view(">u8").reshape(-1).astype(np.uint64)
    lo1 = lo + np.uint64(1)
    carry = lo1 == 0
    hi1 = hi + carry.astype(np.uint64)
    ok = ~(carry & (hi1 == 0))
    out = np.empty((len(b16), 16), dtype=np.uint8)
    out[:, :8] = hi1.astype(">u8").view(np.uint8).reshape(-1, 8)
    out[:, 8:] = lo1.astype(">u8").view(np.uint8).reshape(-1, 8)
    return out, ok


def _build_v6(nets16: np.ndarray, plens: np.ndarray, entries: np.ndarray) -> _Family:
    ends16 = nets16 | ~_MASK_BYTES[plens]
    ends1, ok = _plus_one_128(ends16)
    allb = np.unique(np.concatenate([v6_keys(np.zeros((1, 16), np.uint8)), v6_keys(nets16), v6_keys(ends1[ok])]))
    by_len: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for plen in np.unique(plens):
        sel = plens == plen
        keys = v6_keys(nets16[sel])
        order = np.argsort(keys, kind="stable")
        by_len[int(plen)] = (keys[order], entries[sel][order])

    def mask(keys: np.ndarray, plen: int) -> np.ndarray:
        return v6_keys(as_bytes16(keys) & _MASK_BYTES[plen])

    return _compress(allb, _assign(allb, by_len, mask))


class PrefixTable:
    """Longest-prefix match: for each address, the index of the longest prefix containing it.

    ``PrefixTable(addrs, plens, versions)``: entry ``i`` is the prefix
    ``addrs[i]/plens[i]`` of family ``versions[i]`` (4 or 6; ``plens`` in that
    family's terms, 0..32 or 0..128; host bits are ignored).  When the same
    prefix is given more than once, the first entry wins: callers put the
    preferred one first (lowest route metric, first line of a file).
    """

    def __init__(self, addrs: np.ndarray, plens: np.ndarray, versions: np.ndarray) -> None:
        b16 = as_bytes16(addrs)
        plens = np.asarray(plens, dtype=np.int64).reshape(-1)
        versions = np.asarray(versions, dtype=np.int64).reshape(-1)
        if not len(b16) == len(plens) == len(versions):
            raise ValueError("addrs, plens and versions must have the same length")
        bad = ~np.isin(versions, (4, 6))
        if bad.any():
            raise ValueError(f"ip version must be 4 or 6, got {versions[bad][0]}")
        too_long = (plens < 0) | (plens > np.where(versions == 4, 32, 128))
        if too_long.any():
            i = int(np.flatnonzero(too_long)[0])
            raise ValueError(f"prefix length {plens[i]} out of range for IPv{versions[i]}")
        self.prefix_len = plens.astype(np.uint8)
        self.versions = versions.astype(np.uint8)
        entries = np.arange(len(plens), dtype=np.int64)

        v4 = versions == 4
        nets4 = v4_keys(b16[v4])
        p4 = plens[v4]
        nets4 = nets4 & _V4_MASKS[p4]
        e4 = _first_of_each(np.stack([nets4.astype(np.uint64), p4.astype(np.uint64)], axis=1), entries[v4])
        sel4 = np.isin(entries[v4], e4)
        self._v4 = _build_v4(nets4[sel4], p4[sel4], entries[v4][sel4])

        v6 = versions == 6
        p6 = plens[v6]
        nets6 = b16[v6] & _MASK_BYTES[p6]
        key6 = np.concatenate([nets6, p6.astype(np.uint8)[:, None]], axis=1)
        e6 = _first_of_each(key6, entries[v6])
        sel6 = np.isin(entries[v6], e6)
        self._v6 = _build_v6(nets6[sel6], p6[sel6], entries[v6][sel6])

    @classmethod
    def from_networks(cls, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> PrefixTable:
        """A table of ``ipaddress`` networks (entry i = the i-th network)."""
        nets = list(networks)
        addrs = np.array([addr_to_16(n.network_address) for n in nets], dtype="S16").reshape(-1)
        return cls(addrs, np.array([n.prefixlen for n in nets], dtype=np.int64),
                   np.array([n.version for n in nets], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.prefix_len)

    @property
    def intervals(self) -> int:
        """Elementary intervals kept (both families): the size of what a lookup searches."""
        return len(self._v4.bounds) + len(self._v6.bounds)

    def lookup(self, addrs: np.ndarray | AddrKeys,
               ip_version: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(entry index or -1, prefix length)`` of the longest prefix containing each address.

        ``addrs``: 16-byte addresses with their ``ip_version``, or ``AddrKeys``.
        No match: index -1 and length 0 (so a default route, ``/0``, also
        gives length 0 but a valid index).
        """
        keys = AddrKeys.of(addrs, ip_version)
        idx = np.full(keys.n, -1, dtype=np.int64)
        if len(keys.k4):
            idx[keys.v4] = self._v4.find(keys.k4)
        if len(keys.k6):
            idx[keys.v6] = self._v6.find(keys.k6)
        if len(self) == 0:
            return idx, np.zeros(keys.n, dtype=np.uint8)
        plen = self.prefix_len[idx]  # idx -1 reads the last entry: zeroed below
        plen[idx < 0] = 0
        return idx, plen


def _first_of_each(keys: np.ndarray, entries: np.ndarray) -> np.ndarray:
    """The entries that are the first with their key (rows of ``keys``)."""
    if len(entries) == 0:
        return entries
    raw = np.ascontiguousarray(keys).view(f"S{keys.dtype.itemsize * keys.shape[1]}").reshape(-1)
    _, first = np.unique(raw, return_index=True)
    return entries[np.sort(first)]
