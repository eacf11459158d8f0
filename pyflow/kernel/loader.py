"""The flow meter's kernel lifecycle: compile, load, attach, detach.

``FlowMeter`` is a context manager: whatever happens inside the ``with``
block (return, exception, SIGTERM turned into an exception), every
attachment is removed on the way out, exactly once.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import os
import platform
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pyflow.errors import KernelError
from pyflow.kernel import abi
from pyflow.kernel.bpfsys import MapBatchReader

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2

XDP_MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}

#: Hook names (the metrics' "hook" label) -> program entry point.
PROGRAMS = {"xdp": "pyflow_xdp", "tc_ingress": "pyflow_tc_ingress", "tc_egress": "pyflow_tc_egress"}
#: clsact parents of the TC hooks (TC_H_CLSACT:TC_H_MIN_INGRESS / _EGRESS).
TC_PARENTS = {"tc_ingress": 0xFFFFFFF2, "tc_egress": 0xFFFFFFF3}
#: Our TC filters run first (priority 1) and return TC_ACT_UNSPEC, so every
#: filter after them still runs as if pyflow were not there.
TC_PRIORITY = 1
TC_HANDLE = 0x1


@dataclass(frozen=True)
class KernelSettings:
    """What the program is compiled with (passed as -D flags)."""

    cache_entries: int = 65536
    inactive_timeout_ns: int = 15_000_000_000
    end_idle_ns: int = 2_000_000_000
    max_ipv6_ext: int = 6
    spill_ring_pages: int = 64
    # per-flow detail the kernel keeps (off = no per-packet or first-packet cost)
    ttl: bool = True  # min/max TTL, per packet
    length: bool = True  # min/max IP total length, per packet
    fib: bool = True  # out-interface + gateway by bpf_fib_lookup, per new flow at ingress
    own_export: bool = True  # skip the agent's own export datagrams (one lookup per UDP packet at TC egress)
    # RouterOS packet sampling: interval packets sampled, then space skipped (space 0: 1 in interval); 0 = off
    sampling_interval: int = 0
    sampling_space: int = 0

    def __post_init__(self) -> None:
        # Only integers reach the compiler: a value that is not one cannot inject code.
        for name in ("cache_entries", "inactive_timeout_ns", "end_idle_ns", "max_ipv6_ext", "spill_ring_pages"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise KernelError(f"kernel setting {name}={value!r} is not a positive integer")
        for name in ("sampling_interval", "sampling_space"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < 2**31:
                raise KernelError(f"kernel setting {name}={value!r} is not an integer in 0..2^31-1")
        if self.sampling_space and not self.sampling_interval:
            raise KernelError("sampling-space needs a sampling-interval")
        for name in ("ttl", "length", "fib", "own_export"):
            if type(getattr(self, name)) is not bool:
                raise KernelError(f"kernel setting {name}={getattr(self, name)!r} is not a boolean")

    def cflags(self) -> list[str]:
        return [
            f"-DCACHE_ENTRIES={self.cache_entries}",
            f"-DINACTIVE_NS={self.inactive_timeout_ns}ULL",
            f"-DEND_IDLE_NS={self.end_idle_ns}ULL",
            f"-DMAX_IPV6_EXT={self.max_ipv6_ext}",
            f"-DSPILL_RING_PAGES={self.spill_ring_pages}",
            f"-DPF_F_TTL={int(self.ttl)}",
            f"-DPF_F_LENGTH={int(self.length)}",
            f"-DPF_F_FIB={int(self.fib)}",
            f"-DPF_OWN_EXPORT={int(self.own_export)}",
            f"-DSAMPLING_INTERVAL={self.sampling_interval}",
            f"-DSAMPLING_SPACE={self.sampling_space}",
        ]


@dataclass
class Attachment:
    ifname: str
    ifindex: int
    hook: str  # "xdp", "tc_ingress" or "tc_egress"
    mode: str  # XDP: "native" or "generic"; TC: "clsact"
    created_qdisc: bool = False  # TC: we added the clsact qdisc (and remove it if it is left empty)


def _import_bcc() -> Any:
    try:
        import bcc
    except ImportError as exc:
        raise KernelError(
            "the bcc Python module is missing: install the distribution package python3-bpfcc "
            "(`sudo make setup` does) and run pyflow from a virtualenv made with "
            "/usr/bin/python3 -m venv --system-site-packages (never `pip install bcc`: "
            "that PyPI name is an unrelated project)"
        ) from exc
    return bcc


def headers_dir() -> Path:
    return Path("/lib/modules") / platform.release() / "build"


def check_environment() -> None:
    """Fail early, with the fix, on the usual reasons bcc cannot work."""
    if os.geteuid() != 0:
        raise KernelError(
            "pyflow needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) to load and attach eBPF "
            "programs: run it with sudo"
        )
    hdr = headers_dir()
    if not (hdr / "include").exists() and not (hdr / "Makefile").exists():
        raise KernelError(
            f"kernel headers for {platform.release()} not found at {hdr}: bcc compiles the meter "
            f"against them. Install linux-headers-{platform.release()} (`sudo make setup` does, "
            "or links the distribution's generic headers when no exact package exists)"
        )


def ifindex_of(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise KernelError(f"no such interface: {ifname!r} (see `ip link`)") from None


class FlowMeter:
    """One compiled and loaded flow meter program and its attachments."""

    PROG_NAME = PROGRAMS["xdp"]

    def __init__(self, settings: KernelSettings, bpf_dir: Path = abi.BPF_DIR) -> None:
        self.settings = settings
        self.bpf_dir = bpf_dir
        self.bpf: Any = None
        self.prog_fd: int | None = None
        self._progs: dict[str, Any] = {}
        self.attachments: dict[tuple[str, str], Attachment] = {}
        self._reader: MapBatchReader | None = None
        self._own_exports: set[tuple[str, int, str, int]] = set()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------

    def compile(self) -> None:
        check_environment()
        bcc = _import_bcc()
        src = self.bpf_dir / "flowmeter.c"
        if not src.exists():
            raise KernelError(f"eBPF source not found: {src}")
        cflags = [f"-I{self.bpf_dir}", "-Wno-unused-function", *self.settings.cflags()]
        try:
            self.bpf = bcc.BPF(src_file=str(src).encode(), cflags=cflags)
        except Exception as exc:
            raise KernelError(f"compiling {src} with bcc failed: {exc} (compiler output above)") from exc

    def load(self, hook: str = "xdp") -> int:
        """Load the program of ``hook`` (compiling first if needed); its fd."""
        if hook in self._progs:
            return int(self._progs[hook].fd)
        if hook not in PROGRAMS:
            raise KernelError(f"unknown hook {hook!r} (one of {', '.join(PROGRAMS)})")
        if self.bpf is None:
            self.compile()
        bcc = _import_bcc()
        name = PROGRAMS[hook]
        prog_type = bcc.BPF.XDP if hook == "xdp" else bcc.BPF.SCHED_CLS
        try:
            prog = self.bpf.load_func(name.encode(), prog_type)
        except Exception as exc:
            msg = str(exc)
            if "Permission denied" in msg or "Invalid argument" in msg:
                raise KernelError(
                    f"the kernel verifier rejected {name}: {msg} (the verifier log is printed above)"
                ) from exc
            raise KernelError(f"loading {name} failed: {msg}") from exc
        self._progs[hook] = prog
        if hook == "xdp":
            self.prog_fd = int(prog.fd)
        return int(prog.fd)

    def prog_fd_of(self, hook: str) -> int:
        """The fd of ``hook``'s program, loading it if needed."""
        return self.load(hook)

    def attach(self, ifname: str, mode: str = "auto", hook: str = "xdp") -> Attachment:
        """Attach ``hook``'s program to ``ifname``.

        XDP: native first, generic if the driver lacks it (``mode`` auto), or
        the given mode.  TC: a clsact qdisc (added if missing) and a
        direct-action filter on its ingress or egress side.
        """
        if (ifname, hook) in self.attachments:
            return self.attachments[(ifname, hook)]
        if hook not in PROGRAMS:
            raise KernelError(f"unknown hook {hook!r} (one of {', '.join(PROGRAMS)})")
        fd = self.load(hook)
        ifindex = ifindex_of(ifname)
        att = self._attach_xdp(ifname, ifindex, mode) if hook == "xdp" else self._attach_tc(ifname, ifindex, hook, fd)
        self.attachments[(ifname, hook)] = att
        return att

    def _attach_xdp(self, ifname: str, ifindex: int, mode: str) -> Attachment:
        modes = ["native", "generic"] if mode == "auto" else [mode]
        if any(m not in XDP_MODES for m in modes):
            raise KernelError(f"unknown XDP mode {mode!r} (auto, native or generic)")
        errors = []
        for m in modes:
            try:
                self.bpf.attach_xdp(ifname.encode(), self._progs["xdp"], XDP_MODES[m] | XDP_FLAGS_UPDATE_IF_NOEXIST)
            except Exception as exc:
                errors.append(f"{m}: {exc}")
                if "busy" in str(exc).lower():
                    raise KernelError(
                        f"{ifname} already has an XDP program attached ({exc}); pyflow does not replace "
                        f"another program. Remove it with `ip link set dev {ifname} xdp off` if it is stale, "
                        f"or meter {ifname} with hook=tc"
                    ) from exc
                continue
            return Attachment(ifname=ifname, ifindex=ifindex, hook="xdp", mode=m)
        raise KernelError(f"cannot attach XDP to {ifname}: " + "; ".join(errors))

    def _attach_tc(self, ifname: str, ifindex: int, hook: str, fd: int) -> Attachment:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        created = False
        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
                created = True
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise KernelError(f"cannot add a clsact qdisc to {ifname}: {exc}") from exc
            try:
                ipr.tc("add-filter", "bpf", ifindex, TC_HANDLE, fd=fd, name=PROGRAMS[hook],
                       parent=TC_PARENTS[hook], classid=1, direct_action=True, prio=TC_PRIORITY)
            except NetlinkError as exc:
                if created:
                    _quiet(lambda: ipr.tc("del", "clsact", ifindex))
                if exc.code == errno.EEXIST:
                    raise KernelError(
                        f"{ifname} already has a TC filter at {hook.replace('_', ' ')} priority {TC_PRIORITY} "
                        f"handle {TC_HANDLE}; pyflow does not replace it (see `tc filter show dev {ifname} "
                        f"{'ingress' if hook == 'tc_ingress' else 'egress'}`)"
                    ) from exc
                raise KernelError(f"cannot attach the TC program to {ifname} ({hook}): {exc}") from exc
        return Attachment(ifname=ifname, ifindex=ifindex, hook=hook, mode="clsact", created_qdisc=created)

    def detach(self, ifname: str, hook: str | None = None) -> None:
        """Remove our program(s) from ``ifname`` (every hook, or one); a no-op when not attached."""
        for key in [k for k in self.attachments if k[0] == ifname and hook in (None, k[1])]:
            att = self.attachments.pop(key)
            if self.bpf is None:
                continue
            try:
                if att.hook == "xdp":
                    self.bpf.remove_xdp(ifname.encode(), XDP_MODES[att.mode])
                else:
                    self._detach_tc(att)
            except Exception as exc:  # the interface may be gone already
                print(f"pyflow: detaching {att.hook} from {ifname}: {exc}", file=sys.stderr)

    @staticmethod
    def _detach_tc(att: Attachment) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            try:
                ipr.tc("del-filter", "bpf", att.ifindex, TC_HANDLE, parent=TC_PARENTS[att.hook], prio=TC_PRIORITY)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise
            if att.created_qdisc:
                # ours, and nobody else's filters in it: remove it again
                others = [f for f in ipr.get_filters(att.ifindex, parent=0xFFFFFFF2)
                          + ipr.get_filters(att.ifindex, parent=0xFFFFFFF3) if f.get_attr("TCA_KIND")]
                if not others:
                    _quiet(lambda: ipr.tc("del", "clsact", att.ifindex))

    def take_over(self, old: FlowMeter) -> None:
        """Put this meter's programs where ``old``'s are, atomically, interface by interface.

        XDP: attaching without ``XDP_FLAGS_UPDATE_IF_NOEXIST`` replaces the
        program in one step; TC: ``tc filter replace`` at the same priority and
        handle.  No packet meets neither program, none meets both.  ``old``
        forgets its attachments (detaching them now would remove ours).
        """
        for (ifname, hook), att in list(old.attachments.items()):
            fd = self.load(hook)
            if hook == "xdp":
                self.bpf.attach_xdp(ifname.encode(), self._progs["xdp"], XDP_MODES[att.mode])
            else:
                from pyroute2 import IPRoute

                with IPRoute() as ipr:
                    ipr.tc("replace-filter", "bpf", att.ifindex, TC_HANDLE, fd=fd, name=PROGRAMS[hook],
                           parent=TC_PARENTS[hook], classid=1, direct_action=True, prio=TC_PRIORITY)
            self.attachments[(ifname, hook)] = dataclasses.replace(att)
        old.attachments.clear()

    def forget(self, ifname: str) -> None:
        """Drop the attachments of an interface that no longer exists (its programs went with it)."""
        for key in [k for k in self.attachments if k[0] == ifname]:
            del self.attachments[key]

    def rename(self, old: str, new: str) -> None:
        """An attached interface was renamed (same ifindex): keep its attachments under the new name."""
        for key in [k for k in self.attachments if k[0] == old]:
            att = self.attachments.pop(key)
            att.ifname = new
            self.attachments[(new, key[1])] = att

    def detach_all(self) -> None:
        for ifname, hook in list(self.attachments):
            self.detach(ifname, hook)

    def close(self) -> None:
        """Detach everything and release the program and maps. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.detach_all()
        if self.bpf is not None:
            self.bpf.cleanup()

    # -- own exports -----------------------------------------------------------

    def exclude_own_export(self, src: str, src_port: int, dst: str, dst_port: int) -> None:
        """Never meter UDP datagrams with this 4-tuple: the agent's own exports."""
        from pyflow.records import addr_to_16

        if (src, src_port, dst, dst_port) in self._own_exports:
            return
        self._own_exports.add((src, src_port, dst, dst_port))
        table = self.table("own_export")
        key = table.Key()
        ctypes.memmove(ctypes.addressof(key), _own_key(addr_to_16(src), src_port, addr_to_16(dst), dst_port), 36)
        table[key] = ctypes.c_uint8(1)

    def __enter__(self) -> FlowMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- maps ------------------------------------------------------------------

    def table(self, name: str) -> Any:
        """A bcc table of the program by name (bcc wants bytes names)."""
        return self.bpf[name.encode()]

    @property
    def flows_fd(self) -> int:
        return int(self.table("flows").map_fd)

    def read_flows(self) -> tuple[np.ndarray, np.ndarray]:
        """All entries of the flow cache as (keys, values) views (see MapBatchReader)."""
        if self._reader is None:
            self._reader = MapBatchReader(self.flows_fd, abi.FLOW_KEY_DTYPE, abi.FLOW_VALUE_DTYPE,
                                          self.settings.cache_entries)
        return self._reader.read()

    def read_iface_stats(self) -> dict[tuple[int, int], np.ndarray]:
        """Per (ifindex, hook): the counters summed over CPUs, as one IFACE_STATS_DTYPE record.

        Key (0, 0) holds what the overflow slot counted (interfaces beyond
        MAX_IFACE_STATS); it is normally absent.
        """
        out: dict[tuple[int, int], np.ndarray] = {}
        slots = self.table("iface_slots")
        for slot, per_cpu in slots.items():
            total = _sum_cpus(per_cpu)
            if total["counters"].any():
                ifindex, hook = divmod(int(slot.value), len(abi.Hook))
                out[(ifindex, hook)] = total
        for k, per_cpu in self.table("iface_stats").items():
            out[(int(k.ifindex), int(k.hook))] = _sum_cpus(per_cpu)
        (overflow,) = [v for _, v in self.table("overflow_stats").items()]
        total = _sum_cpus(overflow)
        if total["counters"].any():
            out[(0, 0)] = total
        return out

    def flows_created(self) -> int:
        """Entries the kernel has created since the program was loaded (all CPUs)."""
        return int(sum(self.table("flow_seq").getvalue(ctypes.c_int(0))))

    def read_counters(self) -> dict[abi.Counter, int]:
        """The counters summed over every interface, hook and CPU."""
        totals = np.zeros(abi.COUNTER_MAX, dtype=np.uint64)
        for st in self.read_iface_stats().values():
            totals += st["counters"]
        return {c: int(totals[c]) for c in abi.Counter}

    def barrier(self) -> None:
        """Wait until every program run that started before this call has ended.

        Updating a map-in-map element makes the kernel wait for an RCU grace
        period (synchronize_rcu), and the meter runs inside an RCU read-side
        section; this is the barrier of the idle-delete protocol.
        """
        outer = self.table("barrier")
        inner = self.table("barrier_inner")
        outer[ctypes.c_int(0)] = ctypes.c_int(inner.map_fd)

    def open_spill(self, callback: Callable[[np.ndarray], None]) -> None:
        """Deliver spill events (as SPILL_EVENT_DTYPE arrays of one) to ``callback``."""

        def _cb(_ctx: Any, data: Any, size: int) -> int:
            raw = ctypes.string_at(data, size)
            callback(np.frombuffer(raw, dtype=abi.SPILL_EVENT_DTYPE, count=1).copy())
            return 0

        self.table("spill").open_ring_buffer(_cb)

    def poll_spill(self) -> None:
        self.bpf.ring_buffer_consume()


def _own_key(src: bytes, sport: int, dst: bytes, dport: int) -> bytes:
    k = np.zeros((), dtype=abi.OWN_KEY_DTYPE)
    k["src_addr"] = src
    k["dst_addr"] = dst
    k["src_port"] = sport
    k["dst_port"] = dport
    return k.tobytes()


def _quiet(fn: Callable[[], object]) -> None:
    with contextlib.suppress(Exception):  # best effort clean-up of what we created
        fn()


def _sum_cpus(per_cpu: Any) -> np.ndarray:
    """bcc's per-CPU value (one ctypes struct per CPU) summed into one IFACE_STATS_DTYPE record."""
    raw = b"".join(bytes(v) for v in per_cpu)
    arr = np.frombuffer(raw, dtype=abi.IFACE_STATS_DTYPE)
    out = np.zeros((), dtype=abi.IFACE_STATS_DTYPE)
    out["counters"] = arr["counters"].sum(axis=0)
    out["metered_bytes"] = arr["metered_bytes"].sum()
    return out
