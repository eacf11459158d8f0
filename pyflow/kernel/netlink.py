"""rtnetlink for the kernel layer, all through pyroute2: XDP and TC attachments and the link facts they need.

Every request opens its own ``IPRoute`` (extended acks on) in the calling
thread's network namespace and closes it again: the agent attaches rarely,
and a short-lived socket never holds stale state.  A failed request raises
``NetlinkError`` (an ``OSError``: ``errno`` and the kernel's extended-ack
message, e.g. "Device or resource busy (XDP program already attached)").

* XDP: ``xdp_set`` attaches with the caller's XDP_FLAGS_* (UPDATE_IF_NOEXIST:
  never over another program) or, given ``expected_fd``, replaces or detaches
  atomically and only if that program is the one attached (XDP_FLAGS_REPLACE
  with IFLA_XDP_EXPECTED_FD); ``xdp_prog_ids`` reads what is attached per
  mode (native, generic).
* TC: the clsact qdisc, and the direct-action bpf filter on its ingress or
  egress side (add, replace, delete); ``tc_filter_prog`` reads the program id
  of the filter at a parent/priority/handle (pyroute2 0.9 does not map
  TCA_BPF_ID, so it is read from the attribute pyroute2 leaves undecoded).
* Links: the ARPHRD type, and a device stacked on a link that holds XDP.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as _Pyroute2Error
from pyroute2.netlink.rtnl.ifinfmsg import (
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_REPLACE,
    XDP_FLAGS_SKB_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
)

__all__ = ["CLSACT_PARENTS", "TCA_BPF_ID", "XDP_FLAGS_DRV_MODE", "XDP_FLAGS_REPLACE", "XDP_FLAGS_SKB_MODE",
           "XDP_FLAGS_UPDATE_IF_NOEXIST", "NetlinkError", "clsact_add", "clsact_del", "error_from", "link_type",
           "tc_filter_add", "tc_filter_del", "tc_filter_of", "tc_filter_prog", "tc_filters_left", "upper_with_xdp",
           "xdp_attrs", "xdp_ids_of", "xdp_prog_ids", "xdp_set"]

TCA_BPF_ID = 11  # linux/pkt_cls.h; not in pyroute2 0.9's map of the bpf filter's options
#: clsact's ingress and egress parents (TC_H_CLSACT:TC_H_MIN_INGRESS / _EGRESS)
CLSACT_PARENTS = (0xFFFFFFF2, 0xFFFFFFF3)


class NetlinkError(OSError):
    """An rtnetlink request failed: ``errno`` and the kernel's extended ack message."""


def error_from(exc: _Pyroute2Error) -> NetlinkError:
    """pyroute2's error as ours: ``strerror (extended ack)``, the ack only when the kernel sent one."""
    code = int(exc.code)
    text = os.strerror(code)
    ack = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else ""
    return NetlinkError(code, text + (f" ({ack})" if ack and ack != text else ""))


@contextlib.contextmanager
def _rtnl() -> Iterator[Any]:
    """An ``IPRoute`` with extended acks, pyroute2's errors raised as ``NetlinkError``."""
    try:
        with IPRoute(ext_ack=True) as ipr:
            yield ipr
    except _Pyroute2Error as exc:
        raise error_from(exc) from None


# -- XDP -------------------------------------------------------------------------------


def xdp_attrs(fd: int, flags: int, expected_fd: int | None = None) -> list[tuple[str, int]]:
    """The IFLA_XDP attributes of an attach (``fd`` -1: a detach); ``expected_fd`` adds XDP_FLAGS_REPLACE."""
    attrs = [("IFLA_XDP_FD", fd)]
    if expected_fd is not None:
        flags |= XDP_FLAGS_REPLACE
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
    attrs.append(("IFLA_XDP_FLAGS", flags))
    return attrs


def xdp_set(ifindex: int, fd: int, flags: int, expected_fd: int | None = None) -> None:
    """Attach XDP program ``fd`` to ``ifindex`` (fd -1: detach) with XDP_FLAGS_*.

    With ``expected_fd`` (XDP_FLAGS_REPLACE is added) the change happens only if
    that program is the one attached now, atomically: a take-over, or a detach
    that never removes someone else's program.
    """
    with _rtnl() as ipr:
        ipr.link("set", index=ifindex, IFLA_XDP={"attrs": xdp_attrs(fd, flags, expected_fd)})


def xdp_ids_of(link: Any) -> dict[str, int]:
    """The XDP program ids in one decoded RTM_NEWLINK message: {"native": id, "generic": id} (absent: none).

    A kernel that reports one program only gives IFLA_XDP_PROG_ID and the mode it is attached in.
    """
    xdp = link.get_attr("IFLA_XDP")
    if xdp is None:
        return {}
    mode = xdp.get_attr("IFLA_XDP_ATTACHED")  # pyroute2's names: "xdp" (driver), "xdpgeneric", ...
    single = int(xdp.get_attr("IFLA_XDP_PROG_ID") or 0)
    drv = int(xdp.get_attr("IFLA_XDP_DRV_PROG_ID") or 0) or (single if mode == "xdp" else 0)
    skb = int(xdp.get_attr("IFLA_XDP_SKB_PROG_ID") or 0) or (single if mode == "xdpgeneric" else 0)
    return {m: i for m, i in (("native", drv), ("generic", skb)) if i}


def xdp_prog_ids(ifindex: int) -> dict[str, int]:
    """The XDP programs attached to ``ifindex``: {"native": id, "generic": id} (absent: none)."""
    with _rtnl() as ipr:
        links = list(ipr.get_links(ifindex))
    return xdp_ids_of(links[0]) if links else {}


def upper_with_xdp(ifindex: int) -> str | None:
    """The name of a device stacked on ``ifindex`` (its master, a VLAN or macvlan on it) that has an XDP
    program: the kernel then refuses XDP on ``ifindex`` with EEXIST."""
    with _rtnl() as ipr:
        links = list(ipr.get_links())
    uppers = []
    for link in links:
        index = int(link["index"])
        if index == ifindex:
            uppers.append(int(link.get_attr("IFLA_MASTER") or 0))
        elif link.get_attr("IFLA_LINK_NETNSID") is None and int(link.get_attr("IFLA_LINK") or 0) == ifindex:
            uppers.append(index)
    names = {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in links}
    for index in uppers:
        if index and xdp_prog_ids(index):
            return names.get(index, f"ifindex {index}")
    return None


def link_type(ifindex: int) -> int | None:
    """The link's ARPHRD type, or None when it is gone."""
    try:
        with _rtnl() as ipr:
            links = list(ipr.get_links(ifindex))
    except NetlinkError:
        return None
    return int(links[0]["ifi_type"]) if links else None


# -- TC ----------------------------------------------------------------------------------


def clsact_add(ifindex: int) -> bool:
    """Add a clsact qdisc to ``ifindex``; False if it has one already."""
    try:
        with _rtnl() as ipr:
            ipr.tc("add", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.errno == errno.EEXIST:
            return False
        raise
    return True


def clsact_del(ifindex: int) -> None:
    """Remove ``ifindex``'s clsact qdisc (and whatever filters are in it)."""
    with _rtnl() as ipr:
        ipr.tc("del", "clsact", ifindex)


def tc_filter_add(ifindex: int, fd: int, name: str, parent: int, prio: int, handle: int,
                  replace: bool = False) -> None:
    """A direct-action bpf filter running program ``fd`` at ``parent``/``prio``/``handle``: added (EEXIST
    if one is there), or with ``replace`` put in the place of the one there, in one step."""
    with _rtnl() as ipr:
        ipr.tc("replace-filter" if replace else "add-filter", "bpf", ifindex, handle, fd=fd, name=name,
               parent=parent, classid=1, direct_action=True, prio=prio)


def tc_filter_del(ifindex: int, parent: int, prio: int, handle: int) -> None:
    """Remove the bpf filter at ``parent``/``prio``/``handle``; a no-op when it (or the link) is gone."""
    try:
        with _rtnl() as ipr:
            ipr.tc("del-filter", "bpf", ifindex, handle, parent=parent, prio=prio)
    except NetlinkError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            raise


def tc_filters_left(ifindex: int) -> bool:
    """Has ``ifindex``'s clsact qdisc any filter left, on either side?"""
    with _rtnl() as ipr:
        found = [f for parent in CLSACT_PARENTS for f in ipr.get_filters(ifindex, parent=parent)]
    return any(f.get_attr("TCA_KIND") for f in found)


def _bpf_id(opts: Any) -> int:
    """TCA_BPF_ID of a bpf filter's decoded options: by name if pyroute2 maps it, else from the raw attribute."""
    known = opts.get_attr("TCA_BPF_ID")
    if known is not None:
        return int(known)
    for name, nla in opts["attrs"]:
        if name != "UNKNOWN":  # decoded values; an unmapped attribute keeps its header and place in the buffer
            continue
        if nla["header"]["type"] & 0x3FFF == TCA_BPF_ID and nla["header"]["length"] >= 8:
            return int(struct.unpack_from("=I", nla.data, nla.offset + 4)[0])
    return 0


def tc_filter_of(filters: Iterable[Any], parent: int, prio: int, handle: int) -> tuple[int, str] | None:
    """(program id, name) of the bpf filter at ``parent``/``prio``/``handle`` among decoded RTM_NEWTFILTER
    messages, or None."""
    for f in filters:
        if int(f["handle"]) != handle or int(f["parent"]) != parent or int(f["info"]) >> 16 != prio:
            continue
        opts = f.get_attr("TCA_OPTIONS")
        if f.get_attr("TCA_KIND") != "bpf" or opts is None:
            continue
        return _bpf_id(opts), str(opts.get_attr("TCA_BPF_NAME") or "")
    return None


def tc_filter_prog(ifindex: int, parent: int, prio: int, handle: int) -> tuple[int, str] | None:
    """(program id, name) of the bpf filter at ``parent``/``prio``/``handle`` of ``ifindex``, or None."""
    try:
        with _rtnl() as ipr:
            filters = list(ipr.get_filters(ifindex, parent=parent))
    except NetlinkError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            return None
        raise
    return tc_filter_of(filters, parent, prio, handle)
