"""Interface names -> the interfaces to meter (pyroute2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pyroute2 import IPRoute

from pyflow.links import IFF_LOOPBACK, IFF_UP, Link

__all__ = ["IFF_LOOPBACK", "IFF_UP", "Link", "link_of", "list_links", "rx_packets"]


def list_links() -> list[Link]:
    """Every link in this network namespace, as the metering decision needs it (no root needed)."""
    with IPRoute() as ipr:
        return [link_of(msg) for msg in ipr.get_links()]


def link_of(msg: Any) -> Link:
    """One RTM_NEWLINK message as a :class:`Link`."""
    info = msg.get_attr("IFLA_LINKINFO")
    kind = slave_kind = ""
    vlan_id = 0
    if info is not None:
        kind = str(info.get_attr("IFLA_INFO_KIND") or "")
        slave_kind = str(info.get_attr("IFLA_INFO_SLAVE_KIND") or "")
        data = info.get_attr("IFLA_INFO_DATA")
        if kind == "vlan" and data is not None and hasattr(data, "get_attr"):
            vlan_id = int(data.get_attr("IFLA_VLAN_ID") or 0)
    # IFLA_LINK names a link of another namespace when IFLA_LINK_NETNSID is there (a veth's peer)
    lower = 0 if msg.get_attr("IFLA_LINK_NETNSID") is not None else int(msg.get_attr("IFLA_LINK") or 0)
    if lower == int(msg["index"]):
        lower = 0
    return Link(ifindex=int(msg["index"]), name=str(msg.get_attr("IFLA_IFNAME")), flags=int(msg["flags"]),
                kind=kind, slave_kind=slave_kind, master=int(msg.get_attr("IFLA_MASTER") or 0), lower=lower,
                vlan_id=vlan_id, link_type=int(msg["ifi_type"]))



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
