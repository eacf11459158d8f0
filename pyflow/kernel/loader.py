"""The flow meter's kernel lifecycle: compile, load (or open pinned), attach, detach.

``FlowMeter`` is a context manager: whatever happens inside the ``with``
block (return, exception, SIGTERM turned into an exception), every
attachment is removed on the way out, exactly once, and a pinned meter is
unpinned.  Only a killed process leaves its program attached and pinned, for
the next agent to take over (pyflow/kernel/pin.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pyflow.errors import KernelError
from pyflow.kernel import abi, bpfsys, build, netlink, pin
from pyflow.kernel.attach import (
    PROGRAMS,
    TC_HANDLE,
    TC_PARENTS,
    TC_PRIORITY,
    XDP_MODES,
    Attachment,
    _quiet,
    attach_tc,
    attach_xdp,
    detach_tc,
    ifindex_of,
)
from pyflow.kernel.bpfsys import MapBatchReader, MapChunks, map_delete, map_delete_batch
from pyflow.kernel.cache import FlowCacheMaps
from pyflow.kernel.settings import KernelSettings
from pyflow.log import log

#: Link types (ARPHRD_*) whose packets start with the IP header at XDP and TC: tun and WireGuard
#: (NONE), IPIP (TUNNEL), ip6tnl (TUNNEL6), SIT, GRE (IPGRE, IP6GRE), raw IP, PPP.
L3_LINK_TYPES = frozenset({65534, 768, 769, 776, 778, 823, 519, 512})


def _addr16(addr: str) -> bytes:
    """An address as the kernel's key has it: 16 bytes, IPv4 v4-mapped."""
    ip = ipaddress.ip_address(addr)
    return (b"\x00" * 10 + b"\xff\xff" + ip.packed) if ip.version == 4 else ip.packed


class FlowMeter(FlowCacheMaps):
    """One loaded flow meter program (three entry points), its maps and its attachments.

    Two ways to get one, one way to use it:

    * ``FlowMeter(settings)``: compiled and loaded *in this process* by bcc
      (the tests, the benchmarks, and the compile child);
    * ``FlowMeter.from_instance(instance)``: the maps and programs a compile
      child pinned in bpffs (or an earlier agent left there), opened by path
      (``pyflow run``: no bcc, no LLVM in the agent).

    Either way every map is used through its raw fd (batch reads, per-CPU
    sums, the barrier), and attachments are made
    through rtnetlink, so they outlive the process until ``detach``.
    """

    PROG_NAME = PROGRAMS["xdp"]

    def __init__(self, settings: KernelSettings, bpf_dir: Path = abi.BPF_DIR) -> None:
        self.settings = settings
        self.bpf_dir = bpf_dir
        self.bpf: build.BccProgram | None = None  # when compiled in this process
        self.prog_fd: int | None = None  # the XDP program's
        self._prog_fds: dict[str, int] = {}
        self._prog_ids: dict[str, int] = {}
        self.maps: dict[str, int] = {}  # name -> fd
        self.instance: pin.Instance | None = None  # pinned: where, manifest
        self.attachments: dict[tuple[str, str], Attachment] = {}
        self._readers: dict[abi.CacheMap, MapBatchReader] = {}
        self._chunks: dict[tuple[abi.CacheMap, int], MapChunks] = {}
        self._stats_readers: dict[str, bpfsys.PerCpuReader] = {}
        self._stats_lock = threading.Lock()  # the per-CPU readers' buffers: the sweep's and scrapes' reads
        self._own_exports: set[tuple[str, int, str, int]] = set()
        self._own_fds: list[int] = []
        self._cpus = bpfsys.possible_cpus()
        self._closed = False

    @classmethod
    def from_instance(cls, instance: pin.Instance, bpf_dir: Path = abi.BPF_DIR) -> FlowMeter:
        """A meter on pinned (or found) maps and programs; its recorded attachments that are
        still in place in the kernel are its attachments again."""
        meter = cls(instance.settings(), bpf_dir)
        meter.instance = instance
        meter.maps = dict(instance.maps)
        meter._prog_fds = dict(instance.progs)
        meter.prog_fd = instance.progs.get("xdp")
        meter._restore_attachments(instance.manifest.get("attachments", []))
        meter._forget_own_exports()
        return meter

    def _forget_own_exports(self) -> None:
        """An earlier agent's export 4-tuples: its sockets are gone, its entries would only fill the map."""
        fd = self.maps["own_export"]
        keys, _ = MapBatchReader(fd, abi.OWN_KEY_DTYPE, np.dtype("u1"), bpfsys.map_info(fd).max_entries).read()
        if len(keys):
            map_delete_batch(fd, keys.copy())

    @property
    def pinned_at(self) -> Path | None:
        return self.instance.path if self.instance is not None else None

    # -- lifecycle -------------------------------------------------------------

    def compile(self) -> None:
        self.bpf = build.compile_program(self.settings, self.bpf_dir)
        self.maps.update(self.bpf.maps)
        own = pin.create_own_maps(self.settings.cache_entries)  # the agent's state next to the program's
        self._own_fds += own.values()
        self.maps.update(own)

    def load(self, hook: str = "xdp") -> int:
        """The fd of ``hook``'s program: loaded now (compiling first if needed), or the pinned one."""
        if hook in self._prog_fds:
            return self._prog_fds[hook]
        if hook not in PROGRAMS:
            raise KernelError(f"unknown hook {hook!r} (one of {', '.join(PROGRAMS)})")
        if self.instance is not None:
            raise KernelError(f"the pinned instance {self.pinned_at} has no {hook} program")
        if self.bpf is None:
            self.compile()
        assert self.bpf is not None
        fd = self.bpf.load(PROGRAMS[hook], xdp=hook == "xdp")
        self._prog_fds[hook] = fd
        if hook == "xdp":
            self.prog_fd = fd
        return fd

    def prog_fd_of(self, hook: str) -> int:
        """The fd of ``hook``'s program, loading it if needed."""
        return self.load(hook)

    def prog_id(self, hook: str) -> int:
        if hook not in self._prog_ids:
            self._prog_ids[hook] = bpfsys.prog_info(self.load(hook)).id
        return self._prog_ids[hook]

    def attach(self, ifname: str, mode: str = "auto", hook: str = "xdp") -> Attachment:
        """Attach ``hook``'s program to ``ifname``.

        XDP: native first, generic if the driver lacks it (``mode`` auto), or
        the given mode.  TC: a clsact qdisc (added if missing) and a
        direct-action filter on its ingress or egress side.  Our own program
        already in place (left by an agent that is gone) is taken as it is.
        """
        if (ifname, hook) in self.attachments:
            return self.attachments[(ifname, hook)]
        if hook not in PROGRAMS:
            raise KernelError(f"unknown hook {hook!r} (one of {', '.join(PROGRAMS)})")
        fd = self.load(hook)
        ifindex = ifindex_of(ifname)
        self.mark_link_layer(ifindex)

        def ours() -> int:
            return self.prog_id(hook)

        if hook == "xdp":
            att = attach_xdp(ifname, ifindex, mode, fd, ours)
        else:
            att = attach_tc(ifname, ifindex, hook, fd, ours)
        self.attachments[(ifname, hook)] = att
        self._attachments_changed()
        return att

    def detach(self, ifname: str, hook: str | None = None) -> None:
        """Remove our program(s) from ``ifname`` (every hook, or one); a no-op when not attached."""
        keys = [k for k in self.attachments if k[0] == ifname and hook in (None, k[1])]
        for key in keys:
            att = self.attachments.pop(key)
            try:
                if att.hook == "xdp":
                    # only if it is still ours: never remove a program someone put there since
                    netlink.xdp_set(att.ifindex, -1, XDP_MODES[att.mode], expected_fd=self.load("xdp"))
                else:
                    detach_tc(att)
            except Exception as exc:  # the interface may be gone already
                refused = att.hook == "xdp" and getattr(exc, "errno", None) == errno.EEXIST
                upper = netlink.upper_with_xdp(att.ifindex) if refused else None
                why = (f"the kernel refuses any XDP change on it while its upper device {upper} has an XDP "
                       f"program, so {ifname} goes on counting what it passes to {upper} (meter {upper} "
                       "with hook=tc to avoid this)") if upper else str(exc)
                log(f"error: detaching {att.hook} from {ifname}: {why}")
        if keys:
            self._attachments_changed()

    def mark_link_layer(self, ifindex: int) -> None:
        """Tell the program whether ``ifindex``'s packets start with the IP header (an L3 link: tun,
        WireGuard, GRE, ...) before any of them reaches it there."""
        l3 = netlink.link_type(ifindex) in L3_LINK_TYPES
        fd = self.maps.get("l3_links")
        if fd is None:
            return
        key, value = struct.pack("=I", ifindex), struct.pack("=B", int(l3))
        if ifindex < bpfsys.map_info(fd).max_entries:
            bpfsys.map_update(fd, key, value)
        elif l3:
            bpfsys.map_update(self.maps["l3_links_big"], key, value)
        else:
            _quiet(lambda: map_delete(self.maps["l3_links_big"], key))

    def take_over(self, old: FlowMeter, keys: Iterable[tuple[str, str]] | None = None) -> None:
        """Put this meter's programs where ``old``'s are, atomically, interface by interface.

        XDP: a netlink attach with XDP_FLAGS_REPLACE and ``old``'s program as
        the expected one replaces it in one step (and only it); TC: ``tc filter
        replace`` at the same priority and handle.  No packet meets neither
        program, none meets both.  ``old`` forgets the attachments it gave up
        (detaching them now would remove ours).  ``keys``: only these
        (ifname, hook) attachments of ``old`` (all by default).

        All or nothing: when one replace fails, the ones already made are put
        back (``old``'s program again, in one step each) before the error is
        raised, so every interface ``old`` metered is metered by it still.
        """
        wanted = None if keys is None else set(keys)
        moving = [(k, a) for k, a in old.attachments.items() if wanted is None or k in wanted]
        done: list[tuple[tuple[str, str], Attachment]] = []
        try:
            for key, att in moving:
                if self._replace(att, old):
                    done.append((key, att))
        except BaseException:
            for key, att in reversed(done):
                try:
                    old._replace(att, self)
                except Exception as exc:  # say so, go on with the others
                    log(f"putting the earlier program back on {key[0]} ({key[1]}): {exc}")
            raise
        for key, att in done:
            self.attachments[key] = dataclasses.replace(att)
        for key, _ in moving:
            del old.attachments[key]
        old._attachments_changed()
        self._attachments_changed()

    def _replace(self, att: Attachment, old: FlowMeter) -> bool:
        """This meter's program in ``old``'s place on one attachment; False: the interface is gone."""
        fd = self.load(att.hook)
        self.mark_link_layer(att.ifindex)
        try:
            if att.hook == "xdp":
                netlink.xdp_set(att.ifindex, fd, XDP_MODES[att.mode], expected_fd=old.load("xdp"))
            else:
                netlink.tc_filter_add(att.ifindex, fd, PROGRAMS[att.hook], TC_PARENTS[att.hook], TC_PRIORITY,
                                      TC_HANDLE, replace=True)
        except netlink.NetlinkError as exc:
            if exc.errno == errno.ENODEV:  # the interface went away meanwhile (and its program with it)
                return False
            raise KernelError(f"cannot put the new program in place on {att.ifname} ({att.hook}): {exc}") from exc
        return True

    def forget(self, ifname: str) -> None:
        """Drop the attachments of an interface that no longer exists (its programs went with it)."""
        for key in [k for k in self.attachments if k[0] == ifname]:
            del self.attachments[key]
        self._attachments_changed()

    def rename(self, old: str, new: str) -> None:
        """An attached interface was renamed (same ifindex): keep its attachments under the new name."""
        for key in [k for k in self.attachments if k[0] == old]:
            att = self.attachments.pop(key)
            att.ifname = new
            self.attachments[(new, key[1])] = att
        self._attachments_changed()

    def detach_all(self) -> None:
        for ifname, hook in list(self.attachments):
            self.detach(ifname, hook)

    def close(self) -> None:
        """Detach everything, release the programs and maps, and unpin them. Idempotent."""
        if self._closed:
            return
        self.detach_all()
        path = self.pinned_at
        self.release()
        if path is not None:
            pin.remove_pins(path)

    def release(self) -> None:
        """Let go of the programs and maps without detaching or unpinning anything: what a
        killed agent leaves behind (and how a compile child ends). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for fd in self._own_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._own_fds.clear()
        if self.instance is not None:
            self.instance.close()
        if self.bpf is not None:
            self.bpf.cleanup()

    # -- what the pinned instance remembers -----------------------------------------

    def _attachments_changed(self) -> None:
        """Pinned: record the attachments in the manifest (a new agent checks and keeps them)."""
        if self.instance is None or self._closed:
            return
        doc = dict(self.instance.manifest)
        doc["attachments"] = [dataclasses.asdict(a) for a in self.attachments.values()]
        pin.write_manifest(self.maps[pin.MANIFEST], doc)
        self.instance.manifest = doc

    def _restore_attachments(self, recorded: list[dict[str, Any]]) -> None:
        """The recorded attachments whose program is still ours in the kernel."""
        for rec in recorded:
            try:
                att = Attachment(**rec)
                if att.hook == "xdp":
                    here = netlink.xdp_prog_ids(att.ifindex).get(att.mode) == self.prog_id("xdp")
                else:
                    there = netlink.tc_filter_prog(att.ifindex, TC_PARENTS[att.hook], TC_PRIORITY, TC_HANDLE)
                    here = there is not None and there[0] == self.prog_id(att.hook)
                if not here:
                    continue
                att.ifname = socket.if_indextoname(att.ifindex)  # renamed meanwhile: the kernel's name
            except (TypeError, KeyError, OSError):
                continue  # a record this version does not read, or an interface that is gone
            self.attachments[(att.ifname, att.hook)] = att

    def load_session(self) -> bytes:
        """What the last agent on these maps kept of its export session (b"": nothing, or no place for it)."""
        fd = self.maps.get(pin.SESSION)
        return pin.read_blob(fd, pin.SESSION_SIZE) if fd is not None else b""

    def save_session(self, blob: bytes) -> bool:
        """Keep ``blob`` (opaque here) for the next agent; False: these maps have no place for it."""
        fd = self.maps.get(pin.SESSION)
        if fd is None or self._closed:
            return False
        pin.write_blob(fd, pin.SESSION_SIZE, blob, "export session")
        return True

    # -- own exports -----------------------------------------------------------

    def exclude_own_export(self, src: str, src_port: int, dst: str, dst_port: int) -> None:
        """Never meter UDP datagrams with this 4-tuple: the agent's own exports."""
        if (src, src_port, dst, dst_port) in self._own_exports:
            return
        self._own_exports.add((src, src_port, dst, dst_port))
        bpfsys.map_update(self.maps["own_export"], _own_key(_addr16(src), src_port, _addr16(dst), dst_port),
                       b"\x01")

    def __enter__(self) -> FlowMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- maps ------------------------------------------------------------------

    def table(self, name: str) -> Any:
        """A bcc table of the program by name, for a meter compiled in this process.

        A pinned meter has no bcc tables (KeyError): use ``maps[name]``, the map's fd.
        """
        if self.bpf is None:
            raise KeyError(f"{name}: no bcc tables in a pinned meter (its maps are raw fds: maps[{name!r}])")
        return self.bpf.table(name)

def _own_key(src: bytes, sport: int, dst: bytes, dport: int) -> bytes:
    k = np.zeros((), dtype=abi.OWN_KEY_DTYPE)
    k["src_addr"] = src
    k["dst_addr"] = dst
    k["src_port"] = sport
    k["dst_port"] = dport
    return k.tobytes()
