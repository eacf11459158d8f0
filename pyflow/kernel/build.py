"""Building the meter with bcc: the one module of pyflow that imports bcc.

``compile_program`` compiles bpf/flowmeter.c with the settings' -D flags and names every map
the program has (bcc's C API); ``BccProgram.load`` loads one entry point and answers its fd.
The agent itself never builds: ``pyflow run`` compiles in a short-lived child
(pyflow/kernel/child.py) and opens what it pinned.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyflow.errors import KernelError
from pyflow.kernel import caps
from pyflow.kernel.settings import KernelSettings


def import_bcc() -> Any:
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


def check_root() -> None:
    if os.geteuid() != 0:
        raise KernelError(
            "pyflow needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) to load and attach eBPF "
            "programs: run it with sudo"
        )


def check_load_privileges() -> None:
    """Root, or (the compile child of an agent run with ``--user``) CAP_BPF, CAP_NET_ADMIN and
    CAP_PERFMON effective: what loading the meter takes."""
    if os.geteuid() == 0:
        return
    eff = caps.current()["CapEff"]
    if all(eff >> c & 1 for c in (caps.CAP_BPF, caps.CAP_NET_ADMIN, caps.CAP_PERFMON)):
        return
    check_root()


def check_environment() -> None:
    """Fail early, with the fix, on the usual reasons bcc cannot work."""
    check_load_privileges()
    hdr = headers_dir()
    if not (hdr / "include").exists() and not (hdr / "Makefile").exists():
        raise KernelError(
            f"kernel headers for {platform.release()} not found at {hdr}: bcc compiles the meter "
            f"against them. Install linux-headers-{platform.release()} (`sudo make setup` does, "
            "or links the distribution's generic headers when no exact package exists)"
        )


@dataclass
class BccProgram:
    """The meter compiled by bcc in this process: its maps by name, its entry points on demand."""

    bpf: Any
    maps: dict[str, int] = field(default_factory=dict)

    def load(self, name: str, xdp: bool) -> int:
        """Load entry point ``name`` (XDP, else TC); its program fd."""
        bcc = import_bcc()
        try:
            prog = self.bpf.load_func(name.encode(), bcc.BPF.XDP if xdp else bcc.BPF.SCHED_CLS)
        except Exception as exc:
            msg = str(exc)
            if "Permission denied" in msg or "Invalid argument" in msg:
                raise KernelError(
                    f"the kernel verifier rejected {name}: {msg} (the verifier log is printed above)"
                ) from exc
            raise KernelError(f"loading {name} failed: {msg}") from exc
        return int(prog.fd)

    def table(self, name: str) -> Any:
        return self.bpf[name.encode()]

    def cleanup(self) -> None:
        self.bpf.cleanup()


def compile_program(settings: KernelSettings, bpf_dir: Path) -> BccProgram:
    """Compile bpf/flowmeter.c with ``settings``; every map of the program by its name."""
    check_environment()
    bcc = import_bcc()
    src = bpf_dir / "flowmeter.c"
    if not src.exists():
        raise KernelError(f"eBPF source not found: {src}")
    cflags = [f"-I{bpf_dir}", "-Wno-unused-function", *settings.cflags()]
    try:
        bpf = bcc.BPF(src_file=str(src).encode(), cflags=cflags)
    except Exception as exc:
        raise KernelError(f"compiling {src} with bcc failed: {exc} (compiler output above)") from exc
    # every map of the program by its name (bcc's C API; the Python one only looks up by name)
    lib = bcc.lib
    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    program = BccProgram(bpf)
    for i in range(int(lib.bpf_num_tables(bpf.module))):
        name = lib.bpf_table_name(bpf.module, i)
        fd = int(lib.bpf_table_fd(bpf.module, name))
        if fd >= 0:
            program.maps[name.decode()] = fd
    return program
