"""Interface names -> the interfaces to meter (pyroute2)."""

from __future__ import annotations

from collections.abc import Sequence

from pyroute2 import IPRoute

IFF_UP = 0x1
IFF_LOOPBACK = 0x8


def list_links() -> list[tuple[int, str, int]]:
    """(ifindex, name, flags) of every link in this network namespace."""
    with IPRoute() as ipr:
        return [(int(link["index"]), str(link.get_attr("IFLA_IFNAME")), int(link["flags"]))
                for link in ipr.get_links()]



def rx_packets(ifindexes: Sequence[int]) -> dict[int, int]:
    """The kernel's own received-packets counter (IFLA_STATS64) of each interface that still exists."""
    wanted = set(ifindexes)
    out: dict[int, int] = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            idx = int(link["index"])
            if idx in wanted:
                stats = link.get_attr("IFLA_STATS64") or link.get_attr("IFLA_STATS")
                if stats is not None:
                    out[idx] = int(stats["rx_packets"])
    return out
