"""Test hosts: network namespaces joined by veth pairs, always removed afterwards."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that has entered ``ns`` (sockets it makes live there)."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns({ns}) failed")
            result.append(fn())
        except BaseException as exc:
            error.append(exc)
        finally:
            os.close(fd)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def udp_socket_in(ns: str, host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET

    def make() -> socket.socket:
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((host, port))
        return s

    return in_netns(ns, make)


@dataclass
class Pair:
    """Two hosts ``a`` and ``b`` on one link: a_if in a, b_if in b."""

    a: str
    b: str
    a_if: str
    b_if: str
    a_v4: str = "10.199.0.1"
    b_v4: str = "10.199.0.2"
    a_v6: str = "fd00:199::1"
    b_v6: str = "fd00:199::2"
    macs: dict[str, str] = field(default_factory=dict)

    def run(self, ns: str, *cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]

    def mac(self, ns: str, ifname: str) -> str:
        out = ip("-n", ns, "-j", "link", "show", ifname).stdout
        return str(json.loads(out)[0]["address"])


@contextmanager
def veth_pair(tag: str) -> Iterator[Pair]:
    """Namespaces pf<tag>a / pf<tag>b, veth between them, addresses, lo up. Removed on exit."""
    uid = f"{tag}{os.getpid() % 100000}"
    pair = Pair(a=f"pf{uid}a", b=f"pf{uid}b", a_if=f"pa{uid}"[:15], b_if=f"pb{uid}"[:15])
    try:
        for ns in (pair.a, pair.b):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            # no DAD, router solicitations or (below: multicast off) MLD reports of the
            # hosts' own making: every metered packet is one a test sent, or a reply
            pair.run(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                     "net.ipv6.conf.all.router_solicitations=0", "net.ipv6.conf.default.router_solicitations=0")
        ip("link", "add", pair.a_if, "netns", pair.a, "type", "veth", "peer", "name", pair.b_if, "netns", pair.b)
        ip("-n", pair.a, "addr", "add", f"{pair.a_v4}/24", "dev", pair.a_if)
        ip("-n", pair.b, "addr", "add", f"{pair.b_v4}/24", "dev", pair.b_if)
        ip("-n", pair.a, "addr", "add", f"{pair.a_v6}/64", "dev", pair.a_if, "nodad")
        ip("-n", pair.b, "addr", "add", f"{pair.b_v6}/64", "dev", pair.b_if, "nodad")
        ip("-n", pair.a, "link", "set", pair.a_if, "multicast", "off", "up")
        ip("-n", pair.b, "link", "set", pair.b_if, "multicast", "off", "up")
        pair.macs = {"a": pair.mac(pair.a, pair.a_if), "b": pair.mac(pair.b, pair.b_if)}
        # Static neighbours: no ARP or neighbour discovery traffic of the hosts' own
        # making, so every metered IP flow is one the test sent (or a reply to it).
        for ns, dev, peer, v4, v6 in ((pair.a, pair.a_if, "b", pair.b_v4, pair.b_v6),
                                      (pair.b, pair.b_if, "a", pair.a_v4, pair.a_v6)):
            for addr in (v4, v6):
                ip("-n", ns, "neigh", "replace", addr, "lladdr", pair.macs[peer], "dev", dev, "nud", "permanent")
        yield pair
    finally:
        for ns in (pair.a, pair.b):
            ip("netns", "del", ns, check=False)


@dataclass
class Routed:
    """Client c -- router r -- server s: r forwards between c_link (r_c) and s_link (r_s).

    The server also owns a /32 (/128) on its loopback, 203.0.113.10 and
    2001:db8:201::10, that the router reaches through a route via the server's
    link address: traffic to it has a gateway; traffic to the server's link
    address is directly connected.
    """

    c: str
    r: str
    s: str
    c_if: str
    r_c: str
    r_s: str
    s_if: str
    c_v4: str = "10.201.1.2"
    r_c_v4: str = "10.201.1.1"
    r_s_v4: str = "10.201.2.1"
    s_v4: str = "10.201.2.2"
    c_v6: str = "fd01:201:1::2"
    r_c_v6: str = "fd01:201:1::1"
    r_s_v6: str = "fd01:201:2::1"
    s_v6: str = "fd01:201:2::2"
    far_v4: str = "203.0.113.10"
    far_v6: str = "2001:db8:201::10"

    def run(self, ns: str, *cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]

    def ifindex(self, ns: str, ifname: str) -> int:
        return int(json.loads(ip("-n", ns, "-j", "link", "show", ifname).stdout)[0]["ifindex"])


@contextmanager
def routed_hosts(tag: str) -> Iterator[Routed]:
    """Three namespaces, two veth links, static neighbours, forwarding in r. Removed on exit."""
    uid = f"{tag}{os.getpid() % 100000}"
    t = Routed(c=f"pf{uid}c", r=f"pf{uid}r", s=f"pf{uid}s", c_if=f"pc{uid}"[:15], r_c=f"prc{uid}"[:15],
               r_s=f"prs{uid}"[:15], s_if=f"ps{uid}"[:15])
    try:
        for ns in (t.c, t.r, t.s):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            t.run(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                  "net.ipv6.conf.all.router_solicitations=0", "net.ipv6.conf.default.router_solicitations=0")
        t.run(t.r, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", check=True)
        links = ((t.c, t.c_if, t.c_v4, t.c_v6, t.r, t.r_c, t.r_c_v4, t.r_c_v6),
                 (t.s, t.s_if, t.s_v4, t.s_v6, t.r, t.r_s, t.r_s_v4, t.r_s_v6))
        for ns1, if1, v4a, v6a, ns2, if2, v4b, v6b in links:
            ip("link", "add", if1, "netns", ns1, "type", "veth", "peer", "name", if2, "netns", ns2)
            for ns, dev, v4, v6 in ((ns1, if1, v4a, v6a), (ns2, if2, v4b, v6b)):
                ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
                ip("-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
                ip("-n", ns, "link", "set", dev, "multicast", "off", "up")
            mac1 = json.loads(ip("-n", ns1, "-j", "link", "show", if1).stdout)[0]["address"]
            mac2 = json.loads(ip("-n", ns2, "-j", "link", "show", if2).stdout)[0]["address"]
            for ns, dev, addrs, mac in ((ns1, if1, (v4b, v6b), mac2), (ns2, if2, (v4a, v6a), mac1)):
                for addr in addrs:
                    ip("-n", ns, "neigh", "replace", addr, "lladdr", mac, "dev", dev, "nud", "permanent")
        ip("-n", t.s, "addr", "add", f"{t.far_v4}/32", "dev", "lo")
        ip("-n", t.s, "addr", "add", f"{t.far_v6}/128", "dev", "lo", "nodad")
        ip("-n", t.c, "route", "add", "default", "via", t.r_c_v4)
        ip("-n", t.c, "-6", "route", "add", "default", "via", t.r_c_v6)
        ip("-n", t.s, "route", "add", "default", "via", t.r_s_v4)
        ip("-n", t.s, "-6", "route", "add", "default", "via", t.r_s_v6)
        ip("-n", t.r, "route", "add", "203.0.113.0/24", "via", t.s_v4)
        ip("-n", t.r, "-6", "route", "add", "2001:db8:201::/48", "via", t.s_v6)
        yield t
    finally:
        for ns in (t.c, t.r, t.s):
            ip("netns", "del", ns, check=False)
