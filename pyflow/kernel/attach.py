"""Attaching the meter's programs: XDP through rtnetlink, TC as a clsact qdisc and a bpf filter
(kernel/netlink.py does the requests).  Never over another program: our own one already in
place is taken as it is, anything else is an error that says what is there and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass

from pyflow.errors import KernelError
from pyflow.kernel import netlink
from pyflow.kernel.abi import PROGRAMS

XDP_FLAGS_UPDATE_IF_NOEXIST = netlink.XDP_FLAGS_UPDATE_IF_NOEXIST
XDP_FLAGS_SKB_MODE = netlink.XDP_FLAGS_SKB_MODE
XDP_FLAGS_DRV_MODE = netlink.XDP_FLAGS_DRV_MODE

XDP_MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}

#: clsact parents of the TC hooks (TC_H_CLSACT:TC_H_MIN_INGRESS / _EGRESS).
TC_PARENTS = dict(zip(("tc_ingress", "tc_egress"), netlink.CLSACT_PARENTS, strict=True))
#: Our TC filters run first (priority 1) and return TC_ACT_UNSPEC, so every
#: filter after them still runs as if pyflow were not there.
TC_PRIORITY = 1
TC_HANDLE = 0x1


@dataclass
class Attachment:
    ifname: str
    ifindex: int
    hook: str  # "xdp", "tc_ingress" or "tc_egress"
    mode: str  # XDP: "native" or "generic"; TC: "clsact"
    created_qdisc: bool = False  # TC: we added the clsact qdisc (and remove it if it is left empty)


def ifindex_of(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise KernelError(f"no such interface: {ifname!r} (see `ip link`)") from None


def attach_xdp(ifname: str, ifindex: int, mode: str, fd: int, ours: Callable[[], int]) -> Attachment:
    """XDP on ``ifindex``: native first, generic if the driver lacks it (``mode`` auto), or the given
    mode.  Our own program already there (``ours()``: its id) is taken as it is."""
    modes = ["native", "generic"] if mode == "auto" else [mode]
    if any(m not in XDP_MODES for m in modes):
        raise KernelError(f"unknown XDP mode {mode!r} (auto, native or generic)")
    errors = []
    for m in modes:
        try:
            netlink.xdp_set(ifindex, fd, XDP_MODES[m] | XDP_FLAGS_UPDATE_IF_NOEXIST)
        except netlink.NetlinkError as exc:
            if exc.errno in (errno.EBUSY, errno.EEXIST):
                there = netlink.xdp_prog_ids(ifindex)
                if there.get(m) == ours():
                    return Attachment(ifname=ifname, ifindex=ifindex, hook="xdp", mode=m)  # ours already
                upper = netlink.upper_with_xdp(ifindex) if not there else None
                if upper is not None:
                    raise KernelError(
                        f"XDP cannot attach to {ifname}: its upper device {upper} has an XDP program, and the "
                        f"kernel allows none on a device under one (meter {ifname} with hook=tc, or meter "
                        f"{upper} only: it sees what {ifname} passes up)"
                    ) from exc
                raise KernelError(
                    f"{ifname} already has an XDP program attached ({exc}); pyflow does not replace "
                    f"another program. Remove it with `ip link set dev {ifname} xdp off` if it is stale, "
                    f"or meter {ifname} with hook=tc"
                ) from exc
            errors.append(f"{m}: {exc}")
            continue
        return Attachment(ifname=ifname, ifindex=ifindex, hook="xdp", mode=m)
    raise KernelError(f"cannot attach XDP to {ifname}: " + "; ".join(errors))


def attach_tc(ifname: str, ifindex: int, hook: str, fd: int, ours: Callable[[], int]) -> Attachment:
    """A clsact qdisc (added if missing) and our direct-action filter on its ``hook`` side."""
    try:
        created = netlink.clsact_add(ifindex)
    except netlink.NetlinkError as exc:
        raise KernelError(f"cannot add a clsact qdisc to {ifname}: {exc}") from exc
    try:
        netlink.tc_filter_add(ifindex, fd, PROGRAMS[hook], TC_PARENTS[hook], TC_PRIORITY, TC_HANDLE)
    except netlink.NetlinkError as exc:
        if created:
            _quiet(lambda: netlink.clsact_del(ifindex))
        if exc.errno == errno.EEXIST:
            there = netlink.tc_filter_prog(ifindex, TC_PARENTS[hook], TC_PRIORITY, TC_HANDLE)
            if there is not None and there[0] == ours():
                return Attachment(ifname=ifname, ifindex=ifindex, hook=hook, mode="clsact")  # ours already
            raise KernelError(
                f"{ifname} already has a TC filter at {hook.replace('_', ' ')} priority {TC_PRIORITY} "
                f"handle {TC_HANDLE}; pyflow does not replace it (see `tc filter show dev {ifname} "
                f"{'ingress' if hook == 'tc_ingress' else 'egress'}`)"
            ) from exc
        raise KernelError(f"cannot attach the TC program to {ifname} ({hook}): {exc}") from exc
    return Attachment(ifname=ifname, ifindex=ifindex, hook=hook, mode="clsact", created_qdisc=created)


def detach_tc(att: Attachment) -> None:
    netlink.tc_filter_del(att.ifindex, TC_PARENTS[att.hook], TC_PRIORITY, TC_HANDLE)
    if att.created_qdisc and not netlink.tc_filters_left(att.ifindex):
        _quiet(lambda: netlink.clsact_del(att.ifindex))  # ours, and nobody else's filters in it


def _quiet(fn: Callable[[], object]) -> None:
    with contextlib.suppress(Exception):  # best effort clean-up of what we created
        fn()
