"""The kernel layer's rtnetlink without root: what pyflow/kernel/netlink.py builds and reads.

The messages read here are built byte by byte as the kernel sends them (linux/if_link.h,
linux/pkt_cls.h) and decoded by pyroute2, as ``xdp_prog_ids`` and ``tc_filter_prog`` do;
tests/integration/test_netlink.py runs the same functions against the kernel.
"""

from __future__ import annotations

import errno
import struct

from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.exceptions import NetlinkError as Pyroute2Error
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from pyflow.kernel import netlink

IFLA_IFNAME, IFLA_XDP = 3, 43
IFLA_XDP_ATTACHED, IFLA_XDP_PROG_ID, IFLA_XDP_DRV_PROG_ID, IFLA_XDP_SKB_PROG_ID = 2, 4, 5, 6
XDP_ATTACHED_NONE, XDP_ATTACHED_DRV, XDP_ATTACHED_SKB, XDP_ATTACHED_MULTI = 0, 1, 2, 4
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_CLASSID, TCA_BPF_NAME, TCA_BPF_FLAGS, TCA_BPF_TAG = 3, 7, 8, 10
NLA_F_NESTED = 0x8000


def nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def u32(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=I", value))


def message(msg_type: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), msg_type, 0, 1, 0) + body


def link(ifindex: int, xdp: bytes | None, nested_flag: int = 0) -> ifinfmsg:
    body = struct.pack("=BxHiII", 0, 1, ifindex, 0, 0) + nla(IFLA_IFNAME, b"v0\0")
    if xdp is not None:
        body += nla(IFLA_XDP | nested_flag, xdp)
    m = ifinfmsg(message(16, body))  # RTM_NEWLINK
    m.decode()
    return m


def bpf_filter(handle: int, parent: int, prio: int, prog_id: int | None, name: str = "pyflow_tc_ingress",
               kind: bytes = b"bpf") -> tcmsg:
    opts = u32(TCA_BPF_CLASSID, 1) + nla(TCA_BPF_NAME, name.encode() + b"\0") + u32(TCA_BPF_FLAGS, 1)
    opts += nla(TCA_BPF_TAG, bytes(8))
    if prog_id is not None:
        opts += u32(netlink.TCA_BPF_ID, prog_id)
    body = struct.pack("=BxxxiIII", 0, 7, handle, parent, (prio << 16) | 0x0300)
    body += nla(TCA_KIND, kind + b"\0") + nla(TCA_OPTIONS | NLA_F_NESTED, opts)
    m = tcmsg(message(44, body))  # RTM_NEWTFILTER
    m.decode()
    return m


# -- XDP -------------------------------------------------------------------------------


def test_an_attach_asks_for_no_replace_and_a_replace_names_the_expected_program() -> None:
    noexist = netlink.XDP_FLAGS_UPDATE_IF_NOEXIST | netlink.XDP_FLAGS_DRV_MODE
    assert netlink.xdp_attrs(7, noexist) == [("IFLA_XDP_FD", 7), ("IFLA_XDP_FLAGS", noexist)]
    replace = netlink.XDP_FLAGS_SKB_MODE | netlink.XDP_FLAGS_REPLACE
    assert netlink.xdp_attrs(8, netlink.XDP_FLAGS_SKB_MODE, expected_fd=7) == [
        ("IFLA_XDP_FD", 8), ("IFLA_XDP_EXPECTED_FD", 7), ("IFLA_XDP_FLAGS", replace)]
    # a detach that removes only our own program: fd -1, ours expected
    assert netlink.xdp_attrs(-1, netlink.XDP_FLAGS_SKB_MODE, expected_fd=8)[:2] == [
        ("IFLA_XDP_FD", -1), ("IFLA_XDP_EXPECTED_FD", 8)]


def test_the_attach_attributes_encode_as_the_kernel_reads_them() -> None:
    m = ifinfmsg()
    m["index"] = 5
    m["attrs"] = [("IFLA_XDP", {"attrs": netlink.xdp_attrs(9, netlink.XDP_FLAGS_SKB_MODE, expected_fd=4)})]
    m.encode()
    data = bytes(m.data)
    off = 16 + 16  # nlmsghdr, ifinfomsg
    length, kind = struct.unpack_from("=HH", data, off)
    assert kind & 0x3FFF == IFLA_XDP and kind & NLA_F_NESTED
    inner, pos = {}, off + 4
    while pos < off + length:
        ln, k = struct.unpack_from("=HH", data, pos)
        inner[k] = data[pos + 4:pos + ln]
        pos += (ln + 3) & ~3
    assert struct.unpack("=i", inner[1])[0] == 9  # IFLA_XDP_FD
    assert struct.unpack("=i", inner[8])[0] == 4  # IFLA_XDP_EXPECTED_FD
    assert struct.unpack("=I", inner[3])[0] == netlink.XDP_FLAGS_SKB_MODE | netlink.XDP_FLAGS_REPLACE


def test_no_xdp_attribute_or_none_attached_reads_as_nothing() -> None:
    assert netlink.xdp_ids_of(link(3, None)) == {}
    assert netlink.xdp_ids_of(link(3, nla(IFLA_XDP_ATTACHED, bytes([XDP_ATTACHED_NONE])))) == {}


@given(mode=st.sampled_from([XDP_ATTACHED_DRV, XDP_ATTACHED_SKB, XDP_ATTACHED_MULTI]),
       drv=st.integers(0, 2**32 - 1), skb=st.integers(0, 2**32 - 1), single=st.integers(1, 2**32 - 1),
       per_mode=st.booleans(), nested=st.sampled_from([0, NLA_F_NESTED]))
def test_xdp_ids_per_mode(mode: int, drv: int, skb: int, single: int, per_mode: bool, nested: int) -> None:
    """Kernels give the id per mode (IFLA_XDP_DRV/SKB_PROG_ID) and, for one program, IFLA_XDP_PROG_ID with
    the mode it is attached in; both read the same."""
    attrs = nla(IFLA_XDP_ATTACHED, bytes([mode]))
    if mode != XDP_ATTACHED_MULTI:
        attrs += u32(IFLA_XDP_PROG_ID, single)
    if per_mode:
        attrs += (u32(IFLA_XDP_DRV_PROG_ID, drv) if drv else b"") + (u32(IFLA_XDP_SKB_PROG_ID, skb) if skb else b"")
    got = netlink.xdp_ids_of(link(3, attrs, nested))
    want_drv = (drv if per_mode else 0) or (single if mode == XDP_ATTACHED_DRV else 0)
    want_skb = (skb if per_mode else 0) or (single if mode == XDP_ATTACHED_SKB else 0)
    assert got == {k: v for k, v in (("native", want_drv), ("generic", want_skb)) if v}


# -- TC ----------------------------------------------------------------------------------


PARENT, PRIO, HANDLE = 0xFFFFFFF2, 1, 1


@given(prog_id=st.integers(1, 2**32 - 1))
def test_the_filter_program_id_is_read_though_pyroute2_leaves_it_undecoded(prog_id: int) -> None:
    f = bpf_filter(HANDLE, PARENT, PRIO, prog_id)
    assert netlink.tc_filter_of([f], PARENT, PRIO, HANDLE) == (prog_id, "pyflow_tc_ingress")


def test_only_the_bpf_filter_at_that_parent_priority_and_handle_counts() -> None:
    others = [bpf_filter(2, PARENT, PRIO, 11), bpf_filter(HANDLE, 0xFFFFFFF3, PRIO, 12),
              bpf_filter(HANDLE, PARENT, 2, 13), bpf_filter(HANDLE, PARENT, PRIO, 14, kind=b"u32")]
    assert netlink.tc_filter_of(others, PARENT, PRIO, HANDLE) is None
    assert netlink.tc_filter_of([*others, bpf_filter(HANDLE, PARENT, PRIO, 15, "x")], PARENT, PRIO, HANDLE) == (15, "x")
    no_id = bpf_filter(HANDLE, PARENT, PRIO, None)  # a kernel before TCA_BPF_ID (4.13)
    assert netlink.tc_filter_of([no_id], PARENT, PRIO, HANDLE) == (0, "pyflow_tc_ingress")


# -- errors ------------------------------------------------------------------------------


def test_errors_carry_the_errno_and_the_extended_ack() -> None:
    e = netlink.error_from(Pyroute2Error(errno.EBUSY, "XDP program already attached"))
    assert isinstance(e, OSError) and e.errno == errno.EBUSY
    assert str(e) == "[Errno 16] Device or resource busy (XDP program already attached)"
    plain = netlink.error_from(Pyroute2Error(errno.ENODEV))  # no extended ack: pyroute2 puts strerror there
    assert plain.errno == errno.ENODEV and plain.strerror == "No such device"
