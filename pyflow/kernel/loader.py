"""The flow meter's kernel lifecycle: compile, load, attach, detach.

``FlowMeter`` is a context manager: whatever happens inside the ``with``
block (return, exception, SIGTERM turned into an exception), every
attachment is removed on the way out, exactly once.
"""

from __future__ import annotations

import ctypes
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


@dataclass(frozen=True)
class KernelSettings:
    """What the program is compiled with (passed as -D flags)."""

    cache_entries: int = 65536
    inactive_timeout_ns: int = 15_000_000_000
    end_idle_ns: int = 2_000_000_000
    max_ipv6_ext: int = 6
    spill_ring_pages: int = 64

    def cflags(self) -> list[str]:
        return [
            f"-DCACHE_ENTRIES={self.cache_entries}",
            f"-DINACTIVE_NS={self.inactive_timeout_ns}ULL",
            f"-DEND_IDLE_NS={self.end_idle_ns}ULL",
            f"-DMAX_IPV6_EXT={self.max_ipv6_ext}",
            f"-DSPILL_RING_PAGES={self.spill_ring_pages}",
        ]


@dataclass
class Attachment:
    ifname: str
    ifindex: int
    hook: str  # "xdp"
    mode: str  # "native" or "generic"


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

    PROG_NAME = "pyflow_xdp"

    def __init__(self, settings: KernelSettings, bpf_dir: Path = abi.BPF_DIR) -> None:
        self.settings = settings
        self.bpf_dir = bpf_dir
        self.bpf: Any = None
        self.prog_fd: int | None = None
        self._prog: Any = None
        self.attachments: dict[str, Attachment] = {}
        self._reader: MapBatchReader | None = None
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

    def load(self) -> int:
        if self.bpf is None:
            self.compile()
        bcc = _import_bcc()
        try:
            self._prog = self.bpf.load_func(self.PROG_NAME.encode(), bcc.BPF.XDP)
        except Exception as exc:
            msg = str(exc)
            if "Permission denied" in msg or "Invalid argument" in msg:
                raise KernelError(
                    f"the kernel verifier rejected {self.PROG_NAME}: {msg} (the verifier log is printed above)"
                ) from exc
            raise KernelError(f"loading {self.PROG_NAME} failed: {msg}") from exc
        self.prog_fd = int(self._prog.fd)
        return self.prog_fd

    def attach(self, ifname: str, mode: str = "auto") -> Attachment:
        """Attach XDP to ``ifname``: native first, generic if the driver lacks it."""
        if ifname in self.attachments:
            return self.attachments[ifname]
        if self.prog_fd is None:
            self.load()
        ifindex = ifindex_of(ifname)
        modes = ["native", "generic"] if mode == "auto" else [mode]
        if any(m not in XDP_MODES for m in modes):
            raise KernelError(f"unknown XDP mode {mode!r} (auto, native or generic)")
        errors = []
        for m in modes:
            try:
                self.bpf.attach_xdp(ifname.encode(), self._prog, XDP_MODES[m] | XDP_FLAGS_UPDATE_IF_NOEXIST)
            except Exception as exc:
                errors.append(f"{m}: {exc}")
                if "busy" in str(exc).lower():
                    raise KernelError(
                        f"{ifname} already has an XDP program attached ({exc}); pyflow does not replace "
                        f"another program. Remove it with `ip link set dev {ifname} xdp off` if it is stale"
                    ) from exc
                continue
            att = Attachment(ifname=ifname, ifindex=ifindex, hook="xdp", mode=m)
            self.attachments[ifname] = att
            return att
        raise KernelError(f"cannot attach XDP to {ifname}: " + "; ".join(errors))

    def detach(self, ifname: str) -> None:
        """Remove our program from ``ifname``; a no-op when it is not attached."""
        att = self.attachments.pop(ifname, None)
        if att is None or self.bpf is None:
            return
        try:
            self.bpf.remove_xdp(ifname.encode(), XDP_MODES[att.mode])
        except Exception as exc:  # the interface may be gone already
            print(f"pyflow: detaching from {ifname}: {exc}", file=sys.stderr)

    def detach_all(self) -> None:
        for ifname in list(self.attachments):
            self.detach(ifname)

    def close(self) -> None:
        """Detach everything and release the program and maps. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.detach_all()
        if self.bpf is not None:
            self.bpf.cleanup()

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


def _sum_cpus(per_cpu: Any) -> np.ndarray:
    """bcc's per-CPU value (one ctypes struct per CPU) summed into one IFACE_STATS_DTYPE record."""
    raw = b"".join(bytes(v) for v in per_cpu)
    arr = np.frombuffer(raw, dtype=abi.IFACE_STATS_DTYPE)
    out = np.zeros((), dtype=abi.IFACE_STATS_DTYPE)
    out["counters"] = arr["counters"].sum(axis=0)
    out["metered_bytes"] = arr["metered_bytes"].sum()
    return out
