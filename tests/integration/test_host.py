"""Host-derived fields against a real kernel, in network namespaces (root).

* routes: a namespace with a gateway route, a /24 inside a /16, a blackhole
  and IPv6; ``RouteTable`` must give the kernel's masks, gateways and
  interfaces; ``RouteWatcher`` must see a route added (and removed) later, and
  the forwarding switch.
* NAT: client -- router -- server, the router masquerading (nftables) on its
  server side into a port range, so that conntrack visibly picks new ports.
  UDP and TCP (IPv4) and UDP (IPv6) from client to server; ``NatTable`` in the
  router must map both directions of each to what the server saw, agree with
  ``conntrack -L`` and with pyroute2's own decoding of the dump; and
  ``NatEventListener`` must report a create (4) for each and, after a flush, a
  delete (5) with the same tuples.
* the enricher end to end on the router.

Every namespace is removed afterwards, also on failure (the helpers' ``finally``).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from pyflow.enrich import Enricher
from pyflow.host.conntrack import CtEntry, NatEvent, NatEventListener, NatTable, dump_conntrack
from pyflow.host.routes import RouteTable, RouteWatcher
from pyflow.records import addr_from_16, addr_to_16, empty
from tests.integration.netns import Pair, Routed, in_netns, ip, routed_hosts

WAIT = 10.0  # seconds: every wait below is on a condition, bounded by this


def q(*addrs: str) -> tuple[np.ndarray, np.ndarray]:
    ips = [ipaddress.ip_address(a) for a in addrs]
    return (np.array([addr_to_16(x) for x in ips], dtype="V16").reshape(-1),
            np.array([x.version for x in ips], dtype=np.uint8))


def ifindex(ns: str, dev: str) -> int:
    out = ip("-n", ns, "-o", "link", "show", dev).stdout
    return int(out.split(":", 1)[0])


def gw_str(gw: np.ndarray, ver: np.ndarray) -> list[str]:
    return [str(addr_from_16(bytes(g), int(v))) for g, v in zip(gw, ver, strict=True)]


# -- routes ------------------------------------------------------------------------------------------

def add_routes(p: Pair) -> None:
    ip("-n", p.a, "route", "add", "10.50.0.0/16", "via", p.b_v4)
    ip("-n", p.a, "route", "add", "10.50.1.0/24", "dev", p.a_if)
    ip("-n", p.a, "route", "add", "blackhole", "10.70.0.0/16")
    ip("-n", p.a, "-6", "route", "add", "2001:db8:50::/48", "via", p.b_v6)
    ip("-n", p.a, "route", "add", "10.80.0.0/16", "via", p.b_v4, "table", "1000")  # not the main table


def test_route_table(pair: Pair) -> None:
    add_routes(pair)
    t = in_netns(pair.a, RouteTable.load)
    dev = ifindex(pair.a, pair.a_if)
    addrs, ver = q("10.50.1.9", "10.50.2.9", "10.199.0.2", "10.70.1.1", "10.80.1.1", "8.8.8.8",
                   "2001:db8:50::1", "fd00:199::2", "2001:db8:51::1")
    plen, gw, oif = t.lookup(addrs, ver)
    assert plen.tolist() == [24, 16, 24, 16, 0, 0, 48, 64, 0]
    assert gw_str(gw, ver) == ["0.0.0.0", pair.b_v4, "0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0", pair.b_v6, "::",
                               "::"]
    assert oif.tolist() == [dev, dev, dev, 0, 0, 0, dev, dev, 0]
    own, own_ver = q(pair.a_v4, "10.199.0.255", pair.a_v6, "127.0.0.1", pair.b_v4)
    assert t.is_local(own, own_ver).tolist() == [True, True, True, True, False]
    # the kernel agrees on every route the table kept (`ip route get` per destination)
    for dst, want in (("10.50.1.9", None), ("10.50.2.9", pair.b_v4), ("2001:db8:50::1", pair.b_v6)):
        out = ip("-n", pair.a, "route", "get", dst).stdout
        assert (f"via {want} " in out) if want else (" via " not in out), out


def test_route_watcher_follows_changes(pair: Pair) -> None:
    add_routes(pair)
    watcher = in_netns(pair.a, RouteWatcher)
    try:
        addr, ver = q("10.60.1.1")

        def mask_is(n: int) -> Callable[[RouteTable], bool]:
            return lambda t: int(t.lookup(addr, ver)[0][0]) == n

        assert mask_is(0)(watcher.table)
        start = watcher.generation
        ip("-n", pair.a, "route", "add", "10.60.0.0/16", "via", pair.b_v4)
        assert watcher.wait(mask_is(16), WAIT), "the watcher did not see the new route"
        assert watcher.generation > start
        ip("-n", pair.a, "route", "add", "10.60.1.0/24", "via", pair.b_v4)
        ip("-n", pair.a, "route", "del", "10.60.0.0/16")
        assert watcher.wait(mask_is(24), WAIT)
        ip("-n", pair.a, "route", "del", "10.60.1.0/24")
        assert watcher.wait(mask_is(0), WAIT)
        # a burst of changes is coalesced into a few dumps, not one per route
        start = watcher.generation
        burst = "\n".join(f"route add 10.61.{i}.0/24 via {pair.b_v4}" for i in range(200))
        subprocess.run(["ip", "-n", pair.a, "-batch", "-"], input=burst, text=True, check=True)
        many, many_ver = q(*(f"10.61.{i}.1" for i in range(200)))
        assert watcher.wait(lambda t: bool((t.lookup(many, many_ver)[0] == 24).all()), WAIT)
        assert watcher.generation - start <= 10, watcher.generation - start
        # the forwarding switch comes by netconf notifications
        assert watcher.table.forwarding[4] is False
        pair.run(pair.a, "sysctl", "-qw", "net.ipv4.ip_forward=1", check=True)
        assert watcher.wait(lambda t: t.forwarding[4], WAIT)
        # asked from this thread (another namespace), it still reads its own
        assert len(watcher.refresh()) == len(in_netns(pair.a, RouteTable.load))
        assert watcher.errors == 0
    finally:
        t0 = time.monotonic()
        watcher.close()
        assert time.monotonic() - t0 < 1.0, "close() must stop the thread promptly"
    assert not watcher._thread.is_alive()


# -- NAT ---------------------------------------------------------------------------------------------

NFT_MASQUERADE = """\
table inet pyflow_test_nat {{
    chain post {{
        type nat hook postrouting priority srcnat;
        oifname "{dev}" meta l4proto {{ tcp, udp }} masquerade to :20000-20999
        oifname "{dev}" masquerade
    }}
}}
"""


@contextmanager
def nat_router(tag: str) -> Iterator[Routed]:
    """routed_hosts with masquerade on the router's server side (namespaces removed on exit)."""
    with routed_hosts(tag) as t:
        r = subprocess.run(["ip", "netns", "exec", t.r, "nft", "-f", "-"], input=NFT_MASQUERADE.format(dev=t.r_s),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        yield t


def sock_in(ns: str, family: int, kind: int) -> socket.socket:
    s = in_netns(ns, lambda: socket.socket(family, kind))
    s.settimeout(WAIT)
    return s


Conn = tuple[str, int, str, int, int]  # client addr, client port, server addr, server port, protocol


def udp_exchange(t: Routed, client: str, server: str, port: int) -> tuple[Conn, tuple[str, int], socket.socket]:
    """One datagram each way; returns the connection, what the server saw as its peer, and the client socket."""
    fam = socket.AF_INET6 if ":" in client else socket.AF_INET
    srv = sock_in(t.s, fam, socket.SOCK_DGRAM)
    cli = sock_in(t.c, fam, socket.SOCK_DGRAM)
    try:
        srv.bind((server, port))
        cli.bind((client, 0))
        cli.sendto(b"ping", (server, port))
        _, peer = srv.recvfrom(100)
        srv.sendto(b"pong", peer)
        assert cli.recvfrom(100)[0] == b"pong"
    finally:
        srv.close()
    return (client, cli.getsockname()[1], server, port, 17), (peer[0], peer[1]), cli


def tcp_exchange(t: Routed, port: int) -> tuple[Conn, tuple[str, int], list[socket.socket]]:
    srv = sock_in(t.s, socket.AF_INET, socket.SOCK_STREAM)
    cli = sock_in(t.c, socket.AF_INET, socket.SOCK_STREAM)
    srv.bind((t.s_v4, port))
    srv.listen(1)
    cli.bind((t.c_v4, 0))
    cli.connect((t.s_v4, port))
    conn, peer = srv.accept()
    conn.settimeout(WAIT)
    cli.sendall(b"hello")
    assert conn.recv(100) == b"hello"
    return (t.c_v4, cli.getsockname()[1], t.s_v4, port, 6), (peer[0], peer[1]), [srv, cli, conn]


def flow(src: str, sport: int, dst: str, dport: int, proto: int) -> np.ndarray:
    r = empty(1)
    r["src_addr"] = addr_to_16(src)
    r["dst_addr"] = addr_to_16(dst)
    r["src_port"] = sport
    r["dst_port"] = dport
    r["protocol"] = proto
    r["ip_version"] = ipaddress.ip_address(src).version
    return r


def post_nat(r: np.ndarray) -> tuple[str, int, str, int]:
    v = int(r["ip_version"])
    return (str(addr_from_16(bytes(r["nat_src_addr"]), v)), int(r["nat_src_port"]),
            str(addr_from_16(bytes(r["nat_dst_addr"]), v)), int(r["nat_dst_port"]))


def conntrack_tool(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, "conntrack", *args], capture_output=True, text=True)


def pyroute2_dump(ns: str) -> set[tuple[object, ...]]:
    """The conntrack table as pyroute2 decodes it (an independent reading of the same dump)."""
    def read() -> set[tuple[object, ...]]:
        from pyroute2 import Conntrack

        out: set[tuple[object, ...]] = set()
        with Conntrack(nfgen_family=socket.AF_UNSPEC) as c:
            for e in c.dump_entries():
                if e.tuple_orig.proto not in (6, 17):
                    continue
                o, r = e.tuple_orig, e.tuple_reply
                out.add((o.proto, o.saddr, o.daddr, o.sport, o.dport, r.saddr, r.daddr, r.sport, r.dport))
        return out
    return in_netns(ns, read)


def ours(entries: list[CtEntry]) -> set[tuple[object, ...]]:
    out: set[tuple[object, ...]] = set()
    for e in entries:
        if e.proto not in (6, 17):
            continue
        o, r, v = e.orig, e.reply, e.version
        out.add((e.proto, str(addr_from_16(o.src, v)), str(addr_from_16(o.dst, v)), o.sport, o.dport,
                 str(addr_from_16(r.src, v)), str(addr_from_16(r.dst, v)), r.sport, r.dport))
    return out


def test_nat_table_and_events() -> None:
    with nat_router("h") as t:
        listener = in_netns(t.r, NatEventListener)  # before the traffic: in "auto" event mode only later
        socks: list[socket.socket] = []            # connections get events
        try:
            assert listener.events_setting in (1, 2), f"nf_conntrack_events = {listener.events_setting}"
            udp, udp_peer, c1 = udp_exchange(t, t.c_v4, t.s_v4, 5555)
            tcp, tcp_peer, tcp_socks = tcp_exchange(t, 5556)
            udp6, udp6_peer, c2 = udp_exchange(t, t.c_v6, t.s_v6, 5557)
            socks += [c1, c2, *tcp_socks]
            # the server saw the router's server-side address and a port from the masquerade range
            for peer, router in ((udp_peer, t.r_s_v4), (tcp_peer, t.r_s_v4), (udp6_peer, t.r_s_v6)):
                assert peer[0] == router and 20000 <= peer[1] <= 20999, peer
            # something local and not translated: no event, no NAT entry
            local = sock_in(t.c, socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(local)
            local.sendto(b"x", (t.r_c_v4, 9))

            table = in_netns(t.r, NatTable)
            assert table.refresh() == 3
            batch = np.concatenate([
                flow(*udp), flow(udp[2], udp[3], udp_peer[0], udp_peer[1], 17),
                flow(*tcp), flow(tcp[2], tcp[3], tcp_peer[0], tcp_peer[1], 6),
                flow(*udp6), flow(udp6[2], udp6[3], udp6_peer[0], udp6_peer[1], 17),
                flow(t.c_v4, 1, t.s_v4, 2, 17),
            ])
            assert table.fill(batch) == 6
            for i, (conn, peer) in enumerate(((udp, udp_peer), (tcp, tcp_peer), (udp6, udp6_peer))):
                client, cport, server, sport, _ = conn
                # original direction: leaves from the router's address and the port the server saw
                assert post_nat(batch[2 * i]) == (peer[0], peer[1], server, sport)
                # reply direction: leaves from the server to the client, untranslated
                assert post_nat(batch[2 * i + 1]) == (server, sport, client, cport)
            assert post_nat(batch[6]) == ("0.0.0.0", 0, "0.0.0.0", 0)

            # the same dump read by pyroute2, and by the conntrack tool when installed
            entries = in_netns(t.r, dump_conntrack)
            assert ours(entries) == pyroute2_dump(t.r)
            if shutil.which("conntrack"):
                for (client, cport, server, sport, _), peer in ((udp, udp_peer), (tcp, tcp_peer), (udp6, udp6_peer)):
                    family = "ipv6" if ":" in client else "ipv4"
                    listing = conntrack_tool(t.r, "-L", "-f", family).stdout
                    line = next(ln for ln in listing.splitlines() if f"src={client} " in ln and f"sport={cport} " in ln)
                    assert f"src={server} dst={peer[0]} sport={sport} dport={peer[1]} " in line, line

            # events: a create for each connection ...
            def creates(ev: list[NatEvent]) -> bool:
                return sum(1 for e in ev if e.event == 4) >= 3
            assert listener.wait(creates, WAIT), f"NAT create events: {listener.pending()}"
            created = listener.drain()
            # ... and a delete for each when the table is flushed (the sockets stay open until the end:
            # a packet after the flush would make a new entry, and a create event, of its own)
            if shutil.which("conntrack"):
                assert conntrack_tool(t.r, "-F").returncode == 0
            else:
                def flush() -> None:
                    from pyroute2 import Conntrack

                    with Conntrack() as c:
                        c.flush()
                in_netns(t.r, flush)
            assert listener.wait(lambda ev: sum(1 for e in ev if e.event == 5) >= 3, WAIT)
            deleted = listener.drain()
            deleted = deleted[deleted["nat_event"] == 5]
            for events, code in ((created, 4), (deleted, 5)):
                assert set(events["nat_event"].tolist()) == {code}
                got = {(str(addr_from_16(bytes(r["src_addr"]), int(r["ip_version"]))), int(r["src_port"]),
                        str(addr_from_16(bytes(r["dst_addr"]), int(r["ip_version"]))), int(r["dst_port"]),
                        int(r["protocol"])): post_nat(r) for r in events}
                assert got == {udp: (udp_peer[0], udp_peer[1], udp[2], udp[3]),
                               tcp: (tcp_peer[0], tcp_peer[1], tcp[2], tcp[3]),
                               udp6: (udp6_peer[0], udp6_peer[1], udp6[2], udp6[3])}
                assert events["ip_version"].tolist().count(6) == 1
                assert (events["packets"] == 0).all() and (events["end_reason"] == 0).all()
                assert (events["start_ms"] == events["end_ms"]).all()
                now_ms = time.time() * 1000
                assert ((events["start_ms"] > now_ms - 120_000) & (events["start_ms"] <= now_ms + 1000)).all()
            assert listener.lost == 0 and listener.errors == 0
            assert listener.seen >= 7  # the local, untranslated entry was seen and left out
        finally:
            for s in socks:
                s.close()
            t0 = time.monotonic()
            listener.close()
            assert time.monotonic() - t0 < 1.0


# -- the enricher on a router ---------------------------------------------------------------------------

def test_enricher_on_router() -> None:
    with routed_hosts("e") as t:
        watcher = in_netns(t.r, RouteWatcher)
        try:
            r_s = ifindex(t.r, t.r_s)
            recs = np.concatenate([
                flow(t.c_v4, 1000, t.far_v4, 80, 6),  # through the route via the server
                flow(t.c_v4, 1000, t.s_v4, 80, 6),  # directly connected
                flow(t.c_v4, 1000, t.r_c_v4, 22, 6),  # to the router itself
                flow(t.c_v4, 1000, "224.0.0.5", 0, 17),  # multicast
                flow(t.c_v6, 1000, t.far_v6, 80, 6),
            ])
            Enricher(routes=watcher).enrich(recs)
            assert recs["src_mask"].tolist() == [24, 24, 24, 24, 64]
            assert recs["dst_mask"].tolist() == [24, 24, 24, 0, 48]
            assert recs["egress_ifindex"].tolist() == [r_s, r_s, 0, 0, r_s]
            assert [str(addr_from_16(bytes(x["next_hop"]), int(x["ip_version"]))) for x in recs] == [
                t.s_v4, "0.0.0.0", "0.0.0.0", "0.0.0.0", t.s_v6]
            assert recs["is_multicast"].tolist() == [0, 0, 0, 1, 0]
        finally:
            watcher.close()


def _our_namespaces() -> set[str]:
    mine = str(os.getpid() % 100000)
    return {ln.split()[0] for ln in ip("netns", "list").stdout.splitlines() if ln.strip() and mine in ln.split()[0]}


@pytest.fixture(autouse=True)
def _no_leftover_namespaces() -> Iterator[None]:
    before = _our_namespaces()
    yield
    assert _our_namespaces() <= before, f"namespaces left behind: {_our_namespaces() - before}"
