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
        # -- detail of the flow's packets, from the kernel (first packet unless said) --
        ("src_mac", "V6"),
        ("dst_mac", "V6"),
        ("vlan_id", "<u2"),  # outer 802.1Q/802.1ad VLAN id, 0 = untagged (part of the flow key)
        ("inner_vlan_id", "<u2"),  # QinQ: the VLAN id inside the outer tag, 0 = none (flow key too)
        ("ttl_min", "u1"),  # IPv4 TTL / IPv6 hop limit, minimum and maximum over all packets
        ("ttl_max", "u1"),
        ("length_min", "<u2"),  # IP total length, minimum and maximum over all packets
        ("length_max", "<u2"),
        ("ip_header_length", "u1"),  # octets: IPv4 IHL*4, IPv6 40
        ("tcp_seq", "<u4"),
        ("tcp_ack", "<u4"),
        ("tcp_window", "<u2"),
        ("udp_length", "<u2"),
        ("icmp_type", "u1"),  # ICMP/ICMPv6 type and code (also dst_port = type*256+code)
        ("icmp_code", "u1"),
        ("igmp_type", "u1"),
        ("flow_label", "<u4"),  # IPv6 flow label (20 bits)
        ("next_hop", "V16"),  # gateway, 16 bytes like the addresses; all zero = none/direct
        # -- from the host: routing table, conntrack, prefix-to-AS file --
        ("src_mask", "u1"),  # prefix length of the route to the source
        ("dst_mask", "u1"),  # prefix length of the route to the destination
        ("is_multicast", "u1"),  # IPFIX isMulticast octet
        ("src_as", "<u4"),
        ("dst_as", "<u4"),
        ("nat_src_addr", "V16"),  # post-NAT source/destination, all zero = not translated
        ("nat_dst_addr", "V16"),
        ("nat_src_port", "<u2"),
        ("nat_dst_port", "<u2"),
        ("nat_event", "u1"),  # natEvent (IE 230): 0 for flow records, 4/5 NAT44 create/delete
        # -- bookkeeping, not exported: the interface the kernel metered the flow on
        # (the key's ifindex; ``ifindex`` above is where the packets came in) --
        ("meter_ifindex", "<u4"),
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
