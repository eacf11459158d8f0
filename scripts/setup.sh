#!/usr/bin/env bash
# pyflow setup: everything a fresh Debian/Ubuntu host needs to run and test pyflow.
# Idempotent; run as root (`sudo make setup`).
set -euo pipefail
cd "$(dirname "$0")/.."

say()  { printf '\033[1msetup:\033[0m %s\n' "$*"; }
warn() { printf '\033[1;33msetup: WARNING:\033[0m %s\n' "$*" >&2; }
die()  { printf '\033[1;31msetup: error:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: sudo make setup (installs packages and kernel headers)"
command -v apt-get >/dev/null || die "this setup knows Debian/Ubuntu (apt-get); on other systems install bcc's Python bindings, kernel headers, nfdump, tshark and pmacct by hand"

KREL=$(uname -r)
ARCH=$(dpkg --print-architecture)
export DEBIAN_FRONTEND=noninteractive

say "refreshing package lists"
apt-get update -qq

# tshark asks whether non-root users may capture; answer "no" up front.
echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections

PKGS=(python3-bpfcc python3-venv python3-pip iproute2 nftables conntrack iputils-ping ethtool nfdump tshark pmacct ruby)
say "installing: ${PKGS[*]}"
apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null

# (no `| grep -q` straight on apt-cache: under pipefail its SIGPIPE would read as "no")
has_candidate() { local out; out=$(apt-cache policy "$1" 2>/dev/null); [[ $out == *"Candidate: "[0-9]* ]]; }

# Vagrant (and its libvirt provider) only for `vagrant validate` in tests/unit/test_deploy.py:
# no VM runs here.  Some releases no longer package it; the test then says it was skipped.
OPTIONAL=()
for p in vagrant vagrant-libvirt; do has_candidate "$p" && OPTIONAL+=("$p"); done
if [ ${#OPTIONAL[@]} -gt 0 ]; then
    say "installing (for the deployment tests): ${OPTIONAL[*]}"
    apt-get install -y -qq --no-install-recommends "${OPTIONAL[@]}" >/dev/null
fi

# --- Python: pyflow needs 3.11+, and bcc only imports into Debian's/Ubuntu's own Python ------
# (Ubuntu 22.04's python3 is 3.10: its python3.11 package sees the same dist-packages, bcc too.)
PYTHON=/usr/bin/python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    has_candidate python3.11 && has_candidate python3.11-venv \
        || die "pyflow needs Python 3.11 or newer; $("$PYTHON" -V 2>&1) is older and no python3.11 package exists"
    say "$("$PYTHON" -V 2>&1) is older than 3.11: installing python3.11"
    apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv >/dev/null
    PYTHON=/usr/bin/python3.11
fi

# --- kernel headers: bcc compiles the meter against them -------------------
if [ -e "/lib/modules/$KREL/build/Makefile" ] || [ -d "/lib/modules/$KREL/build/include" ]; then
    say "kernel headers for $KREL: present at /lib/modules/$KREL/build"
elif has_candidate "linux-headers-$KREL"; then
    say "installing linux-headers-$KREL"
    apt-get install -y -qq "linux-headers-$KREL" >/dev/null
else
    generic=""
    for p in "linux-headers-$ARCH" linux-headers-generic; do
        if has_candidate "$p"; then generic=$p; break; fi
    done
    [ -n "$generic" ] || die "no headers package for kernel $KREL and no generic headers package found"
    apt-get install -y -qq "$generic" >/dev/null
    # newest arch-specific headers tree the generic package pulled in
    build=$(ls -d /usr/src/linux-headers-*-"$ARCH" /usr/src/linux-headers-*-generic 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$build" ] || die "installed $generic but found no /usr/src/linux-headers-* tree"
    common=${build%-"$ARCH"}-common
    [ -d "$common" ] || common=$build
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$build" "/lib/modules/$KREL/build"
    ln -sfn "$common" "/lib/modules/$KREL/source"
    warn "no linux-headers package exists for the running kernel $KREL."
    warn "linked the distribution's generic headers instead:"
    warn "  /lib/modules/$KREL/build  -> $build"
    warn "  /lib/modules/$KREL/source -> $common"
    warn "bcc compiles against these; pyflow's program uses only stable UAPI headers, so this works,"
    warn "but on a real host install the headers that match your kernel."
fi

# --- virtualenv: Debian's python3 so bcc (python3-bpfcc) is importable ------
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix and sys.version_info >= (3, 11) else 1)'; then
    say "creating .venv from $PYTHON --system-site-packages"
    rm -rf .venv
    "$PYTHON" -m venv --system-site-packages .venv
fi
say "installing pyflow (editable), its dev and test tools into .venv"
log=.venv/pip-install.log
if ! .venv/bin/python -m pip install -q -e '.[dev,test]' >"$log" 2>&1; then
    cat "$log" >&2
    die "pip install into .venv failed (log above, also in $log)"
fi
.venv/bin/python -c 'import bcc, pyflow' || die "the venv cannot import bcc or pyflow"

say "versions: $(nfdump -V 2>&1 | head -n1); $(tshark -v 2>/dev/null | head -n1); pmacct $(dpkg-query -W -f='${Version}' pmacct); bcc $(dpkg-query -W -f='${Version}' python3-bpfcc)"
touch .venv/.setup-done
# The user the agent becomes after its privileged start (`pyflow run --user pyflow`; the systemd
# unit in examples/systemd and the DaemonSet use it): no home, no shell, no password.
if ! getent passwd pyflow >/dev/null; then
    say "creating the system user pyflow (pyflow run --user pyflow)"
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin pyflow
fi
say "done"
