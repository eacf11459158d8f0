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

With a ``user`` (``--user pyflow``), ``drop`` also leaves uid 0 for good:
supplementary groups cleared, then setresgid/setresuid to the user's ids
with PR_SET_KEEPCAPS, so the permitted set survives the change and the kept
capabilities are raised again.  Without CAP_DAC_OVERRIDE a uid-0 process
still owns every root file (/etc/shadow opens for writing, chmod works on
root's files); the user owns nothing of the system's.  For that start it
needs CAP_SETUID, CAP_SETGID (and CAP_CHOWN, used by pin.NetnsPins.give_to).

A non-root process loses its capabilities on execve: ``for_children``
raises the kept ones as *ambient* capabilities around the start of the
compile child (pin.compile_pinned), in the calling thread only, and clears
them again, so the agent itself runs with no inheritable or ambient ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
from collections.abc import Iterable, Iterator
from pathlib import Path

from pyflow.errors import ConfigError, KernelError
from pyflow.kernel.libc import libc as _libc

CAP_CHOWN = 0
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
NAMES = {CAP_CHOWN: "CAP_CHOWN", CAP_SETGID: "CAP_SETGID", CAP_SETUID: "CAP_SETUID", CAP_SETPCAP: "CAP_SETPCAP",
         CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
         CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}

#: what the running agent uses
AGENT_EFFECTIVE = (CAP_BPF, CAP_NET_ADMIN)
#: and what a reload's compile child needs on top
AGENT_PERMITTED = (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON)

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4



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


def lookup_user(name: str) -> tuple[int, int]:
    """(uid, gid) of the user ``name``: the one the agent becomes (``--user``)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"user {name!r} does not exist: `make setup` creates the system user 'pyflow' "
                          f"(or: useradd --system --no-create-home --shell /usr/sbin/nologin {name}); "
                          "user = \"\" keeps uid 0") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise ConfigError(f"user {name!r} has uid {entry.pw_uid} / gid {entry.pw_gid}: not an unprivileged user")
    return entry.pw_uid, entry.pw_gid


def _capset(effective: int, permitted: int, inheritable: int = 0) -> None:
    hdr = _Header(version=_LINUX_CAPABILITY_VERSION_3, pid=0)
    data = (_Data * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _become(uid: int, gid: int) -> None:
    """Leave uid 0 for ``uid``/``gid`` (real, effective, saved), keeping the permitted set."""
    if _libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise KernelError(f"prctl(PR_SET_KEEPCAPS): {os.strerror(err)}")
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except PermissionError as exc:
        raise KernelError(f"cannot become uid {uid} / gid {gid}: {exc.strerror} (the start needs CAP_SETUID and "
                          "CAP_SETGID for --user)") from None
    finally:
        _libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0)


def drop(effective: Iterable[int] = AGENT_EFFECTIVE, permitted: Iterable[int] = AGENT_PERMITTED,
         user: tuple[int, int] | None = None) -> int:
    """Keep ``effective`` (⊆ ``permitted``) and nothing else, as ``user`` (uid, gid) if given;
    returns the effective mask now."""
    have = current()
    keep_p = _mask(permitted) & have["CapPrm"]
    keep_e = _mask(effective) & keep_p
    # the bounding set first: it takes CAP_SETPCAP, which goes with the capset below
    if have["CapEff"] >> CAP_SETPCAP & 1:
        for cap in range(last_cap() + 1):
            if not keep_p >> cap & 1 and have["CapBnd"] >> cap & 1:
                _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if user is not None:
        _become(*user)  # the effective set is empty now, the permitted one as it was
    _capset(keep_e, keep_p)
    return current()["CapEff"]


@contextlib.contextmanager
def for_children(caps: Iterable[int] = AGENT_PERMITTED) -> Iterator[None]:
    """While in the block, a process this thread starts gets ``caps`` (those of them permitted)
    across execve, as ambient capabilities, whatever its uid; cleared again after."""
    have = current()
    keep = _mask(caps) & have["CapPrm"]
    try:
        _capset(have["CapEff"], have["CapPrm"], keep | have["CapInh"])
        for cap in range(64):
            if keep >> cap & 1 and _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0:
                err = ctypes.get_errno()
                raise KernelError(f"cannot pass {NAMES.get(cap, cap)} to the compile child: {os.strerror(err)}")
        yield
    finally:
        _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        _capset(have["CapEff"], have["CapPrm"], have["CapInh"])
