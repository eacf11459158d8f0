"""Least privilege: after its privileged start, the agent keeps only the capabilities it uses.

Measured on Linux 6.x (tests/integration/test_privileges.py):

* ``CAP_BPF``: every bpf(2) call (with ``kernel.unprivileged_bpf_disabled``),
  including map reads and updates on fds the agent already holds;
* ``CAP_NET_ADMIN``: XDP and TC attach/detach (rtnetlink), conntrack;
* ``CAP_PERFMON``: not used by the agent itself, but loading the program needs
  it (with CAP_BPF and CAP_NET_ADMIN), and a reload with new kernel settings
  (SIGHUP) compiles and loads in a child process: it stays *permitted*, not
  effective, so the child (uid 0, or ``NoNewPrivileges``) can have it.
* ``CAP_SYS_ADMIN``: only at start, to mount a bpffs where none is, and to
  find (by id) programs an agent left attached without pins; dropped after.

``drop`` sets the calling thread's effective and permitted sets, clears the
inheritable and ambient sets, and shrinks the bounding set when it may
(CAP_SETPCAP), so no process the agent starts can get more than it kept.
Capabilities are per thread: call it before the agent starts threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterable
from pathlib import Path

CAP_SETPCAP = 8
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
NAMES = {CAP_SETPCAP: "CAP_SETPCAP", CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
         CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}

#: what the running agent uses
AGENT_EFFECTIVE = (CAP_BPF, CAP_NET_ADMIN)
#: and what a reload's compile child needs on top
AGENT_PERMITTED = (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON)

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _mask(caps: Iterable[int]) -> int:
    m = 0
    for c in caps:
        m |= 1 << c
    return m


def last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except OSError:
        return 40


def current(tid: int | None = None) -> dict[str, int]:
    """The capability sets of this thread (or of /proc/<tid>): {"CapEff": mask, ...}."""
    path = "/proc/thread-self/status" if tid is None else f"/proc/{tid}/status"
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("Cap"):
            key, _, value = line.partition(":")
            out[key] = int(value.strip(), 16)
    return out


def names(mask: int) -> list[str]:
    return [NAMES.get(c, f"cap_{c}") for c in range(64) if mask >> c & 1]


def drop(effective: Iterable[int] = AGENT_EFFECTIVE, permitted: Iterable[int] = AGENT_PERMITTED) -> int:
    """Keep ``effective`` (⊆ ``permitted``) and nothing else; returns the effective mask now."""
    have = current()
    keep_p = _mask(permitted) & have["CapPrm"]
    keep_e = _mask(effective) & keep_p
    # the bounding set first: it takes CAP_SETPCAP, which goes with the capset below
    if have["CapEff"] >> CAP_SETPCAP & 1:
        for cap in range(last_cap() + 1):
            if not keep_p >> cap & 1 and have["CapBnd"] >> cap & 1:
                _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    hdr = _Header(version=_LINUX_CAPABILITY_VERSION_3, pid=0)
    data = (_Data * 2)()
    for i in range(2):
        data[i].effective = (keep_e >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (keep_p >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = 0
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    return current()["CapEff"]
