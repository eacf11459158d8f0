"""A prefix-to-AS file: the AS numbers of flow sources and destinations (src_as / dst_as).

Format, one prefix a line::

    # comments start with '#', anywhere on a line; blank lines are ignored
    192.0.2.0/24      64500
    198.51.100.0/22   AS64501      # "AS" before the number is allowed
    2001:db8::/32     64502
    203.0.113.7       64503        # no length: a single address (/32, /128)

The longest prefix containing an address wins; the same prefix twice keeps
the first line.  AS numbers are 0..4294967295 (32-bit, asplain).  A bad line
stops the load with ``ConfigError`` naming the file and line.  Addresses that
no prefix covers get AS 0 (what NetFlow sends for "unknown").  The file must
be a regular file of at most 64M (``pyflow.files``: a full BGP table is ~25M).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pyflow import files
from pyflow.errors import ConfigError
from pyflow.host.lpm import AddrKeys, PrefixTable
from pyflow.text import cut

MAX_AS = 0xFFFFFFFF
MAX_AS_DIGITS = len(str(MAX_AS))


def _parse_as(text: str) -> int:
    digits = text[2:] if text[:2].upper() == "AS" else text
    if not digits.isascii() or not digits.isdigit():
        raise ValueError(f"AS number {cut(text)!r} is not a number")
    if len(digits) > MAX_AS_DIGITS:
        raise ValueError(f"AS number {cut(text)!r} has {len(digits)} digits (at most {MAX_AS_DIGITS}: 0..{MAX_AS})")
    value = int(digits)
    if value > MAX_AS:
        raise ValueError(f"AS number {text} is out of range (0..{MAX_AS})")
    return value


def parse_lines(lines: Iterable[str], name: str) -> tuple[list[ipaddress.IPv4Network | ipaddress.IPv6Network],
                                                          list[int]]:
    """(prefixes, AS numbers) of a prefix-to-AS text; ``name`` is what errors call the file."""
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    asns: list[int] = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ConfigError(f"{name}:{lineno}: expected 'PREFIX AS', got {cut(raw.strip())!r}")
        try:
            net = ipaddress.ip_network(fields[0], strict=True)
        except ValueError as exc:
            raise ConfigError(f"{name}:{lineno}: bad prefix {cut(fields[0])!r}: {cut(str(exc), 120)}") from None
        try:
            asn = _parse_as(fields[1])
        except ValueError as exc:
            raise ConfigError(f"{name}:{lineno}: {exc}") from None
        nets.append(net)
        asns.append(asn)
    return nets, asns


class AsTable:
    """Longest-prefix match of addresses to AS numbers."""

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
                 asns: Iterable[int], source: str = "<memory>") -> None:
        nets = list(networks)
        self.asns = np.array(list(asns), dtype=np.uint32)
        if len(nets) != len(self.asns):
            raise ValueError("networks and AS numbers must have the same length")
        self.source = source
        self.prefixes = PrefixTable.from_networks(nets)

    @classmethod
    def from_file(cls, path: str | Path) -> AsTable:
        """Load a prefix-to-AS file; ``ConfigError`` (naming file and line) for anything wrong."""
        p = Path(path)
        nets, asns = parse_lines(files.read_lines(p, "the prefix-to-AS file", files.MAX_AS_FILE_BYTES), str(p))
        return cls(nets, asns, source=str(p))

    @classmethod
    def from_text(cls, text: str, name: str = "<text>") -> AsTable:
        nets, asns = parse_lines(text.splitlines(), name)
        return cls(nets, asns, source=name)

    def __len__(self) -> int:
        return len(self.asns)

    def lookup(self, addrs: np.ndarray | AddrKeys, ip_version: np.ndarray | None = None) -> np.ndarray:
        """The AS number (uint32) of each address; 0 where no prefix covers it."""
        idx, _ = self.prefixes.lookup(addrs, ip_version)
        out = np.zeros(len(idx), dtype=np.uint32)
        hit = idx >= 0
        out[hit] = self.asns[idx[hit]]
        return out
