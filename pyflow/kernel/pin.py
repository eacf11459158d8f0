"""Pinned flow meter instances: what outlives the agent, and the raw kernel calls to use it.

The agent never compiles: ``compile_pinned`` runs a short-lived child
(``python -m pyflow.kernel.child compile``) that compiles and loads the meter
with bcc, pins every map and program under a *generation* directory of this
network namespace's bpffs directory, and exits; LLVM's memory goes with it.
The agent opens the pins by path and works on raw file descriptors:

    /sys/fs/bpf/pyflow/netns-<inode>/gen-<time>/
        flows resumed iface_slots iface_stats overflow_stats flow_seq fin_seen own_export
        barrier barrier_inner evict_before [sample_pos]   the program's maps (bcc's names)
        pf_exported                               the agent's baseline: flow id ->
                                                  packets, bytes, record start exported
        pf_manifest                               one JSON document: settings, source
                                                  hash, ids, attachments
        prog_xdp prog_tc_ingress prog_tc_egress   the three programs

Every map is also bound to every program (BPF_PROG_BIND_MAP, Linux 5.10), so
any one attached program holds *all* of its instance's state, the agent's
baseline and the manifest included: an agent that finds no pins (``ip netns exec`` gives every
run a fresh mount namespace, so the bpffs it mounted is gone with it) still
finds the programs attached to its interfaces (by id) and, through them,
every map including the baseline (``find_instances``).

Attachments are made through rtnetlink (XDP and TC alike, pyflow/kernel/netlink.py): they stay
in the kernel when the agent dies, so packets go on being counted until a new agent
takes over.  One agent per network namespace: ``InstanceLock`` (flock on
/run/pyflow/netns-<inode>.lock).

Also here: the bpf(2) commands the agent needs beyond bpfsys (pin/get, ids,
info, map create/update, prog bind map) and per-CPU reads.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyflow.errors import KernelError, PyflowError
from pyflow.kernel import abi, bpfsys, caps
from pyflow.kernel.bpfsys import (
    BpfError,
    map_fd_by_id,
    map_info,
    map_lookup,
    map_update,
    prog_fd_by_id,
    prog_ids,
    prog_info,
)
from pyflow.kernel.libc import libc as _libc
from pyflow.kernel.settings import KernelSettings
from pyflow.paths import netns_id

BPFFS_ROOT = Path("/sys/fs/bpf")
RUN_DIR = Path("/run/pyflow")
BPF_FS_MAGIC = 0xCAFE4A11
FORMAT = 1  # manifest format

#: The agent's own maps, created next to the program's.
EXPORTED = "pf_exported"
MANIFEST = "pf_manifest"
MANIFEST_SIZE = 64 * 1024
#: The export session (opaque to this layer: sequence numbers, template clocks, source ports),
#: rewritten as it changes, so the next agent goes on with it.  Optional: an instance pinned by
#: an earlier version has none, and its successor starts a new session.
SESSION = "pf_session"
SESSION_SIZE = 16 * 1024
#: What the agent remembers of a flow cut by the active timeout (sweep.Baseline, one row).
EXPORTED_VALUE_DTYPE = np.dtype([("packets", "<u8"), ("bytes", "<u8"), ("start_ns", "<u8")])
#: Every map of an instance, as bcc names them (sample_pos only exists with sampling on).
PROGRAM_MAPS = ("flows", "resumed", "iface_slots", "iface_stats", "overflow_stats", "l3_links", "l3_links_big",
                "flow_seq", "fin_seen",
                "own_export", "barrier", "barrier_inner", "evict_before", "sample_pos")
REQUIRED_MAPS = ("flows", "resumed", "iface_slots", "iface_stats", "overflow_stats", "l3_links", "l3_links_big",
                 "flow_seq", "fin_seen",
                 "own_export", "barrier", "barrier_inner", "evict_before", EXPORTED, MANIFEST)
#: key and value sizes the agent reads them with (a pinned map that differs is not ours to read)
MAP_SIZES = {
    "flows": (abi.FLOW_KEY_DTYPE.itemsize, abi.FLOW_VALUE_DTYPE.itemsize),
    "resumed": (abi.FLOW_KEY_DTYPE.itemsize, abi.FLOW_VALUE_DTYPE.itemsize),
    "iface_slots": (4, abi.IFACE_STATS_DTYPE.itemsize),
    "iface_stats": (abi.IFACE_KEY_DTYPE.itemsize, abi.IFACE_STATS_DTYPE.itemsize),
    "overflow_stats": (4, abi.IFACE_STATS_DTYPE.itemsize),
    "l3_links": (4, 1),
    "l3_links_big": (4, 1),
    "flow_seq": (4, 8),
    "fin_seen": (4, 8),
    "own_export": (abi.OWN_KEY_DTYPE.itemsize, 1),
    "evict_before": (4, 8),
    EXPORTED: (8, EXPORTED_VALUE_DTYPE.itemsize),
    MANIFEST: (4, MANIFEST_SIZE),
    SESSION: (4, SESSION_SIZE),
}
HOOKS = ("xdp", "tc_ingress", "tc_egress")
PROG_PREFIX = "prog_"
#: program names as the kernel keeps them (BPF_OBJ_NAME_LEN: 15 characters)
KERNEL_PROG_NAMES = {"pyflow_xdp": "xdp", "pyflow_tc_ingre": "tc_ingress", "pyflow_tc_egres": "tc_egress"}



def _errno_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


#: bpffs directories held open (O_PATH) and reached through /proc/self/fd: after ``--user``
#: the agent may not search /sys/fs/bpf (root's, mode 0700), only what lies below its fd
_REACH: dict[Path, int] = {}


def reach(path: Path | str) -> Path:
    """Where the agent (or a child given ``reach_fds()``) finds ``path``: through a held directory."""
    path = Path(path)
    for base, fd in _REACH.items():
        if path == base or base in path.parents:
            return Path(f"/proc/self/fd/{fd}") / path.relative_to(base)
    return path


def reach_fds() -> tuple[int, ...]:
    return tuple(_REACH.values())


def obj_pin(fd: int, path: str | Path) -> None:
    """BPF_OBJ_PIN: ``fd``'s map or program stays alive at ``path`` (in a bpffs)."""
    bpfsys.obj_pin(fd, os.fsencode(str(reach(path))))


def obj_get(path: str | Path) -> int:
    """BPF_OBJ_GET: a new fd on what is pinned at ``path``."""
    return bpfsys.obj_get(os.fsencode(str(reach(path))))


# -- bpffs and the instance directory ------------------------------------------------


def is_bpffs(path: Path) -> bool:
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is its first word (a long)
    if _libc.statfs(os.fsencode(str(path)), buf) != 0:
        return False
    return int(struct.unpack_from("=l", buf.raw)[0]) & 0xFFFFFFFF == BPF_FS_MAGIC


def ensure_bpffs(root: Path = BPFFS_ROOT) -> bool:
    """Mount a bpffs at ``root`` unless one is there; True if this call mounted it.

    ``ip netns exec`` remounts /sys for the namespace, without the host's
    bpffs: the mount made here then belongs to that run's mount namespace.
    """
    if is_bpffs(root):
        return False
    ms_nosuid, ms_nodev, ms_noexec = 2, 4, 8
    if _libc.mount(b"bpf", os.fsencode(str(root)), b"bpf", ms_nosuid | ms_nodev | ms_noexec, b"mode=0700") != 0:
        err = ctypes.get_errno()
        raise KernelError(f"no bpffs at {root} and mounting one failed: {os.strerror(err)} (pyflow pins its maps "
                          f"there; mount it with `mount -t bpf bpf {root}`, or run pyflow as root)")
    return True


def source_hash(bpf_dir: Path = abi.BPF_DIR) -> str:
    """What the program is built from: a pinned program from other sources is another program."""
    h = hashlib.sha256()
    for name in ("flowmeter.c", "flowmeter.h"):
        try:
            data = (bpf_dir / name).read_bytes()
        except OSError as exc:
            raise KernelError(f"cannot read the eBPF source {bpf_dir / name}: {exc.strerror} (with --user, that user "
                              "must be able to read pyflow's files, as it can where pyflow is installed)") from None
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:16]


class InstanceLock:
    """One agent per network namespace: an flock on /run/pyflow/netns-<inode>.lock, held while it runs."""

    def __init__(self, netns: int, run_dir: Path = RUN_DIR) -> None:
        self.path = run_dir / f"netns-{netns}.lock"
        self.fd: int | None = None

    def acquire(self, pins: Path) -> None:
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PyflowError(
                f"another pyflow agent (pid {holder}) is running in this network namespace (net:[{self.path.stem[6:]}]"
                f"); its kernel program is pinned under {pins}. One agent per network namespace: stop that one "
                f"first (it holds {self.path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class NetnsPins:
    """This network namespace's directory in bpffs, held by one agent at a time."""

    def __init__(self, root: Path = BPFFS_ROOT, run_dir: Path = RUN_DIR, netns: int | None = None) -> None:
        self.netns = netns_id()[1] if netns is None else netns
        self.root = root
        self.dir = root / "pyflow" / f"netns-{self.netns}"
        self.lock = InstanceLock(self.netns, run_dir)
        self.mounted = False
        self.base_fd: int | None = None

    def open(self, log: Callable[[str], None]) -> None:
        """Take the lock (a second agent is refused before it touches anything), mount bpffs if needed."""
        self.lock.acquire(self.dir)
        try:
            self.mounted = ensure_bpffs(self.root)
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.base_fd = os.open(self.dir.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            self.lock.release()
            raise
        _REACH[self.dir.parent] = self.base_fd
        if self.mounted:
            log(f"mounted a bpffs at {self.root} (none in this mount namespace; `ip netns exec` remounts /sys): "
                "the pins made there last as long as this mount namespace, the attached programs longer")

    def find(self, log: Callable[[str], None]) -> list[Instance]:
        return find_instances(self.dir, self.netns, log)

    def compile(self, settings: KernelSettings, bpf_dir: Path = abi.BPF_DIR) -> Instance:
        return compile_pinned(settings, self.dir, self.netns, bpf_dir)

    def give_to(self, uid: int, gid: int, gens: list[Path]) -> None:
        """Who owns what the agent writes after its start: this namespace's directory and the
        generations in it that the agent took (it creates, pins in and removes them from now on)
        become ``uid``'s.  For a user (``--user``), the directories every agent of the host shares
        (pyflow's in bpffs, the run directory: locks, control sockets) become writable by its group
        as well, and stay root's.  Nothing else changes hands."""
        for path in (self.dir, *gens):
            if uid == 0:  # back from a --user agent's: best effort (a unit without CAP_CHOWN)
                with contextlib.suppress(PermissionError):
                    os.chown(reach(path), uid, gid)
                continue
            os.chown(reach(path), uid, gid)
        if uid == 0:
            return
        for path in (self.dir.parent, self.lock.path.parent):
            st = os.stat(path)
            os.chown(path, -1, gid)
            os.chmod(path, (st.st_mode & 0o7777) | 0o070)

    def close(self) -> None:
        """Release the lock; remove this namespace's directory if no instance is left in it."""
        for path in (reach(self.dir), self.dir.parent):  # the second needs root (/sys/fs/bpf is root's)
            with contextlib.suppress(OSError):
                path.rmdir()
        if self.base_fd is not None:
            _REACH.pop(self.dir.parent, None)
            os.close(self.base_fd)
            self.base_fd = None
        self.lock.release()


# -- instances ----------------------------------------------------------------------


@dataclass
class Instance:
    """One loaded flow meter: its maps and programs as fds, its manifest, where it is pinned."""

    manifest: dict[str, Any]
    maps: dict[str, int]
    progs: dict[str, int]
    path: Path | None = None
    found_by: str = "pins"  # or "programs": found through attached programs (no pins left)
    owned_fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", "?"))

    @property
    def complete(self) -> bool:
        """Every entry point is there (found through its programs, the unattached ones may be gone)."""
        return all(h in self.progs for h in HOOKS)

    def settings(self) -> KernelSettings:
        """What it was compiled with (as far as this version knows the settings: enough to read
        and drain an instance another version left)."""
        known = {f.name for f in dataclasses.fields(KernelSettings)}
        doc = {k: v for k, v in dict(self.manifest.get("settings") or {}).items() if k in known}
        doc["cache_entries"] = map_info(self.maps["flows"]).max_entries
        try:
            return KernelSettings(**doc)
        except PyflowError:
            return KernelSettings(cache_entries=doc["cache_entries"])

    def built_with(self, settings: KernelSettings, source: str) -> bool:
        """Built from ``source`` (flowmeter.c/.h hash) with exactly ``settings``."""
        return self.manifest.get("source") == source and self.manifest.get("settings") == _settings_doc(settings)

    def prog_ids(self) -> dict[str, int]:
        return {hook: prog_info(fd).id for hook, fd in self.progs.items()}

    def close(self) -> None:
        for fd in self.owned_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.owned_fds.clear()
        self.maps.clear()
        self.progs.clear()


def create_own_maps(cache_entries: int) -> dict[str, int]:
    """The agent's own maps next to a new program's: what was exported, the manifest, the export session."""
    return {
        EXPORTED: bpfsys.map_create(bpfsys.BPF_MAP_TYPE_HASH, 8, EXPORTED_VALUE_DTYPE.itemsize, cache_entries,
                                    EXPORTED, flags=bpfsys.BPF_F_NO_PREALLOC),
        MANIFEST: bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY, 4, MANIFEST_SIZE, 1, MANIFEST),
        SESSION: bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY, 4, SESSION_SIZE, 1, SESSION),
    }


def read_manifest(fd: int) -> dict[str, Any]:
    raw = read_blob(fd, MANIFEST_SIZE)
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def write_manifest(fd: int, doc: dict[str, Any]) -> None:
    write_blob(fd, MANIFEST_SIZE, json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(), "manifest")


def read_blob(fd: int, size: int) -> bytes:
    """The bytes kept in a one-element array map of ``size``-byte values (length-prefixed); b"" if none."""
    raw = map_lookup(fd, b"\0\0\0\0", size)
    if raw is None:
        return b""
    (length,) = struct.unpack_from("=I", raw)
    return bytes(raw[4:4 + length]) if 0 < length <= size - 4 else b""


def write_blob(fd: int, size: int, data: bytes, what: str) -> None:
    if len(data) > size - 4:
        raise KernelError(f"the pinned {what} would be {len(data)} bytes, more than {size - 4}")
    map_update(fd, b"\0\0\0\0", struct.pack("=I", len(data)) + data + bytes(size - 4 - len(data)))


def _check_map(name: str, fd: int) -> None:
    if name not in MAP_SIZES:
        return
    info = map_info(fd)
    if (info.key_size, info.value_size) != MAP_SIZES[name]:
        raise KernelError(f"pinned map {name} has key/value sizes {info.key_size}/{info.value_size}, this pyflow "
                          f"reads {MAP_SIZES[name][0]}/{MAP_SIZES[name][1]}: not a map of this version")


def open_pinned(path: Path) -> Instance:
    """Open the maps and programs pinned in the generation directory ``path``."""
    inst = Instance(manifest={}, maps={}, progs={}, path=path)
    try:
        for entry in sorted(os.listdir(reach(path))):
            fd = obj_get(path / entry)
            inst.owned_fds.append(fd)
            if entry.startswith(PROG_PREFIX):
                inst.progs[entry[len(PROG_PREFIX):]] = fd
            else:
                _check_map(entry, fd)
                inst.maps[entry] = fd
        missing = [m for m in REQUIRED_MAPS if m not in inst.maps] + ([] if inst.progs else ["program"])
        if missing:
            raise KernelError(f"the pinned instance {path} is incomplete (no {', '.join(missing)})")
        inst.manifest = read_manifest(inst.maps[MANIFEST])
        if inst.manifest.get("format") != FORMAT:
            raise KernelError(f"the pinned instance {path} has no manifest this pyflow reads")
    except BaseException:
        inst.close()
        raise
    return inst


def pin_instance(inst: Instance, path: Path) -> None:
    """Pin every map and program of ``inst`` in the new directory ``path``."""
    reach(path.parent).mkdir(mode=0o700, parents=True, exist_ok=True)
    reach(path).mkdir(mode=0o700)
    try:
        for name, fd in inst.maps.items():
            obj_pin(fd, path / name)
        for hook, fd in inst.progs.items():
            obj_pin(fd, path / f"{PROG_PREFIX}{hook}")
    except BaseException:
        remove_pins(path)
        raise
    inst.path = path


def remove_pins(path: Path) -> None:
    """Unpin a generation: its objects live on only while something else holds them."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(reach(path))


def find_instances(netns_dir: Path, netns: int, log: Callable[[str], None]) -> list[Instance]:
    """Every instance this network namespace has: the pinned generations, then (needs
    CAP_SYS_ADMIN) loaded pyflow programs whose manifest names this namespace but that
    no pin leads to, re-pinned here.  Oldest first."""
    found: list[Instance] = []
    if reach(netns_dir).is_dir():
        for entry in sorted(os.listdir(reach(netns_dir))):
            path = netns_dir / entry
            if not entry.startswith("gen-") or not reach(path).is_dir():
                continue
            try:
                found.append(open_pinned(path))
            except (KernelError, OSError) as exc:
                log(foreign_message(path, exc))
    known = {map_info(i.maps[MANIFEST]).id for i in found}
    try:
        orphans = _programs_of(netns, known)
    except BpfError as exc:
        if exc.errno != errno.EPERM:
            raise
        if not found:
            log("no pinned instance here, and no CAP_SYS_ADMIN to look for programs an agent left attached "
                "without pins (only pins are taken over)")
        orphans = []
    for inst in orphans:
        path = netns_dir / inst.name
        if reach(path).exists() or not inst.name.startswith("gen-"):
            path = netns_dir / f"gen-{time.time_ns():020d}"
        pin_instance(inst, path)
        log(f"found the kernel program {inst.name} attached without pins (its agent ran in another mount "
            f"namespace); pinned it again at {path}")
        found.append(inst)
    found.sort(key=lambda i: (i.manifest.get("created_ns", 0), i.name))
    return found


def describe_pinned(path: Path) -> str:
    """What a pinned generation this pyflow does not read is, as far as can be told: its pins,
    and its manifest's format, version of the sources and age when there is one."""
    try:
        entries = sorted(os.listdir(reach(path)))
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    progs = [e[len(PROG_PREFIX):] for e in entries if e.startswith(PROG_PREFIX)]
    what = f"{len(entries) - len(progs)} map(s), program(s): {', '.join(progs) or 'none'}"
    doc: dict[str, Any] = {}
    if MANIFEST in entries:
        with contextlib.suppress(BpfError, OSError, ValueError, struct.error):
            fd = obj_get(path / MANIFEST)
            try:
                if map_info(fd).value_size == MANIFEST_SIZE:
                    doc = read_manifest(fd)
            finally:
                os.close(fd)
    if not doc:
        return f"{what}; no manifest this pyflow reads (another program's pins, or a pyflow before manifests)"
    created = doc.get("created_ns")
    age = f", made {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(created / 1e9))}" \
        if isinstance(created, int) else ""
    return (f"{what}; a pyflow instance of manifest format {doc.get('format')!r} (this pyflow reads {FORMAT}), "
            f"sources {doc.get('source', '?')}{age}")


def foreign_message(path: Path, exc: BaseException) -> str:
    """Why a pinned generation is left alone, what it is, and how to remove it."""
    return (f"leaving the pinned {path} alone: this pyflow cannot read it ({exc}). It holds "
            f"{describe_pinned(path)}. Its programs may still be attached and counting (`ip -d link show` "
            f"lists XDP programs by id, `tc filter show dev IFACE ingress` and `egress` the TC ones; "
            f"`bpftool prog show pinned {path}/{PROG_PREFIX}xdp` tells which): an interface where one is "
            f"cannot be metered by this pyflow until it is detached (`ip link set dev IFACE xdp off`, "
            f"`tc filter del dev IFACE ingress pref 1 handle 1 bpf`). Once nothing of it is needed, stop the "
            f"agent that made it, or export its flows with the pyflow version that made it, then remove it "
            f"with `rm -r {path}`")


def _programs_of(netns: int, known_manifests: set[int]) -> list[Instance]:
    groups: dict[int, Instance] = {}
    for pid in list(prog_ids()):
        try:
            pfd = prog_fd_by_id(pid)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                continue
            raise
        keep = False
        try:
            info = prog_info(pfd)
            hook = KERNEL_PROG_NAMES.get(info.name)
            if hook is None:
                continue
            maps: dict[str, int] = {}
            try:
                for mid in info.map_ids:
                    mfd = map_fd_by_id(mid)
                    mi = map_info(mfd)
                    if mi.name in maps:
                        os.close(mfd)
                        continue
                    maps[mi.name] = mfd
                manifest_fd = maps.get(MANIFEST)
                manifest = read_manifest(manifest_fd) if manifest_fd is not None else {}
                mid = map_info(manifest_fd).id if manifest_fd is not None else 0
                if manifest.get("format") != FORMAT or manifest.get("netns") != netns or mid in known_manifests:
                    continue
                inst = groups.setdefault(mid, Instance(manifest=manifest, maps={}, progs={}, found_by="programs"))
                if hook in inst.progs:
                    continue
                inst.progs[hook] = pfd
                inst.owned_fds.append(pfd)
                keep = True
                for name, fd in list(maps.items()):
                    if name in inst.maps:
                        continue
                    inst.maps[name] = fd
                    inst.owned_fds.append(fd)
                    del maps[name]
            finally:
                for fd in maps.values():
                    os.close(fd)
        finally:
            if not keep:
                os.close(pfd)
    out = []
    for inst in groups.values():
        # Only the attached programs outlive their agent: the others may be gone (such an
        # instance is drained and replaced, see Instance.complete); the maps are all bound.
        if any(m not in inst.maps for m in REQUIRED_MAPS):
            inst.close()
            continue
        out.append(inst)
    return out


# -- the compile child -------------------------------------------------------------------

RESULT_MARK = "PYFLOW-PIN-RESULT "


def _settings_doc(settings: KernelSettings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def compile_pinned(settings: KernelSettings, netns_dir: Path, netns: int,
                   bpf_dir: Path = abi.BPF_DIR, timeout: float = 120.0) -> Instance:
    """Compile and load in a short-lived child, pinned in a new generation of ``netns_dir``; open it.

    The child is ``python -m pyflow.kernel.child compile``: bcc and LLVM live and
    die there.  Its stderr (compiler and verifier output) passes through.
    """
    reach(netns_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f"gen-{time.time_ns():020d}"
    path = netns_dir / name
    argv = [sys.executable, "-m", "pyflow.kernel.child", "compile", "--dir", str(reach(path)), "--netns", str(netns),
            "--bpf-dir", str(bpf_dir), "--settings", json.dumps(_settings_doc(settings))]
    try:
        with caps.for_children():  # not root any more (--user): the child gets the kept capabilities
            proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False,
                                  env={**os.environ, "PYTHONPATH": _package_root()}, pass_fds=reach_fds())
    except subprocess.TimeoutExpired:
        remove_pins(path)
        raise KernelError(f"compiling and loading the meter took more than {timeout:.0f} s") from None
    lines = proc.stdout.splitlines()
    for ln in lines:  # anything else the compiler printed goes where its stderr went
        if not ln.startswith(RESULT_MARK):
            print(ln, file=sys.stderr)
    result = next((json.loads(ln[len(RESULT_MARK):]) for ln in reversed(lines) if ln.startswith(RESULT_MARK)), None)
    if proc.returncode != 0 or not result or not result.get("ok"):
        remove_pins(path)
        msg = result.get("error") if result else f"the compile child exited with status {proc.returncode}"
        raise KernelError(str(msg))
    return open_pinned(path)


def _package_root() -> str:
    root = str(Path(__file__).resolve().parents[2])
    extra = os.environ.get("PYTHONPATH")
    return f"{root}{os.pathsep}{extra}" if extra else root
