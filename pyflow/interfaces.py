"""Interface names -> the interfaces to meter (pyroute2)."""

from __future__ import annotations

from collections.abc import Sequence

from pyroute2 import IPRoute

from pyflow.errors import KernelError

IFF_UP = 0x1
IFF_LOOPBACK = 0x8


def list_links() -> list[tuple[int, str, int]]:
    """(ifindex, name, flags) of every link in this network namespace."""
    with IPRoute() as ipr:
        return [(int(link["index"]), str(link.get_attr("IFLA_IFNAME")), int(link["flags"]))
                for link in ipr.get_links()]


def resolve_interfaces(names: Sequence[str]) -> list[str]:
    """``all`` = every non-loopback interface that is up; otherwise the names, which must exist."""
    links = list_links()
    if list(names) == ["all"]:
        chosen = [name for _, name, flags in links if flags & IFF_UP and not flags & IFF_LOOPBACK]
        if not chosen:
            raise KernelError("interfaces=all but no non-loopback interface is up")
        return chosen
    known = {name for _, name, _ in links}
    missing = [n for n in names if n not in known]
    if missing:
        raise KernelError(f"no such interface: {', '.join(missing)} (see `ip link`)")
    return list(dict.fromkeys(names))


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
