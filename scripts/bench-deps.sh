#!/usr/bin/env bash
# The tools the live benchmark needs (trafgen from netsniff-ng) and compares pyflow with
# (fprobe, softflowd).  Their Debian packages would start exporting services on install
# (fprobe on eth0 by default): a policy-rc.d stops that, and the services are disabled.
set -euo pipefail
pkgs=(netsniff-ng fprobe softflowd)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "bench-deps: installing ${missing[*]} (their services are kept stopped and disabled)"
created=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && created=1
fi
trap '[ $created -eq 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now fprobe softflowd >/dev/null 2>&1 || true
fi
