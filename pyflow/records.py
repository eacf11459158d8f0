"""The flow record batch: what the sweep produces and every encoder consumes.

One numpy structured array per batch (columnar, no per-record Python
objects).  Addresses are 16 bytes; IPv4 is v4-mapped (``::ffff:a.b.c.d``),
exactly as the kernel key stores it, so encoders take bytes 12..16 for IPv4.
Times are absolute wall-clock milliseconds since the Unix epoch.
"""

from __future__ import annotations

import enum
import ipaddress

import numpy as np


class EndReason(enum.IntEnum):
    """IPFIX flowEndReason (IE 136) values."""

    IDLE = 1  # inactive-flow-timeout
    ACTIVE = 2  # active-flow-timeout (the flow goes on)
    END_OF_FLOW = 3  # TCP FIN/RST seen
    FORCED = 4  # agent shutdown / interface removed
    LACK_OF_RESOURCES = 5  # cache nearly full


RECORD_DTYPE = np.dtype(
    [
        ("src_addr", "V16"),
        ("dst_addr", "V16"),
        ("ifindex", "<u4"),
        ("egress_ifindex", "<u4"),
        ("src_port", "<u2"),
        ("dst_port", "<u2"),
        ("protocol", "u1"),
        ("ip_version", "u1"),
        ("tos", "u1"),
        ("direction", "u1"),
        ("tcp_flags", "u1"),
        ("end_reason", "u1"),
        ("packets", "<u8"),
        ("bytes", "<u8"),
        ("start_ms", "<u8"),
        ("end_ms", "<u8"),
    ]
)

V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


def addr_to_16(addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """An address as the 16 bytes the kernel and records use (IPv4 v4-mapped)."""
    ip = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    if ip.version == 4:
        return V4_MAPPED_PREFIX + ip.packed
    return ip.packed


def addr_from_16(raw: bytes, ip_version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Inverse of :func:`addr_to_16`."""
    raw = bytes(raw)
    if ip_version == 4:
        return ipaddress.IPv4Address(raw[12:16])
    return ipaddress.IPv6Address(raw)


def empty(n: int = 0) -> np.ndarray:
    """A zeroed record batch of ``n`` records."""
    return np.zeros(n, dtype=RECORD_DTYPE)
