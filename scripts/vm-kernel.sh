#!/usr/bin/env bash
# Make this VM run its distribution's kernel with that kernel's headers, before `make setup`.
# The Vagrantfile runs it first (as root), then reboots the VM.
#
# A box is a snapshot: its kernel may be older than the archive, and Debian drops the headers
# packages of superseded kernel ABIs, so `linux-headers-$(uname -r)` may no longer exist.  Then
# this installs the distribution's current kernel of the same flavour (and its headers), which
# the reboot boots into; setup.sh then finds headers for the running kernel, with no fallback.
# Idempotent: nothing to do when the running kernel's headers can be installed.
#
# --dry-run decides and simulates (apt-get -s) without refreshing or installing anything, and
# VM_KERNEL_RELEASE stands in for `uname -r`: tests/unit/test_deploy.py checks the decision
# against this host's package lists.
set -euo pipefail

say() { printf '\033[1mvm-kernel:\033[0m %s\n' "$*"; }
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; fi
[ "$DRY_RUN" = 1 ] || [ "$(id -u)" -eq 0 ] || { echo "vm-kernel: run as root" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
KREL=${VM_KERNEL_RELEASE:-$(uname -r)}
[ "$DRY_RUN" = 1 ] || apt-get update -qq

has_candidate() { local out; out=$(apt-cache policy "$1" 2>/dev/null); [[ $out == *"Candidate: "[0-9]* ]]; }

if has_candidate "linux-headers-$KREL"; then
    say "headers for the running kernel $KREL are available: nothing to do"
    exit 0
fi

# The flavour is what follows the ABI in the release: 6.1.0-18-amd64 -> amd64 (Debian),
# 6.1.0-18-cloud-amd64 -> cloud-amd64, 5.15.0-91-generic -> generic (Ubuntu).
flavour=$(sed -E 's/^[0-9]+\.[0-9]+\.[0-9]+-[0-9]+-//' <<<"$KREL")
image="linux-image-$flavour"
headers="linux-headers-$flavour"
# Ubuntu's cloud images install the "virtual" meta-package of the generic kernel (no firmware)
if dpkg-query -W -f='${Status}' linux-image-virtual 2>/dev/null | grep -q '^install ok installed'; then
    image=linux-image-virtual
fi
has_candidate "$image" && has_candidate "$headers" \
    || { echo "vm-kernel: no $image / $headers package for kernel $KREL" >&2; exit 1; }
say "no headers package for the running kernel $KREL: installing the current $image and $headers"
if [ "$DRY_RUN" = 1 ]; then
    apt-get -s -o Debug::NoLocking=1 install -y --no-install-recommends "$image" "$headers" >/dev/null
    say "(dry run: nothing installed)"
    exit 0
fi
apt-get install -y -qq --no-install-recommends "$image" "$headers" >/dev/null
say "installed $(dpkg-query -W -f='${Depends}' "$image" | cut -d, -f1); the VM boots it after this step"
