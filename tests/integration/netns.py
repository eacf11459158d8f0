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
