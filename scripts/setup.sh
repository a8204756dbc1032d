#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for vmmesh: system packages, a virtualenv
# with the package and its test tools, the `vmmesh` group.  Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/root.sh
as_root "$PWD/scripts/setup.sh" "$@"   # it installs packages and makes a group

export DEBIAN_FRONTEND=noninteractive
need=()
# chromium, chromium-driver and libnss3-tools (certutil) are for the web page's browser
# tests: a headless Chromium that trusts the mesh CA through its NSS database.
for pkg in qemu-system-x86 qemu-utils debootstrap e2fsprogs iproute2 dpkg-dev zstd \
           python3 python3-venv ca-certificates openssh-client prometheus \
           chromium chromium-driver libnss3-tools; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "==> apt-get install ${need[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
    # prometheus is for the tests (promtool, a Prometheus each test starts itself):
    # the system service its package enables is not wanted on a development machine.
    if [[ " ${need[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
fi

getent group vmmesh >/dev/null || groupadd --system vmmesh

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "==> virtualenv .venv"
    "$PY" -m venv .venv
fi
echo "==> pip install -e .[dev]"
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'
# scripts/test.sh runs this again when pyproject.toml changed since (new dependencies).
sha256sum pyproject.toml > .venv/.setup-stamp
echo "==> ready: $(.venv/bin/vmmesh --help >/dev/null && echo vmmesh installed)"
