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
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.netns import ip
from tests.integration.procs import nfcapd_in, pyflow_in

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
