"""The routing table as numpy arrays, and a watcher that keeps it current.

``RouteTable`` is an immutable snapshot of one network namespace's routes,
read with pyroute2:

* the **main table** (254), IPv4 and IPv6: unicast routes and the routes
  that drop (blackhole, unreachable, prohibit) -- they still say how long
  the matching prefix is.  The same prefix more than once (IPv6 ``fe80::/64``
  on every interface, or several metrics): the lowest metric wins, then the
  first in the kernel's order.  Multipath routes: the first nexthop.  An IPv4
  route through an IPv6 gateway (``via inet6``): its interface, no gateway.
  Routes through nexthop objects (``nhid``) carry their gateway and interface
  as long as ``net.ipv4.nexthop_compat_mode`` is 1 (the default).
* the **local table** (255) only for which addresses are the host's own
  (local, broadcast and anycast routes): traffic to them is not forwarded.
* the forwarding switches (``net.ipv4.ip_forward``,
  ``net.ipv6.conf.all.forwarding``): a host that does not forward has no
  out-interface for traffic that is not its own.

Policy routing (``ip rule``, other tables, VRFs) is not followed: lookups
answer what the main table says.

``RouteTable.lookup`` is a vectorised longest-prefix match (``PrefixTable``):
prefix length, gateway and out-interface for a whole batch of addresses.  No
route: length 0, no gateway, interface 0; the default route also has length 0
(what NetFlow's masks want) but its gateway and interface.

``RouteWatcher`` follows the table: it listens to rtnetlink's route (and
netconf, for the forwarding switches) notifications in a daemon thread,
waits until they have been quiet for ``debounce`` seconds (at most
``max_delay``), then dumps the table again and swaps the new snapshot in
with one reference assignment: readers get the old table or the new one,
never a half-built one.  The notifications are read with pyroute2's
select-compatible socket (pyflow/host/rtevents.py: only "something changed"
matters; the dump that follows is pyroute2's too), so that ``select()`` can
wait on it and on a wake-up pipe, and ``close()`` stops the thread at once.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyflow.host._netns import Netns, WakePipe, stop_reader, wait_until
from pyflow.host.lpm import AddrKeys, PrefixTable
from pyflow.host.rtevents import RtnlEvents
from pyflow.records import addr_to_16

log = logging.getLogger(__name__)

RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255
RTN_UNICAST, RTN_LOCAL, RTN_BROADCAST, RTN_ANYCAST, RTN_MULTICAST = 1, 2, 3, 4, 5
RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT = 6, 7, 8
ROUTED_TYPES = frozenset({RTN_UNICAST, RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT})
LOCAL_TYPES = frozenset({RTN_LOCAL, RTN_BROADCAST, RTN_ANYCAST})
RTM_F_CLONED = 0x200

RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_ROUTE = 0x400
RTNLGRP_IPV4_NETCONF = 24
RTNLGRP_IPV6_NETCONF = 25
WATCH_GROUPS = (RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | (1 << (RTNLGRP_IPV4_NETCONF - 1))
                | (1 << (RTNLGRP_IPV6_NETCONF - 1)))

ZERO16 = bytes(16)
AF_TO_VERSION: dict[int, int] = {int(socket.AF_INET): 4, int(socket.AF_INET6): 6}
FORWARDING_SYSCTLS = {4: "/proc/sys/net/ipv4/ip_forward", 6: "/proc/sys/net/ipv6/conf/all/forwarding"}


@dataclass(frozen=True)
class Route:
    """One route: destination prefix (16 bytes, IPv4 v4-mapped) and where it goes."""

    version: int
    dst: bytes
    prefix_len: int
    gateway: bytes = ZERO16  # 16 bytes like ``dst``; all zero = directly connected / none
    oif: int = 0
    table: int = RT_TABLE_MAIN
    type: int = RTN_UNICAST
    metric: int = 0


def route_from_msg(msg: Any) -> Route | None:
    """A pyroute2 route message as a ``Route`` (None: a family or kind this table does not keep)."""
    version = AF_TO_VERSION.get(int(msg["family"]))
    if version is None or int(msg["flags"]) & RTM_F_CLONED:
        return None
    table = msg.get_attr("RTA_TABLE")
    table = int(table) if table is not None else int(msg["table"])
    plen = int(msg["dst_len"])
    dst = msg.get_attr("RTA_DST")
    dst16 = addr_to_16(dst) if dst else addr_to_16("0.0.0.0" if version == 4 else "::")
    gateway = msg.get_attr("RTA_GATEWAY")
    oif = msg.get_attr("RTA_OIF")
    multipath = msg.get_attr("RTA_MULTIPATH")
    if multipath:  # the first nexthop
        first = multipath[0]
        gateway = first.get_attr("RTA_GATEWAY")
        oif = first["oif"]
    # (an IPv4 route through an IPv6 gateway has RTA_VIA instead: no gateway here)
    gw16 = addr_to_16(gateway) if gateway else ZERO16
    metric = msg.get_attr("RTA_PRIORITY")
    return Route(version=version, dst=dst16, prefix_len=plen, gateway=gw16, oif=int(oif or 0), table=table,
                 type=int(msg["type"]), metric=int(metric or 0))


def read_forwarding() -> dict[int, bool]:
    """The forwarding switches of the calling thread's network namespace (absent: off)."""
    out = {}
    for version, path in FORWARDING_SYSCTLS.items():
        try:
            with open(path) as f:
                out[version] = f.read().strip() not in ("", "0")
        except OSError:
            out[version] = False
    return out


def dump_routes() -> list[Route]:
    """Every route of the calling thread's network namespace (all tables, IPv4 and IPv6)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        routes = [route_from_msg(m) for m in ipr.route("dump")]
    return [r for r in routes if r is not None]


def _prefix_table(routes: list[Route]) -> PrefixTable:
    if not routes:
        return PrefixTable(np.zeros((0, 16), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64))
    addrs = np.frombuffer(b"".join(r.dst for r in routes), dtype=np.uint8).reshape(-1, 16)
    return PrefixTable(addrs, np.array([r.prefix_len for r in routes]), np.array([r.version for r in routes]))


class RouteTable:
    """An immutable snapshot of the routes: main table for lookups, local table for the host's own addresses."""

    def __init__(self, routes: Iterable[Route], forwarding: dict[int, bool] | None = None) -> None:
        all_routes = list(routes)
        main = [r for r in all_routes if r.table == RT_TABLE_MAIN and r.type in ROUTED_TYPES]
        # the preferred route of a prefix first: PrefixTable keeps the first of equal prefixes
        main.sort(key=lambda r: r.metric)
        self.routes: tuple[Route, ...] = tuple(main)
        self.local_routes: tuple[Route, ...] = tuple(
            r for r in all_routes if r.table == RT_TABLE_LOCAL and r.type in LOCAL_TYPES)
        self.forwarding: dict[int, bool] = dict(forwarding) if forwarding is not None else {4: True, 6: True}
        self._prefixes = _prefix_table(main)
        self._local = _prefix_table(list(self.local_routes))
        self._gateway = np.frombuffer(b"".join(r.gateway for r in main) or b"", dtype="V16").copy()
        self._oif = np.array([r.oif for r in main], dtype=np.uint32)

    @classmethod
    def load(cls) -> RouteTable:
        """The calling thread's network namespace's routes and forwarding switches, now."""
        return cls(dump_routes(), read_forwarding())

    def __len__(self) -> int:
        return len(self.routes)

    def lookup(self, addrs: np.ndarray | AddrKeys,
               ip_version: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(prefix_len u1, gateway V16, oif u4)`` of the main-table route to each address.

        ``addrs``: 16-byte addresses (IPv4 v4-mapped) with their ``ip_version``, or ``AddrKeys``.
        """
        idx, plen = self._prefixes.lookup(addrs, ip_version)
        hit = idx >= 0
        gateway = np.zeros(len(idx), dtype="V16")
        oif = np.zeros(len(idx), dtype=np.uint32)
        if hit.any():
            gateway[hit] = self._gateway[idx[hit]]
            oif[hit] = self._oif[idx[hit]]
        return plen, gateway, oif

    def mask(self, addrs: np.ndarray | AddrKeys, ip_version: np.ndarray | None = None) -> np.ndarray:
        """Prefix length (u1) of the main-table route to each address (0: none, or the default route)."""
        return self._prefixes.lookup(addrs, ip_version)[1]

    def route_index(self, addrs: np.ndarray | AddrKeys, ip_version: np.ndarray | None = None) -> np.ndarray:
        """Index into ``routes`` of the route to each address, -1 for none."""
        return self._prefixes.lookup(addrs, ip_version)[0]

    def is_local(self, addrs: np.ndarray | AddrKeys, ip_version: np.ndarray | None = None) -> np.ndarray:
        """Is each address one of the host's own (local, broadcast or anycast in the local table)?"""
        return self._local.lookup(addrs, ip_version)[0] >= 0

    def is_forwarding(self, ip_version: np.ndarray) -> np.ndarray:
        """Does the host forward packets of each record's IP version?"""
        ver = np.asarray(ip_version)
        return ((ver == 4) & self.forwarding.get(4, False)) | ((ver == 6) & self.forwarding.get(6, False))


class RouteWatcher:
    """The current ``RouteTable`` of the network namespace of the thread that creates the watcher.

    ``table`` is always a complete snapshot; ``generation`` counts the
    snapshots taken (1 after construction).  ``wait(predicate, timeout)``
    blocks until a snapshot satisfies ``predicate``.  ``close()`` (or leaving
    the ``with`` block) stops the thread within milliseconds.
    """

    def __init__(self, debounce: float = 0.1, max_delay: float = 1.0, retry: float = 1.0,
                 loader: Callable[[], RouteTable] = RouteTable.load) -> None:
        self.debounce = debounce
        self.max_delay = max_delay
        self.retry = retry
        self.errors = 0
        self.last_error: str | None = None
        self._loader = loader
        self._netns = Netns()
        self._cv = threading.Condition()
        self._closed = False
        # subscribe before the first dump: a change between the two is seen
        try:
            self._events = RtnlEvents(WATCH_GROUPS, rcvbuf=1 << 20)
        except BaseException:
            self._netns.close()
            raise
        try:
            self._table = loader()
        except BaseException:
            self._events.close()
            self._netns.close()
            raise
        self.generation = 1
        self._wake = WakePipe()
        self._thread = threading.Thread(target=self._run, name="pyflow-routes", daemon=True)
        self._thread.start()

    @property
    def table(self) -> RouteTable:
        return self._table

    def lookup(self, addrs: np.ndarray | AddrKeys,
               ip_version: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._table.lookup(addrs, ip_version)

    def wait(self, predicate: Callable[[RouteTable], bool], timeout: float) -> bool:
        """Until ``predicate(table)`` holds (True) or ``timeout`` seconds pass (False)."""
        return wait_until(self._cv, lambda: predicate(self._table), lambda: self._closed, timeout)

    def refresh(self) -> RouteTable:
        """Dump the table now (in the watcher's namespace) and swap it in."""
        table = self._netns.run(self._loader)
        self._swap(table)
        return table

    def _swap(self, table: RouteTable) -> None:
        with self._cv:
            self._table = table
            self.generation += 1
            self._cv.notify_all()

    def _drain(self) -> bool:
        """Read every queued notification; True if there was any (an overflow counts: ENOBUFS says
        notifications were lost, so the table changed: dump it)."""
        got = self._events.drain(10_000)
        if got.error is not None:
            self.errors += 1
            self.last_error = f"route notifications: {got.error}"
        return bool(got.reads) or got.lost or got.error is not None

    def _run(self) -> None:
        try:
            self._netns.enter()
        except OSError as exc:
            self.errors += 1
            self.last_error = str(exc)
            log.warning("route watcher: %s", exc)
            return
        dirty = False
        while not self._closed:
            ready, _, _ = select.select([self._events.fileno(), self._wake.fd], [], [], self.retry if dirty else None)
            if self._wake.fd in ready or self._closed:
                break
            if self._events.fileno() in ready and self._drain():
                dirty = True
                # coalesce: wait until it has been quiet for `debounce`, but no longer than `max_delay`
                first = time.monotonic()
                while not self._closed:
                    left = min(self.debounce, first + self.max_delay - time.monotonic())
                    if left <= 0:
                        break
                    ready, _, _ = select.select([self._events.fileno(), self._wake.fd], [], [], left)
                    if self._wake.fd in ready:
                        return
                    if not ready or not self._drain():
                        break
            if not dirty or self._closed:
                continue
            try:
                table = self._loader()
            except Exception as exc:  # keep the last good table, try again after `retry`
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("route watcher: dumping the routing table failed: %s", self.last_error)
                continue
            dirty = False
            self._swap(table)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        stop_reader(self._thread, self._wake, self._cv)
        self._events.close()
        self._netns.close()

    def __enter__(self) -> RouteWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
