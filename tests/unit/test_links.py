"""Which links `interfaces=all` meters: the per-link decision over recorded host shapes.

Each host below is written as rtnetlink describes it (IFLA_INFO_KIND,
IFLA_INFO_SLAVE_KIND, IFLA_MASTER, IFLA_LINK, IFLA_VLAN_ID): a Docker node,
a bonded router with VLANs, QinQ, macvlan/ipvlan, a VRF, a tunnel.  The rule
under test: every frame is metered on exactly one device of its stack.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyflow.follow import LinkWatcher
from pyflow.links import IFF_LOOPBACK, IFF_UP, Decision, Link, describe, double_counts, metered_names, plan

UP, DOWN = IFF_UP, 0
LO = Link(1, "lo", UP | IFF_LOOPBACK)

DOCKER = [
    LO,
    Link(2, "eth0", UP),
    Link(3, "docker0", UP, kind="bridge"),
    Link(4, "veth1a2b", UP, kind="veth", slave_kind="bridge", master=3),
    Link(5, "veth3c4d", UP, kind="veth", slave_kind="bridge", master=3),
    Link(6, "cali12345", UP, kind="veth"),  # a routed pod veth (Calico): no bridge
]
BONDED_ROUTER = [
    LO,
    Link(2, "eno1", UP, slave_kind="bond", master=4),
    Link(3, "eno2", UP, slave_kind="bond", master=4),
    Link(4, "bond0", UP, kind="bond"),
    Link(5, "bond0.10", UP, kind="vlan", lower=4, vlan_id=10),
    Link(6, "bond0.20", UP, kind="vlan", lower=4, vlan_id=20),
    Link(7, "team0", UP, kind="team"),
    Link(8, "eno3", UP, slave_kind="team", master=7),
]
QINQ = [
    LO,
    Link(2, "eth1", UP),
    Link(3, "eth1.100", UP, kind="vlan", lower=2, vlan_id=100),  # 802.1ad S-tag
    Link(4, "eth1.100.7", UP, kind="vlan", lower=3, vlan_id=7),  # C-tag inside it
]
MACVLAN = [
    LO,
    Link(2, "eth0", UP),
    Link(3, "mv0", UP, kind="macvlan", lower=2),
    Link(4, "ipv0", UP, kind="ipvlan", lower=2),
    Link(5, "mvtap0", UP, kind="macvtap", lower=2),
]
VRF = [
    LO,
    Link(2, "vrf-blue", UP, kind="vrf"),
    Link(3, "eth0", UP, slave_kind="vrf", master=2),
    Link(4, "eth1", UP),
]
TUNNELS = [
    LO,
    Link(2, "eth0", UP),
    Link(3, "wg0", UP, kind="wireguard"),
    Link(4, "gre1", UP, kind="gre"),
    Link(5, "vxlan100", UP, kind="vxlan"),
    Link(6, "ifb0", UP, kind="ifb"),
    Link(7, "eth9", DOWN),
]
VLAN_ON_BRIDGE_PORT = [
    LO,
    Link(2, "br0", UP, kind="bridge"),
    Link(3, "eth0", UP, slave_kind="bridge", master=2),
    Link(4, "eth0.30", UP, kind="vlan", lower=3, vlan_id=30),  # takes its frames before the bridge does
]
NESTED = [  # a bond that is itself a bridge port
    LO,
    Link(2, "br0", UP, kind="bridge"),
    Link(3, "bond0", UP, kind="bond", slave_kind="bridge", master=2),
    Link(4, "eth0", UP, slave_kind="bond", master=3),
]

CASES = [
    ("docker", DOCKER, {"eth0": "", "docker0": "", "cali12345": ""},
     {"veth1a2b": "port of docker0", "veth3c4d": "port of docker0"}),
    ("bonded router", BONDED_ROUTER, {"bond0": "", "team0": ""},
     {"eno1": "slave of bond0", "eno2": "slave of bond0", "eno3": "slave of team0",
      "bond0.10": "VLAN 10 on bond0: bond0 meters its frames",
      "bond0.20": "VLAN 20 on bond0: bond0 meters its frames"}),
    ("qinq", QINQ, {"eth1": ""},
     {"eth1.100": "VLAN 100 on eth1: eth1 meters its frames",
      "eth1.100.7": "VLAN 7 on eth1.100: eth1 meters its frames"}),
    ("macvlan", MACVLAN, {"eth0": ""},
     {"mv0": "macvlan on eth0: eth0 meters its frames", "ipv0": "ipvlan on eth0: eth0 meters its frames",
      "mvtap0": "macvtap on eth0: eth0 meters its frames"}),
    ("vrf", VRF, {"eth0": "member of VRF vrf-blue", "eth1": ""},
     {"vrf-blue": "VRF device: its member interfaces are metered"}),
    ("tunnels", TUNNELS, {"eth0": "", "wg0": "", "gre1": "", "vxlan100": ""},
     {"ifb0": "ifb: copies of other interfaces' traffic", "eth9": "down"}),
    ("vlan on a bridge port", VLAN_ON_BRIDGE_PORT, {"br0": "", "eth0.30": ""}, {"eth0": "port of br0"}),
    ("nested", NESTED, {"br0": ""}, {"bond0": "port of br0", "eth0": "slave of bond0"}),
]  # fmt: skip


@pytest.mark.parametrize(("host", "links", "metered", "skipped"), CASES, ids=[c[0] for c in CASES])
def test_all_meters_each_frame_once(host: str, links: list[Link], metered: dict[str, str],
                                    skipped: dict[str, str]) -> None:
    decisions = plan(links)
    names = {link.ifindex: link.name for link in links}
    got = {names[i]: d for i, d in decisions.items()}
    assert {n: d.reason for n, d in got.items() if d.metered} == metered
    assert {n: d.reason for n, d in got.items() if not d.metered} == {"lo": "loopback"} | skipped
    assert set(metered_names(links).values()) == set(metered)


def test_named_lists_meter_exactly_the_names_and_warn_of_double_counts() -> None:
    decisions = plan(DOCKER, ("docker0", "veth1a2b"))
    assert {i for i, d in decisions.items() if d.metered} == {3, 4}
    assert decisions[2] == Decision(False, "not named")
    (warning,) = double_counts(DOCKER, ("docker0", "veth1a2b", "eth0"))
    assert warning.startswith("veth1a2b and docker0 are both named: veth1a2b is a port of docker0")
    assert "counted twice" in warning
    vlans = double_counts(BONDED_ROUTER, ("bond0", "bond0.10", "eno1"))
    assert [w.split(":")[0] for w in vlans] == ["eno1 and bond0 are both named", "bond0 and bond0.10 are both named"]
    assert double_counts(DOCKER, ("eth0", "cali12345")) == []


def test_describe_lists_every_link_with_its_reason() -> None:
    rows = describe(DOCKER, plan(DOCKER))
    assert rows[0] == ("lo", 1, "skipped: loopback")
    assert ("veth1a2b", 4, "skipped: port of docker0") in rows
    assert ("eth0", 2, "metered") in rows


def test_a_port_joining_and_leaving_a_bridge() -> None:
    """Hot-plug is the same function of the new link table: enslaved -> skipped, released -> metered."""
    free = [LO, Link(2, "br0", UP, kind="bridge"), Link(3, "veth0", UP, kind="veth")]
    joined = [*free[:2], Link(3, "veth0", UP, kind="veth", slave_kind="bridge", master=2)]
    assert metered_names(free) == {2: "br0", 3: "veth0"}
    assert metered_names(joined) == {2: "br0"}
    assert metered_names(free) == {2: "br0", 3: "veth0"}


KINDS = st.sampled_from(["", "veth", "bridge", "bond", "team", "vlan", "macvlan", "ipvlan", "vrf", "gre", "ifb"])
SLAVE_KINDS = st.sampled_from(["", "bridge", "bond", "team", "vrf", "openvswitch"])


@st.composite
def hosts(draw: st.DrawFn) -> list[Link]:
    n = draw(st.integers(1, 12))
    refs = st.integers(0, n + 1)
    return [Link(i, f"if{i}", draw(st.sampled_from([UP, DOWN, UP | IFF_LOOPBACK])), draw(KINDS),
                 draw(SLAVE_KINDS), draw(refs), draw(refs), draw(st.integers(0, 4094)))
            for i in range(1, n + 1)]  # fmt: skip


@given(hosts())
def test_any_link_table_gets_a_decision_for_every_link(links: list[Link]) -> None:
    """Arbitrary (even cyclic or dangling) master/lower references never raise, and every link gets
    one decision; a stacked device is skipped only for a metered parent."""
    decisions = plan(links)
    assert set(decisions) == {link.ifindex for link in links}
    by_index = {link.ifindex: link for link in links}
    for link in links:
        d = decisions[link.ifindex]
        if not d.metered and d.covered_by:
            assert decisions[d.covered_by].metered and by_index[d.covered_by].name in d.reason
        if d.metered:
            assert link.up and not link.loopback


def test_the_link_watcher_catches_up_once_as_it_starts() -> None:
    """A link changed between the runner's first dump and the watcher's subscription sends no event
    the watcher can see: it reconciles once as it starts (no root: a netlink subscription)."""
    called = threading.Event()
    logged: list[str] = []
    watcher = LinkWatcher(called.set, logged.append)
    try:
        assert called.wait(10), "no reconcile as the watcher started"
    finally:
        watcher.close()
    assert logged == []
