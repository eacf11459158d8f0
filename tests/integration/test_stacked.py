"""A Docker-like host meters every packet exactly once with ``interfaces=all``.

Host namespace h: a bridge (the host's address 10.88.0.1 on it, like docker0 or
cni0) with one port, the host end of a container's veth; the container
(namespace c, 10.88.0.2) routes through h; an uplink veth to namespace u
(10.89.0.2), which h routes to.  pyflow runs in h with ``--interface all`` and
exports IPFIX to nfcapd.  Pings go container -> host, container -> uplink and
uplink -> container; each ICMP flow (addresses, type, direction) must arrive
at nfcapd with exactly the packets that passed, once: not once on the port
and once more on the bridge.  Then the port leaves the bridge (metered again)
and rejoins it (let go again).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.netns import Pair, ip
from tests.integration.procs import REPO, nfcapd_in, pyflow_in, tshark_capture_in, tshark_cflow

PINGS = 20
NFCAPD_PORT = 20611
ECHO_REPLY, ECHO_REQUEST = 0, 8


@dataclass
class DockerHost:
    h: str
    c: str
    u: str
    br: str
    port: str  # host end of the container's veth, a port of br
    cif: str  # container end
    up: str  # host end of the uplink
    uif: str  # uplink end
    host_v4: str = "10.88.0.1"
    cont_v4: str = "10.88.0.2"
    up_v4: str = "10.89.0.1"
    far_v4: str = "10.89.0.2"

    def run(self, ns: str, *cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=60)

    def ifindex(self, dev: str) -> int:
        return int(json.loads(ip("-n", self.h, "-j", "link", "show", dev).stdout)[0]["ifindex"])

    def mac(self, ns: str, dev: str) -> str:
        return str(json.loads(ip("-n", ns, "-j", "link", "show", dev).stdout)[0]["address"])

    def ping(self, ns: str, dst: str) -> None:
        res = self.run(ns, "ping", "-q", "-n", "-c", str(PINGS), "-i", "0.01", "-W", "2", dst)
        assert f"{PINGS} received" in res.stdout, res.stdout + res.stderr


def _links(d: DockerHost) -> None:
    ip("-n", d.h, "link", "add", d.br, "type", "bridge")
    ip("link", "add", d.port, "netns", d.h, "type", "veth", "peer", "name", d.cif, "netns", d.c)
    ip("link", "add", d.up, "netns", d.h, "type", "veth", "peer", "name", d.uif, "netns", d.u)
    ip("-n", d.h, "link", "set", d.port, "master", d.br)
    for ns, dev, addr in ((d.h, d.br, d.host_v4), (d.c, d.cif, d.cont_v4), (d.h, d.up, d.up_v4),
                          (d.u, d.uif, d.far_v4)):
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
    for ns, dev in ((d.h, d.port), (d.h, d.br), (d.c, d.cif), (d.h, d.up), (d.u, d.uif)):
        ip("-n", ns, "link", "set", dev, "multicast", "off", "up")
    ip("-n", d.c, "route", "add", "default", "via", d.host_v4)
    ip("-n", d.u, "route", "add", "10.88.0.0/24", "via", d.up_v4)
    # static neighbours: no ARP of the hosts' own making (it is not IP, but keeps runs alike)
    for ns, dev, addr, peer_ns, peer_dev in ((d.h, d.br, d.cont_v4, d.c, d.cif), (d.c, d.cif, d.host_v4, d.h, d.br),
                                             (d.h, d.up, d.far_v4, d.u, d.uif), (d.u, d.uif, d.up_v4, d.h, d.up)):
        ip("-n", ns, "neigh", "replace", addr, "lladdr", d.mac(peer_ns, peer_dev), "dev", dev, "nud", "permanent")


@contextmanager
def docker_host() -> Iterator[DockerHost]:
    uid = f"{os.getpid() % 100000}"
    d = DockerHost(h=f"pfd{uid}h", c=f"pfd{uid}c", u=f"pfd{uid}u", br=f"pbr{uid}", port=f"pvh{uid}",
                   cif=f"pvc{uid}", up=f"puh{uid}", uif=f"puu{uid}")
    try:
        for ns in (d.h, d.c, d.u):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            d.run(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        d.run(d.h, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _links(d)
        yield d
    finally:
        for ns in (d.h, d.c, d.u):
            ip("netns", "del", ns, check=False)


def icmp_counts(flowdir: Path) -> Counter[tuple[str, str, int, int, int]]:
    """(src, dst, ICMP type, metered-on ifindex, direction) -> packets, from nfcapd's files."""
    out = subprocess.run(["nfdump", "-R", str(flowdir), "-q", "-N", "-o", "fmt:%sa|%da|%dp|%pkt|%in|%out|%dir"],
                         capture_output=True, text=True, check=True).stdout
    counts: Counter[tuple[str, str, int, int, int]] = Counter()
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) != 7 or not cells[3].isdigit() or not cells[0].startswith("10.8"):
            continue
        sa, da, dp, pkts, iif, oif, direction = cells
        icmp_type = int(float(dp)) if "." in dp else int(dp) >> 8
        egress = direction.strip().upper().startswith("E") or direction == "1"
        counts[(sa, da, icmp_type, int(oif if egress else iif), int(egress))] += int(pkts)
    return counts


def expected(d: DockerHost, direction: str) -> Counter[tuple[str, str, int, int, int]]:
    """Every ping packet once where it enters IP in h (and once where it leaves, with egress)."""
    br, up = d.ifindex(d.br), d.ifindex(d.up)
    c, host, far = d.cont_v4, d.host_v4, d.far_v4
    # (src, dst, type, ingress device in h or None, egress device in h or None)
    paths = [(c, host, ECHO_REQUEST, br, None), (host, c, ECHO_REPLY, None, br),
             (c, far, ECHO_REQUEST, br, up), (far, c, ECHO_REPLY, up, br),
             (far, c, ECHO_REQUEST, up, br), (c, far, ECHO_REPLY, br, up)]
    out: Counter[tuple[str, str, int, int, int]] = Counter()
    for src, dst, kind, inside, outside in paths:
        if inside is not None:
            out[(src, dst, kind, inside, 0)] = PINGS
        if outside is not None and direction == "both":
            out[(src, dst, kind, outside, 1)] = PINGS
    return out


@pytest.mark.parametrize(("direction", "hook"), [("ingress", "auto"), ("both", "tc"), ("both", "xdp")])
def test_docker_like_host_counts_every_packet_once(tmp_path: Path, direction: str, hook: str) -> None:
    with docker_host() as d, nfcapd_in(d.h, tmp_path, NFCAPD_PORT) as nfcapd:
        with pyflow_in(d.h, "--interface", "all", "--direction", direction, "--hook", hook,
                       "--target", f"127.0.0.1:{NFCAPD_PORT}/ipfix", "--inactive-flow-timeout", "1s") as flow:
            flow.wait_for_line(f"metering {d.br}")
            d.ping(d.c, d.host_v4)
            d.ping(d.c, d.far_v4)
            d.ping(d.u, d.cont_v4)
            want = expected(d, direction)
            assert flow.stop() == 0, flow.output()
        log = flow.output()
    assert "Sequence Errors: 0" in nfcapd.summary(), nfcapd.proc.output()
    assert f"metering {d.port}" not in log, log
    assert icmp_counts(nfcapd.flowdir) == want, log
    assert "Traceback" not in log and "already has an XDP program" not in log, log


def test_a_port_leaving_and_rejoining_the_bridge(tmp_path: Path) -> None:
    """Released, the port carries the container's packets into IP itself: metered; enslaved again:
    let go, and the bridge alone counts them."""
    with docker_host() as d, nfcapd_in(d.h, tmp_path, NFCAPD_PORT) as nfcapd:
        with pyflow_in(d.h, "--interface", "all", "--target", f"127.0.0.1:{NFCAPD_PORT}/ipfix",
                       "--inactive-flow-timeout", "1s") as flow:
            flow.wait_for_line(f"metering {d.br}")
            ip("-n", d.h, "link", "set", d.port, "nomaster")
            flow.wait_for_line(f"metering {d.port}", timeout=10)
            ip("-n", d.h, "addr", "add", "10.87.0.1/24", "dev", d.port)
            ip("-n", d.c, "addr", "add", "10.87.0.2/24", "dev", d.cif)
            res = d.run(d.c, "ping", "-q", "-n", "-c", str(PINGS), "-i", "0.01", "-W", "2", "10.87.0.1")
            assert f"{PINGS} received" in res.stdout, res.stdout
            t0 = time.monotonic()
            ip("-n", d.h, "addr", "flush", "dev", d.port)
            ip("-n", d.h, "link", "set", d.port, "master", d.br)
            flow.wait_for_line(f"{d.port} (ifindex", timeout=10)
            flow.wait_for_line(f"no longer metered (port of {d.br})", timeout=10)
            d.ping(d.c, d.host_v4)
            assert time.monotonic() - t0 < 30
            port, br = d.ifindex(d.port), d.ifindex(d.br)
            assert flow.stop() == 0, flow.output()
        log = flow.output()
    out = subprocess.run(["nfdump", "-R", str(nfcapd.flowdir), "-q", "-N", "-o", "fmt:%sa|%da|%pkt|%in"],
                         capture_output=True, text=True, check=True).stdout
    rows = [[c.strip() for c in ln.split("|")] for ln in out.splitlines() if ln.count("|") == 3]
    got = Counter()
    for sa, da, pkts, iif in rows:
        if sa.startswith("10.8"):
            got[(sa, da, int(iif))] += int(pkts)
    assert got[("10.87.0.2", "10.87.0.1", port)] == PINGS, (got, log)
    assert got[("10.88.0.2", "10.88.0.1", br)] == PINGS, (got, log)
    assert got[("10.88.0.2", "10.88.0.1", port)] == 0, (got, log)


# -- a trunk: VLAN ids that are true at TC and XDP -------------------------------------------

TRUNK_PORT = 20612
TRUNK = [((10, 0), 3), ((11, 0), 4), ((100, 7), 5), ((0, 0), 2)]  # (outer, inner) tags -> frames


def trunk_frames(pair: Pair) -> list[bytes]:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Dot1AD, Dot1Q, Ether

    out = []
    for (outer, inner), n in TRUNK:
        pkt = Ether(src=pair.macs["a"], dst=pair.macs["b"])
        if inner:
            pkt = pkt / Dot1AD(vlan=outer) / Dot1Q(vlan=inner)
        elif outer:
            pkt = pkt / Dot1Q(vlan=outer)
        out += [bytes(pkt / IP(src="10.30.0.1", dst="10.30.0.2") / UDP(sport=5000, dport=6000) / (b"t" * 40))] * n
    return out


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_trunk_same_five_tuple_on_each_vlan_is_its_own_flow(pair: Pair, tmp_path: Path, hook: str) -> None:
    """Tagged frames into a metered veth: the receive path moves the outer tag into the skb before TC
    (XDP still sees it in the frame). Each (outer, inner) pair is one flow with its own packets, and
    IPFIX carries the ids as vlanId and dot1qCustomerVlanId (as tshark decodes them)."""
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    pcap = tmp_path / "export.pcap"
    frames = tmp_path / "trunk.pcap"
    wrpcap(str(frames), [Ether(f) for f in trunk_frames(pair)])
    with tshark_capture_in(pair.b, pcap, [TRUNK_PORT]) as capture:
        with pyflow_in(pair.b, "--interface", pair.b_if, "--hook", hook, "--ipfix", "inner-vlan-id=yes",
                       "--target", f"127.0.0.1:{TRUNK_PORT}/ipfix") as flow:
            flow.wait_for_line(f"metering {pair.b_if}")
            res = pair.run(pair.a, sys.executable, "-m", "tests.integration.sendpkts", pair.a_if, str(frames),
                           cwd=str(REPO), timeout=60)
            assert res.returncode == 0, res.stderr
            assert flow.stop() == 0, flow.output()
        capture.wait_captured(2)
    fields = ["cflow.srcaddr", "cflow.vlanid", "cflow.dot1q_customer_vlan_id", "cflow.packets"]
    got: Counter[tuple[int, int]] = Counter()
    for row in tshark_cflow(pcap, [TRUNK_PORT], fields):
        cols = [c.split(";") if c else [] for c in row]
        for src, outer, inner, packets in zip(*cols, strict=True):
            if src == "10.30.0.1":
                got[(int(outer), int(inner))] += int(packets)
    assert got == Counter(dict(TRUNK)), flow.output()


# -- links this kernel may lack: VLAN devices, bonds, macvlan --------------------------------


def _needs(kind: str, module: str) -> None:
    probe = f"pfprobe{os.getpid() % 100000}"
    ip("netns", "add", probe)
    try:
        args = {"vlan": ["link", "add", "link", "lo", "name", "v0", "type", "vlan", "id", "5"],
                "bond": ["link", "add", "b0", "type", "bond"],
                "macvlan": ["link", "add", "mv0", "link", "lo", "type", "macvlan"]}[kind]
        if ip("-n", probe, *args, check=False).returncode != 0:
            pytest.skip(f"this kernel cannot make a {kind} device (no {module} module here): the test runs in "
                        "the Vagrant VM (`make vm-test`)")
    finally:
        ip("netns", "del", probe, check=False)


@pytest.mark.parametrize(("kind", "module"), [("vlan", "8021q"), ("bond", "bonding"), ("macvlan", "macvlan")])
def test_stacked_device_and_its_lower_count_once(pair: Pair, tmp_path: Path, kind: str, module: str) -> None:
    """A VLAN device on the veth (frames tagged 42), a bond enslaving it, or a macvlan on it: with
    interfaces=all the packets to the stacked device's address are counted once."""
    _needs(kind, module)
    b, dev = pair.b, "pfstk0"
    if kind == "vlan":
        ip("-n", b, "link", "add", "link", pair.b_if, "name", dev, "type", "vlan", "id", "42")
        ip("-n", pair.a, "link", "add", "link", pair.a_if, "name", dev, "type", "vlan", "id", "42")
        ip("-n", pair.a, "addr", "add", "10.42.0.1/24", "dev", dev)
        ip("-n", pair.a, "link", "set", dev, "up")
    elif kind == "bond":
        ip("-n", b, "link", "add", dev, "type", "bond")
        ip("-n", b, "link", "set", pair.b_if, "down")
        ip("-n", b, "link", "set", pair.b_if, "master", dev)
        ip("-n", pair.a, "addr", "add", "10.42.0.1/24", "dev", pair.a_if)
    else:
        ip("-n", b, "link", "add", dev, "link", pair.b_if, "type", "macvlan", "mode", "bridge")
        ip("-n", pair.a, "addr", "add", "10.42.0.1/24", "dev", pair.a_if)
    ip("-n", b, "addr", "add", "10.42.0.2/24", "dev", dev)
    ip("-n", b, "link", "set", dev, "up")
    ip("-n", b, "link", "set", pair.b_if, "up")
    with nfcapd_in(b, tmp_path, NFCAPD_PORT) as nfcapd, \
            pyflow_in(b, "--interface", "all", "--target", f"127.0.0.1:{NFCAPD_PORT}/ipfix") as flow:
        res = pair.run(pair.a, "ping", "-q", "-n", "-c", str(PINGS), "-i", "0.01", "-W", "2", "10.42.0.2")
        assert f"{PINGS} received" in res.stdout, res.stdout + res.stderr
        assert flow.stop() == 0, flow.output()
    out = subprocess.run(["nfdump", "-R", str(nfcapd.flowdir), "-q", "-N", "-o", "fmt:%sa|%da|%pkt"],
                         capture_output=True, text=True, check=True).stdout
    got = sum(int(c[2]) for c in (ln.split("|") for ln in out.splitlines() if ln.count("|") == 2)
              if c[0].strip() == "10.42.0.1" and c[2].strip().isdigit())
    assert got == PINGS, (out, flow.output())


# -- a tunnel and its underlay: inner and outer packets, each counted once ---------------------


def test_ipip_tunnel_and_its_underlay_see_inner_and_outer_packets(pair: Pair, tmp_path: Path) -> None:
    """An IPIP tunnel over the veth (an L3 link: its packets start with the IP header): with
    interfaces=all the tunnel counts the inner ICMP packets, the veth the outer IPIP ones (protocol 4),
    each exactly once."""
    for ns, local, remote, inner in ((pair.a, pair.a_v4, pair.b_v4, "10.50.0.1"),
                                     (pair.b, pair.b_v4, pair.a_v4, "10.50.0.2")):
        if ip("-n", ns, "link", "add", "pfip0", "type", "ipip", "local", local, "remote", remote,
              check=False).returncode != 0:
            pytest.skip("this kernel cannot make an ipip device (no ipip module)")
        ip("-n", ns, "addr", "add", f"{inner}/30", "dev", "pfip0")
        ip("-n", ns, "link", "set", "pfip0", "up")
    with nfcapd_in(pair.b, tmp_path, NFCAPD_PORT) as nfcapd, \
            pyflow_in(pair.b, "--interface", "all", "--target", f"127.0.0.1:{NFCAPD_PORT}/ipfix") as flow:
        flow.wait_for_line("metering pfip0")
        tunnel = int(json.loads(ip("-n", pair.b, "-j", "link", "show", "pfip0").stdout)[0]["ifindex"])
        veth = int(json.loads(ip("-n", pair.b, "-j", "link", "show", pair.b_if).stdout)[0]["ifindex"])
        res = pair.run(pair.a, "ping", "-q", "-n", "-c", str(PINGS), "-i", "0.01", "-W", "2", "10.50.0.2")
        assert f"{PINGS} received" in res.stdout, res.stdout + res.stderr
        assert flow.stop() == 0, flow.output()
    out = subprocess.run(["nfdump", "-R", str(nfcapd.flowdir), "-q", "-N", "-o", "fmt:%sa|%da|%pr|%pkt|%in"],
                         capture_output=True, text=True, check=True).stdout
    got: Counter[tuple[str, str, str, int]] = Counter()
    for cells in (ln.split("|") for ln in out.splitlines() if ln.count("|") == 4):
        sa, da, pr, pkts, iif = (c.strip() for c in cells)
        if pkts.isdigit():
            got[(sa, da, pr, int(iif))] += int(pkts)
    assert got[("10.50.0.1", "10.50.0.2", "ICMP", tunnel)] == PINGS, (out, flow.output())
    assert got[(pair.a_v4, pair.b_v4, "IPIP", veth)] == PINGS, (out, flow.output())
    assert "no Ethernet header" in flow.output()


def test_tun_device_packets_are_ip_from_the_first_byte(pair: Pair, tmp_path: Path) -> None:
    """A tun device (an L3 link, like WireGuard): what arrives on it is metered as IP, with no
    Ethernet header to skip, IPv4 and IPv6, every packet once."""
    b, tun = pair.b, "pftun0"
    ip("-n", b, "tuntap", "add", "mode", "tun", "name", tun)
    ip("-n", b, "addr", "add", "10.51.0.1/24", "dev", tun)
    ip("-n", b, "addr", "add", "fd51::1/64", "dev", tun, "nodad")
    ip("-n", b, "link", "set", tun, "up")
    with nfcapd_in(b, tmp_path, NFCAPD_PORT) as nfcapd, \
            pyflow_in(b, "--interface", "all", "--target", f"127.0.0.1:{NFCAPD_PORT}/ipfix") as flow:
        flow.wait_for_line(f"metering {tun}")
        res = pair.run(b, sys.executable, "-m", "tests.integration.tunwrite", tun, str(PINGS), cwd=str(REPO),
                       timeout=60)
        assert res.returncode == 0, res.stderr
        assert flow.stop() == 0, flow.output()
    out = subprocess.run(["nfdump", "-R", str(nfcapd.flowdir), "-q", "-N", "-o", "fmt:%sa|%da|%pkt|%byt"],
                         capture_output=True, text=True, check=True).stdout
    got = {}
    for cells in (ln.split("|") for ln in out.splitlines() if ln.count("|") == 3):
        sa, _da, pkts, byt = (c.strip() for c in cells)
        if sa in ("10.51.0.2", "fd51::2") and pkts.isdigit():
            got[sa] = (int(pkts), int(byt))
    assert got == {"10.51.0.2": (PINGS, PINGS * 60), "fd51::2": (PINGS, PINGS * 80)}, (out, flow.output())
    assert f"{tun}: no Ethernet header" in flow.output()
