"""pyflow as users install it: an sdist and a wheel built from this tree, the wheel installed into a
fresh virtualenv and run from outside the checkout, where it must find its eBPF program.

The build runs on a copy of the tree (so nothing is written into the checkout) with `python -m
build`, which makes the sdist and then the wheel *from the sdist*: a file the sdist forgets breaks
the wheel.  Building and installing take tens of seconds (dependencies come from PyPI or pip's
cache), hence the ``slow`` marker; `make test` runs them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import pyflow

REPO = Path(__file__).resolve().parents[2]
BPF_SOURCES = ("flowmeter.c", "flowmeter.h")
# the Python this venv was made from (Debian's, where bcc lives), same version as the tests'
BASE_PYTHON = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
# files of the tree that the sdist leaves out on purpose (they only steer git and container builds)
NOT_IN_SDIST = {".gitignore", ".dockerignore"}

pytestmark = pytest.mark.slow


def source_files() -> list[str]:
    """The tree as git sees it: tracked files plus new ones that are not ignored (relative paths)."""
    if (REPO / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, check=True).stdout  # fmt: skip
        return sorted({p for p in out.decode().split("\0") if p and (REPO / p).is_file()})
    # no git (e.g. the tree rsync'ed into the Vagrant VM): what .gitignore leaves out, by hand
    skip = {".git", ".venv", ".vagrant", "build", "dist", "__pycache__", ".pytest_cache", ".mypy_cache",
            ".ruff_cache", ".hypothesis"}  # fmt: skip

    def kept(path: Path) -> bool:
        parts = path.relative_to(REPO).parts
        return not (skip & set(parts) or any(part.endswith(".egg-info") for part in parts)
                    or parts[:2] == ("bench", "results") or path.suffix == ".pyc")  # fmt: skip

    return sorted(str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and kept(p))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist and wheel of a copy of this tree."""
    work = tmp_path_factory.mktemp("packaging")
    src, out = work / "src", work / "dist"
    for rel in source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    res = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(src)],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return out


def only(directory: Path, pattern: str) -> Path:
    (found,) = directory.glob(pattern)
    return found


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv, as the README says to make one, with the wheel installed into it."""
    env = tmp_path_factory.mktemp("venv") / "pyflow"
    subprocess.run([str(BASE_PYTHON), "-m", "venv", "--system-site-packages", str(env)], check=True)
    res = subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q",
                          str(only(dist, "pyflow-*.whl"))], capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return env


def run_outside(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A command of the venv, run where no checkout is: no PYTHONPATH, cwd elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True)


def test_wheel_carries_every_module_the_ebpf_sources_and_the_command(dist: Path) -> None:
    with zipfile.ZipFile(only(dist, "pyflow-*.whl")) as whl:
        names = set(whl.namelist())
        for name in BPF_SOURCES:  # the very bytes of the one copy in git
            assert sha256(whl.read(f"pyflow/bpf/{name}")) == sha256((REPO / "bpf" / name).read_bytes()), name
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "pyflow = pyflow.cli:main" in whl.read(entry_points).decode()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = {line.split(":", 1)[1].split(";")[0].strip() for line in whl.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:") and "extra ==" not in line}  # fmt: skip
    modules = {p for p in source_files() if p.startswith("pyflow/") and p.endswith(".py")}
    assert modules and modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    # nothing but the package and its metadata: no tests, no top-level bpf/ in site-packages
    assert {n.split("/")[0] for n in names} == {"pyflow", f"pyflow-{pyflow.__version__}.dist-info"}
    # the runtime dependencies are pyproject's, and bcc is never one (it is Debian's python3-bpfcc)
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {r.replace(" ", "") for r in requires} == {d.replace(" ", "") for d in declared}
    assert not [r for r in requires if re.match(r"bcc\b", r, re.I)]


def test_sdist_is_the_whole_working_tree(dist: Path) -> None:
    with tarfile.open(only(dist, "pyflow-*.tar.gz")) as tar:
        prefix = f"pyflow-{pyflow.__version__}/"
        members = {m.name.removeprefix(prefix) for m in tar.getmembers() if m.isfile()}
        for name in BPF_SOURCES:
            member = tar.extractfile(prefix + f"bpf/{name}")
            assert member is not None and member.read() == (REPO / "bpf" / name).read_bytes()
    missing = set(source_files()) - members - NOT_IN_SDIST
    assert not missing, f"files of the tree missing from the sdist (MANIFEST.in): {sorted(missing)}"
    assert not [m for m in members if "__pycache__" in m or m.endswith(".pyc")]


def test_installed_pyflow_runs_outside_the_checkout(venv: Path, tmp_path: Path) -> None:
    res = run_outside(venv, "pyflow", "--help", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("usage: pyflow"), res.stderr
    res = run_outside(venv, "pyflow", "-V", cwd=tmp_path)
    assert res.stdout.strip() == f"pyflow {pyflow.__version__}"
    # and it reads a config as the checkout's does (no root, nothing in the kernel)
    res = run_outside(venv, "pyflow", "check", "--config", str(REPO / "examples" / "pyflow.toml"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "/ip traffic-flow print" in res.stdout and "192.0.2.50" in res.stdout
    # pip agrees that pyflow's dependencies are met (other lines are about Debian's own packages)
    res = run_outside(venv, "python", "-m", "pip", "check", cwd=tmp_path)
    assert not [line for line in res.stdout.splitlines() if line.lower().startswith("pyflow ")], res.stdout


def test_installed_pyflow_finds_its_ebpf_sources_in_the_package(venv: Path, tmp_path: Path) -> None:
    probe = ("import pyflow; from pyflow.kernel import abi; "
             "print(pyflow.__file__); print(abi.BPF_DIR)")  # fmt: skip
    res = run_outside(venv, "python", "-c", probe, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    package_init, bpf_dir = (Path(line) for line in res.stdout.splitlines())
    site = venv.resolve()
    assert site in package_init.resolve().parents, f"imported {package_init}, not the installed package"
    assert bpf_dir == package_init.parent / "bpf"
    for name in BPF_SOURCES:
        assert sha256((bpf_dir / name).read_bytes()) == sha256((REPO / "bpf" / name).read_bytes()), name


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="loading a BPF program needs root")
def test_installed_pyflow_program_compiles_and_loads(venv: Path, tmp_path: Path) -> None:
    """bcc compiles the packaged sources, and the kernel's verifier accepts all three programs."""
    headers = Path("/lib/modules") / os.uname().release / "build"
    if not headers.exists():
        pytest.skip(f"no kernel headers at {headers} (`sudo make setup` installs them)")
    probe = """
import bcc
from pyflow.kernel import abi
b = bcc.BPF(src_file=str(abi.BPF_DIR / "flowmeter.c").encode(),
            cflags=[f"-I{abi.BPF_DIR}", "-Wno-unused-function", "-DCACHE_ENTRIES=1024"])
b.load_func(b"pyflow_xdp", bcc.BPF.XDP)
b.load_func(b"pyflow_tc_ingress", bcc.BPF.SCHED_CLS)
b.load_func(b"pyflow_tc_egress", bcc.BPF.SCHED_CLS)
b.cleanup()
print("loaded from", abi.BPF_DIR)
"""
    res = run_outside(venv, "python", "-c", probe, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip() == f"loaded from {next(venv.glob('lib/python3*/site-packages/pyflow/bpf'))}"
