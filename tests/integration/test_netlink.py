"""pyflow/kernel/netlink.py against the kernel: XDP and TC attachments on a veth in a namespace.

Two one-instruction programs stand in for the meter (loaded with BPF_PROG_LOAD, no bcc):

* an attach never goes over another program (XDP_FLAGS_UPDATE_IF_NOEXIST), and says why in the
  kernel's own words (the extended ack);
* a replace, and a detach, happen only while the expected program is the one attached;
* the attached ids are read per mode (native on a veth, generic);
* the TC filter: added, found by its program id, replaced in one step, removed; the qdisc
  reports whether any filter is left;
* the link type, and an interface that is gone;
* link notifications (pyflow/host/rtevents.py, what the link and route watchers read): never
  blocking, an overflow (ENOBUFS) reported as lost, and reading goes on after it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from pyflow.follow import RTMGRP_LINK
from pyflow.host.rtevents import Drained, RtnlEvents
from pyflow.kernel import netlink, pin
from pyflow.kernel.bpfsys import _bpf
from tests.integration.netns import Pair, in_netns, ip

T = TypeVar("T")
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_XDP = 3, 6
XDP_PASS, TC_ACT_UNSPEC = 2, -1
NATIVE = netlink.XDP_FLAGS_DRV_MODE
GENERIC = netlink.XDP_FLAGS_SKB_MODE
NOEXIST = netlink.XDP_FLAGS_UPDATE_IF_NOEXIST
INGRESS, PRIO, HANDLE = netlink.CLSACT_PARENTS[0], 1, 1


class _LoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16)]


def load(prog_type: int, ret: int, name: bytes) -> int:
    """``r0 = ret; exit``: the smallest program the verifier takes."""
    insns = ctypes.create_string_buffer(struct.pack("<BBhi", 0xB7, 0, 0, ret) + struct.pack("<BBhi", 0x95, 0, 0, 0))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = _LoadAttr(prog_type=prog_type, insn_cnt=2, insns=ctypes.addressof(insns), license=ctypes.addressof(lic),
                     prog_name=name)
    return _bpf(BPF_PROG_LOAD, attr)


@pytest.fixture
def progs() -> Iterator[dict[str, int]]:
    fds = {"x1": load(BPF_PROG_TYPE_XDP, XDP_PASS, b"pf_x1"), "x2": load(BPF_PROG_TYPE_XDP, XDP_PASS, b"pf_x2"),
           "tc1": load(BPF_PROG_TYPE_SCHED_CLS, TC_ACT_UNSPEC, b"pf_tc1"),
           "tc2": load(BPF_PROG_TYPE_SCHED_CLS, TC_ACT_UNSPEC, b"pf_tc2")}
    yield fds
    for fd in fds.values():
        os.close(fd)


def prog_id(fd: int) -> int:
    return pin.prog_info(fd).id


def in_b(pair: Pair, fn: Callable[[], T]) -> T:
    return in_netns(pair.b, fn)


def test_xdp_attach_replace_and_detach_only_what_is_expected(pair: Pair, progs: dict[str, int]) -> None:
    idx = in_b(pair, lambda: socket.if_nametoindex(pair.b_if))
    x1, x2 = progs["x1"], progs["x2"]
    in_b(pair, lambda: netlink.xdp_set(idx, x1, GENERIC | NOEXIST))
    assert in_b(pair, lambda: netlink.xdp_prog_ids(idx)) == {"generic": prog_id(x1)}
    with pytest.raises(netlink.NetlinkError) as busy:  # never over another program
        in_b(pair, lambda: netlink.xdp_set(idx, x2, GENERIC | NOEXIST))
    assert busy.value.errno == errno.EBUSY and "(XDP program already attached)" in str(busy.value)
    with pytest.raises(netlink.NetlinkError) as wrong:  # a replace expecting a program that is not there
        in_b(pair, lambda: netlink.xdp_set(idx, x2, GENERIC, expected_fd=x2))
    assert wrong.value.errno == errno.EEXIST
    in_b(pair, lambda: netlink.xdp_set(idx, x2, GENERIC, expected_fd=x1))  # the take-over
    assert in_b(pair, lambda: netlink.xdp_prog_ids(idx)) == {"generic": prog_id(x2)}
    with pytest.raises(netlink.NetlinkError):  # a detach by the earlier owner leaves the new program alone
        in_b(pair, lambda: netlink.xdp_set(idx, -1, GENERIC, expected_fd=x1))
    assert in_b(pair, lambda: netlink.xdp_prog_ids(idx)) == {"generic": prog_id(x2)}
    in_b(pair, lambda: netlink.xdp_set(idx, -1, GENERIC, expected_fd=x2))
    assert in_b(pair, lambda: netlink.xdp_prog_ids(idx)) == {}


def test_xdp_native_mode_is_read_as_native(pair: Pair, progs: dict[str, int]) -> None:
    idx = in_b(pair, lambda: socket.if_nametoindex(pair.b_if))
    in_b(pair, lambda: netlink.xdp_set(idx, progs["x1"], NATIVE | NOEXIST))  # veth has native XDP
    try:
        assert in_b(pair, lambda: netlink.xdp_prog_ids(idx)) == {"native": prog_id(progs["x1"])}
        with pytest.raises(netlink.NetlinkError) as both:
            in_b(pair, lambda: netlink.xdp_set(idx, progs["x2"], GENERIC | NOEXIST))
        assert both.value.errno == errno.EEXIST and "generic" in str(both.value)  # the kernel's words
    finally:
        in_b(pair, lambda: netlink.xdp_set(idx, -1, NATIVE, expected_fd=progs["x1"]))
    assert in_b(pair, lambda: netlink.xdp_prog_ids(idx)) == {}


def test_tc_filter_add_find_replace_and_remove(pair: Pair, progs: dict[str, int]) -> None:
    idx = in_b(pair, lambda: socket.if_nametoindex(pair.b_if))
    tc1, tc2 = progs["tc1"], progs["tc2"]
    assert in_b(pair, lambda: netlink.tc_filter_prog(idx, INGRESS, PRIO, HANDLE)) is None
    assert in_b(pair, lambda: netlink.clsact_add(idx)) is True
    assert in_b(pair, lambda: netlink.clsact_add(idx)) is False  # there already
    in_b(pair, lambda: netlink.tc_filter_add(idx, tc1, "pyflow_tc_ingress", INGRESS, PRIO, HANDLE))
    assert in_b(pair, lambda: netlink.tc_filter_prog(idx, INGRESS, PRIO, HANDLE)) == (prog_id(tc1), "pyflow_tc_ingress")
    with pytest.raises(netlink.NetlinkError) as taken:
        in_b(pair, lambda: netlink.tc_filter_add(idx, tc2, "other", INGRESS, PRIO, HANDLE))
    assert taken.value.errno == errno.EEXIST
    in_b(pair, lambda: netlink.tc_filter_add(idx, tc2, "pyflow_tc_ingress", INGRESS, PRIO, HANDLE, replace=True))
    assert in_b(pair, lambda: netlink.tc_filter_prog(idx, INGRESS, PRIO, HANDLE)) == (prog_id(tc2), "pyflow_tc_ingress")
    assert in_b(pair, lambda: netlink.tc_filters_left(idx)) is True
    in_b(pair, lambda: netlink.tc_filter_del(idx, INGRESS, PRIO, HANDLE))
    in_b(pair, lambda: netlink.tc_filter_del(idx, INGRESS, PRIO, HANDLE))  # gone already: a no-op
    assert in_b(pair, lambda: netlink.tc_filters_left(idx)) is False
    in_b(pair, lambda: netlink.clsact_del(idx))
    assert in_b(pair, lambda: netlink.clsact_add(idx)) is True  # it was removed
    in_b(pair, lambda: netlink.clsact_del(idx))


def test_link_facts_and_a_link_that_is_gone(pair: Pair) -> None:
    idx = in_b(pair, lambda: socket.if_nametoindex(pair.b_if))
    assert in_b(pair, lambda: netlink.link_type(idx)) == 1  # ARPHRD_ETHER
    assert in_b(pair, lambda: netlink.link_type(1)) == 772  # lo: ARPHRD_LOOPBACK
    assert in_b(pair, lambda: netlink.upper_with_xdp(idx)) is None
    gone = 0x7FFF0000
    assert in_b(pair, lambda: netlink.link_type(gone)) is None
    with pytest.raises(netlink.NetlinkError) as nodev:
        in_b(pair, lambda: netlink.xdp_prog_ids(gone))
    assert nodev.value.errno == errno.ENODEV
    assert in_b(pair, lambda: netlink.tc_filter_prog(gone, INGRESS, PRIO, HANDLE)) is None


def test_link_events_overflowing_the_buffer_are_reported_lost_and_reading_goes_on(pair: Pair) -> None:
    events = in_b(pair, lambda: RtnlEvents(RTMGRP_LINK, rcvbuf=1024))  # the kernel's minimum, about 2 KiB
    names = [f"pfev{i}" for i in range(10)]
    try:
        assert events.drain(10) == Drained(0, False, None)  # nothing yet: never blocks
        for i, n in enumerate(names):  # each veth pair: several notifications of a KiB or more
            ip("-n", pair.b, "link", "add", n, "type", "veth", "peer", "name", f"pfep{i}")
        first = events.drain(1000)
        assert first.lost and first.error is None
        ip("-n", pair.b, "link", "set", names[0], "up")  # one more, after the overflow
        ready, _, _ = select.select([events.fileno()], [], [], 5)
        assert ready
        after = events.drain(1000)
        assert after.reads >= 1 and not after.lost and after.error is None
    finally:
        events.close()
        for n in names:
            ip("-n", pair.b, "link", "del", n, check=False)
