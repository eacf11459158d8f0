"""Which links to meter so that every packet is counted once: a pure function of the host's links.

RouterOS counts a packet once, where it enters IP.  On Linux a frame can pass
several stacked devices, and a program on each would count it on each: a
bridge port and the bridge, a bond slave and the bond, a VLAN device and its
parent, a macvlan/ipvlan and its lower device.  With ``interfaces=all``
pyflow meters the device that carries the frame into IP, and skips the
others, each with its reason:

==========================  ======================================================
link                        with ``all``
==========================  ======================================================
loopback                    skipped ("loopback")
not up                      skipped ("down")
port of a bridge / OVS      skipped ("port of br0"): the bridge meters what it
                            delivers to this host; frames bridged from port to
                            port never enter IP (RouterOS does not count them
                            either: name the ports to meter them)
slave of a bond / team      skipped ("slave of bond0")
VLAN, macvlan, ipvlan       skipped when its parent (lower device), or the
                            device under that (QinQ), is metered ("VLAN 10 on
                            eth0: eth0 meters its frames"): the parent sees each
                            frame first, and the VLAN ids are part of the flow
                            key; metered when it is not (a VLAN on a bridge
                            port takes its frames before the bridge does)
VRF device                  skipped ("VRF device"): its member interfaces are
                            ordinary L3 interfaces and are metered
ifb, nlmon                  skipped: copies of other links' traffic / netlink
everything else             metered: Ethernet, veth, bridge, bond, VRF members,
                            tunnels (a tunnel and its underlay see different
                            packets: the inner and the outer ones)
==========================  ======================================================

A named list meters exactly the names; :func:`double_counts` names the pairs
in it that count the same frame twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

IFF_UP = 0x1
IFF_LOOPBACK = 0x8
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772

BRIDGE_KINDS = frozenset({"bridge", "openvswitch"})
AGGREGATE_KINDS = frozenset({"bond", "team"})
STACKED_KINDS = {"vlan": "VLAN", "macvlan": "macvlan", "macvtap": "macvtap", "ipvlan": "ipvlan",
                 "ipvtap": "ipvtap"}
COPY_KINDS = {"ifb": "ifb: copies of other interfaces' traffic", "nlmon": "nlmon: netlink monitor, not IP"}


@dataclass(frozen=True)
class Link:
    """What rtnetlink says of one link (the fields the decision needs)."""

    ifindex: int
    name: str
    flags: int = IFF_UP
    kind: str = ""  # IFLA_INFO_KIND: bridge, bond, vlan, veth, vxlan, ... ("" = a plain device)
    slave_kind: str = ""  # IFLA_INFO_SLAVE_KIND: bridge, bond, team, vrf, openvswitch
    master: int = 0  # IFLA_MASTER: the bridge, bond or VRF it belongs to
    lower: int = 0  # IFLA_LINK in this namespace: a VLAN's / macvlan's parent
    vlan_id: int = 0  # IFLA_VLAN_ID of a VLAN device
    link_type: int = ARPHRD_ETHER  # ifi_type: ARPHRD_ETHER, or e.g. ARPHRD_NONE (WireGuard, tun)

    @property
    def ethernet(self) -> bool:
        """Whether its packets carry an Ethernet header (loopback's is all zeros, but there)."""
        return self.link_type in (ARPHRD_ETHER, ARPHRD_LOOPBACK)

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def loopback(self) -> bool:
        return bool(self.flags & IFF_LOOPBACK)


@dataclass(frozen=True)
class Decision:
    """Metered or not, and why (said in `pyflow check`, `pyflow status` and the log)."""

    metered: bool
    reason: str
    covered_by: int = 0  # skipped stacked device: the ifindex that meters its frames below it


def plan(links: Iterable[Link], names: tuple[str, ...] = ("all",)) -> dict[int, Decision]:
    """ifindex -> decision for every link: ``names`` is ``("all",)`` or the interfaces to meter."""
    by_index = {link.ifindex: link for link in links}
    if names != ("all",):
        wanted = set(names)
        return {i: Decision(True, "named") if link.name in wanted else Decision(False, "not named")
                for i, link in by_index.items()}
    out: dict[int, Decision] = {}
    for index in by_index:
        _decide(index, by_index, out, ())
    return out


def _decide(index: int, links: Mapping[int, Link], out: dict[int, Decision], seen: tuple[int, ...]) -> Decision:
    if index in out:
        return out[index]
    link = links[index]
    if index in seen:  # a loop in what netlink said: meter it rather than lose its packets
        return Decision(True, "")
    decision = _rule(link, links, out, (*seen, index))
    out[index] = decision
    return decision


def _rule(link: Link, links: Mapping[int, Link], out: dict[int, Decision], seen: tuple[int, ...]) -> Decision:
    if link.loopback:
        return Decision(False, "loopback")
    if not link.up:
        return Decision(False, "down")
    if link.kind in COPY_KINDS:
        return Decision(False, COPY_KINDS[link.kind])
    master = links.get(link.master) if link.master != link.ifindex else None
    if master is not None and link.slave_kind in BRIDGE_KINDS | AGGREGATE_KINDS:
        role = "port" if link.slave_kind in BRIDGE_KINDS else "slave"
        return Decision(False, f"{role} of {master.name}")
    if link.kind == "vrf":
        return Decision(False, "VRF device: its member interfaces are metered")
    lower = links.get(link.lower) if link.lower != link.ifindex else None
    below = _decide(lower.ifindex, links, out, seen) if link.kind in STACKED_KINDS and lower is not None else None
    if lower is not None and below is not None and (below.metered or below.covered_by):
        by = lower.ifindex if below.metered else below.covered_by
        what = f"VLAN {link.vlan_id}" if link.kind == "vlan" else STACKED_KINDS[link.kind]
        return Decision(False, f"{what} on {lower.name}: {links[by].name} meters its frames", by)
    if master is not None and link.slave_kind == "vrf":
        return Decision(True, f"member of VRF {master.name}")
    return Decision(True, "")


def metered_names(links: Iterable[Link], names: tuple[str, ...] = ("all",)) -> dict[int, str]:
    """ifindex -> name of every link to meter."""
    links = list(links)
    decisions = plan(links, names)
    return {link.ifindex: link.name for link in links if decisions[link.ifindex].metered}


def double_counts(links: Iterable[Link], names: tuple[str, ...]) -> list[str]:
    """Warnings for a named list that names a link and a device stacked on or under it."""
    by_index = {link.ifindex: link for link in links}
    named = {link.ifindex for link in by_index.values() if link.name in set(names)}
    out = []
    for index in sorted(named):
        link = by_index[index]
        for above, why in _uppers(link, by_index):
            if above.ifindex in named:
                out.append(f"{link.name} and {above.name} are both named: {link.name} is {why} {above.name}, so a "
                           f"frame that passes both is counted twice (name one of them)")
    return out


def _uppers(link: Link, links: Mapping[int, Link]) -> list[tuple[Link, str]]:
    """The devices a frame of ``link`` goes on to (its master; the VLANs and macvlans on it)."""
    out = []
    if link.master in links and link.slave_kind in BRIDGE_KINDS | AGGREGATE_KINDS:
        role = "a port of" if link.slave_kind in BRIDGE_KINDS else "a slave of"
        out.append((links[link.master], role))
    for other in links.values():
        if other.lower == link.ifindex and other.kind in STACKED_KINDS:
            out.append((other, "the parent of"))
    return out


def describe(links: Iterable[Link], decisions: Mapping[int, Decision]) -> list[tuple[str, int, str]]:
    """(name, ifindex, "metered"/"skipped: reason") of every link, by ifindex: for the listings."""
    rows = []
    for link in sorted(links, key=lambda item: item.ifindex):
        d = decisions.get(link.ifindex, Decision(False, "unknown"))
        text = ("metered" + (f" ({d.reason})" if d.reason else "")) if d.metered else f"skipped: {d.reason}"
        rows.append((link.name, link.ifindex, text))
    return rows
