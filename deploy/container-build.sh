#!/usr/bin/env bash
# What deploy/Containerfile runs to build pyflow's image, as one script so it can be checked
# without a container engine (tests/unit/test_deploy.py runs it with --dry-run).
#
#   container-build.sh [--dry-run] SRC
#
# SRC is a pyflow source tree (what the Containerfile copies to /src) or a built wheel.
#   1. apt: Debian's bcc (python3-bpfcc) and python3-venv.  No kernel headers: bcc compiles the
#      meter against the running kernel's, which only the host has; the container gets them
#      from the host's /lib/modules and /usr/src, mounted read-only (docs/deploy.md).
#   2. a virtualenv at $PYFLOW_PREFIX (default /opt/pyflow) from Debian's /usr/bin/python3 with
#      --system-site-packages, so bcc is importable (never `pip install bcc`: that PyPI name is
#      an unrelated project); pyflow and its dependencies installed into it from SRC.
#   3. checks: the pyflow command runs, bcc imports, the installed package carries the eBPF
#      sources (pyflow/bpf/flowmeter.c and .h) and pyflow finds them there.
#   4. the system user pyflow, which the agent becomes after its start (--user pyflow).
#   5. clean-up of apt's lists and caches.
# --dry-run changes nothing outside $PYFLOW_PREFIX: apt only simulates (apt-get -s) after checking
# each package exists, step 2 installs into $PYFLOW_PREFIX, which must not exist yet (the tests
# point it at a temporary directory), and steps 4 and 5 are skipped.
set -euo pipefail

PACKAGES=(python3-bpfcc python3-venv)
PREFIX=${PYFLOW_PREFIX:-/opt/pyflow}
DRY_RUN=0

say() { printf 'container-build: %s\n' "$*"; }
die() { printf 'container-build: error: %s\n' "$*" >&2; exit 1; }

if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
[ $# -eq 1 ] || die "usage: $0 [--dry-run] SRC (a pyflow source tree or wheel)"
SRC=$1
if [ -d "$SRC" ]; then
    for f in pyproject.toml setup.py README.md bpf/flowmeter.c bpf/flowmeter.h pyflow/__init__.py; do
        [ -f "$SRC/$f" ] || die "$SRC is not a pyflow source tree: $f is missing"
    done
elif [[ ! -f "$SRC" || "$SRC" != *.whl ]]; then
    die "$SRC is neither a pyflow source tree nor a wheel"
fi
export DEBIAN_FRONTEND=noninteractive

# --- 1. distribution packages -------------------------------------------------------------
if [ "$DRY_RUN" = 1 ]; then
    for p in "${PACKAGES[@]}"; do
        policy=$(apt-cache policy "$p")
        [[ $policy == *"Candidate: "[0-9]* ]] || die "no installable package $p (run apt-get update?)"
    done
    say "apt (simulated): ${PACKAGES[*]}"
    apt-get -s -o Debug::NoLocking=1 install -y --no-install-recommends "${PACKAGES[@]}" >/dev/null
else
    say "apt: ${PACKAGES[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
fi

# --- 2. the virtualenv with pyflow ------------------------------------------------------
if [ "$DRY_RUN" = 1 ] && [ -e "$PREFIX" ]; then
    die "--dry-run installs into PYFLOW_PREFIX=$PREFIX, which must not exist yet"
fi
say "virtualenv at $PREFIX (/usr/bin/python3 --system-site-packages)"
/usr/bin/python3 -m venv --system-site-packages "$PREFIX"
say "pip install $SRC"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PREFIX/bin/python" -m pip install --no-cache-dir -q "$SRC"

# --- 3. checks ----------------------------------------------------------------------------
"$PREFIX/bin/pyflow" -V
(cd / && "$PREFIX/bin/python" - "$PREFIX") <<'PY'
import sys
from pathlib import Path

import bcc  # noqa: F401  (Debian's python3-bpfcc, through --system-site-packages)
import pyflow
from pyflow.kernel import abi

prefix = Path(sys.argv[1]).resolve()
package = Path(pyflow.__file__).resolve().parent
assert prefix in package.parents, f"pyflow imported from {package}, not from {prefix}"
assert abi.BPF_DIR == package / "bpf", f"pyflow looks for its eBPF sources in {abi.BPF_DIR}, not in the package"
for name in ("flowmeter.c", "flowmeter.h"):
    assert (abi.BPF_DIR / name).is_file(), f"{abi.BPF_DIR / name} is missing"
print(f"container-build: pyflow {pyflow.__version__} in {package}, eBPF sources in {abi.BPF_DIR}")
PY

# --- 4. the unprivileged user `pyflow run --user pyflow` becomes after its start ----------
if [ "$DRY_RUN" = 1 ]; then
    command -v useradd >/dev/null || die "no useradd to create the pyflow user with"
    say "system user pyflow (simulated)"
elif ! getent passwd pyflow >/dev/null; then
    say "system user pyflow"
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin pyflow
fi

# --- 5. clean-up --------------------------------------------------------------------------
if [ "$DRY_RUN" = 0 ]; then
    apt-get clean
    rm -rf /var/lib/apt/lists/*
fi
say "done"
