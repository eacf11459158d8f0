"""Fill a record batch's host-derived columns: masks, out-interface, next hop, multicast, AS, NAT.

The kernel meter sees packets; the host knows more about them.  ``Enricher``
fills, in place and vectorised over the whole batch, from whichever sources it
was given (``None``: those columns are left as they are):

**routes** (``RouteWatcher`` or a fixed ``RouteTable``), one snapshot per batch:

* ``src_mask`` / ``dst_mask``: prefix length of the main-table route to the
  source / destination (RouterOS src-address-mask / dst-address-mask; 0 when
  only the default route, or nothing, matches).
* ``egress_ifindex``, only where it is 0 (the kernel's own fib answer, when it
  gave one, stands): the route's interface, if the flow can have been
  forwarded -- the destination is not one of the host's own addresses (local,
  broadcast, anycast in the local table), not multicast, not IPv6 link-local,
  and the host forwards that IP version (``ip_forward`` /
  ``conf/all/forwarding``).  Traffic to the host itself has no out-interface.
* ``next_hop``, only where it is all zero: the route's gateway, for records
  that leave (``egress_ifindex`` != 0, after the rule above) through the
  route's own interface and whose destination is not local.  Directly
  connected destinations have no gateway and keep zero.

**is_multicast** (always, from the destination): the IPFIX isMulticast octet
(IE 206, RFC 5102): IPv4 224.0.0.0/4 -> 0x01 (bit 7, "MCv4"); IPv6 ff00::/8 ->
the address's scope in bits 0-3 (``scope << 4``) and its T flag in bit 4
(0x08); 0 otherwise.  (So ``ff00::`` -- scope 0, T 0 -- reads 0, as the IE
defines.)

**asn** (``AsTable``): ``src_as`` / ``dst_as``, 0 where no prefix matches.

**nat** (``NatTable``): ``nat_src_addr`` / ``nat_dst_addr`` / ``nat_src_port``
/ ``nat_dst_port`` from conntrack (see ``pyflow.host.conntrack`` for what
post-NAT means in each direction); the caller decides when to ``refresh()``
the table (a dump costs about 9 us per conntrack entry).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pyflow.host.asn import AsTable
from pyflow.host.conntrack import NatTable
from pyflow.host.lpm import AddrKeys, as_bytes16
from pyflow.host.routes import RouteTable, RouteWatcher

MC_V4 = 0x01


def is_multicast_octet(dst_addr: np.ndarray, ip_version: np.ndarray) -> np.ndarray:
    """The IPFIX isMulticast (IE 206) octet of each destination address."""
    b = as_bytes16(dst_addr)
    ver = np.asarray(ip_version)
    out = np.zeros(len(b), dtype=np.uint8)
    v4 = (ver == 4) & ((b[:, 12] & 0xF0) == 0xE0)
    out[v4] = MC_V4
    v6 = (ver == 6) & (b[:, 0] == 0xFF)
    flags_scope = b[v6, 1]
    out[v6] = ((flags_scope & 0x0F) << 4) | ((flags_scope & 0x10) >> 1)
    return out


def _is_multicast_addr(b16: np.ndarray, ver: np.ndarray) -> np.ndarray:
    return ((ver == 4) & ((b16[:, 12] & 0xF0) == 0xE0)) | ((ver == 6) & (b16[:, 0] == 0xFF))


def _is_v6_link_local(b16: np.ndarray, ver: np.ndarray) -> np.ndarray:
    return (ver == 6) & (b16[:, 0] == 0xFE) & ((b16[:, 1] & 0xC0) == 0x80)


@dataclass
class EnrichStats:
    batches: int = 0
    records: int = 0
    egress_filled: int = 0
    next_hop_filled: int = 0
    nat_matched: int = 0


class Enricher:
    """Fills the host-derived columns of record batches from the sources it holds (see the module doc)."""

    def __init__(self, routes: RouteWatcher | RouteTable | None = None, nat: NatTable | None = None,
                 asn: AsTable | None = None, multicast: bool = True) -> None:
        self.routes = routes
        self.nat = nat
        self.asn = asn
        self.multicast = multicast
        self.stats = EnrichStats()

    def enrich(self, records: np.ndarray) -> None:
        """Fill the columns in place."""
        n = len(records)
        self.stats.batches += 1
        self.stats.records += n
        if n == 0:
            return
        ver = records["ip_version"]
        dst = records["dst_addr"]
        dst16 = as_bytes16(dst)
        if self.multicast:
            records["is_multicast"] = is_multicast_octet(dst16, ver)
        if self.routes is not None or self.asn is not None:
            src_keys = AddrKeys.of(records["src_addr"], ver)
            dst_keys = AddrKeys.of(dst16, ver)
            if self.routes is not None:
                self._routes(records, ver, dst16, src_keys, dst_keys)
            if self.asn is not None:
                records["src_as"] = self.asn.lookup(src_keys)
                records["dst_as"] = self.asn.lookup(dst_keys)
        if self.nat is not None:
            self.stats.nat_matched += self.nat.fill(records)

    def _routes(self, records: np.ndarray, ver: np.ndarray, dst16: np.ndarray, src_keys: AddrKeys,
                dst_keys: AddrKeys) -> None:
        table = self.routes.table if isinstance(self.routes, RouteWatcher) else self.routes
        assert table is not None
        records["src_mask"] = table.mask(src_keys)
        plen, gateway, oif = table.lookup(dst_keys)
        records["dst_mask"] = plen
        local = table.is_local(dst_keys)
        egress = records["egress_ifindex"]
        forwarded = (~local & ~_is_multicast_addr(dst16, ver) & ~_is_v6_link_local(dst16, ver)
                     & table.is_forwarding(ver))
        fill = (egress == 0) & forwarded & (oif != 0)
        if fill.any():
            egress[fill] = oif[fill]
            self.stats.egress_filled += int(fill.sum())
        has_gw = as_bytes16(gateway).any(axis=1)
        if has_gw.any():
            no_nh = ~as_bytes16(records["next_hop"]).any(axis=1)
            nh = no_nh & has_gw & (egress != 0) & (egress == oif) & ~local
            if nh.any():
                records["next_hop"][nh] = gateway[nh]
                self.stats.next_hop_filled += int(nh.sum())
