#!/usr/bin/env bash
# The whole test suite: lint, format, types, then every test (unit, property,
# real TLS between node processes, mDNS across network namespaces, QEMU guests).
# Needs root (namespaces, debootstrap): run by another user, it runs itself
# under sudo (with --quick, only when the machine needs setting up).  Runs
# scripts/setup.sh first when the machine lacks part of the set-up.
#
#   bash scripts/test.sh            everything (what CI runs)
#   bash scripts/test.sh --quick    lint, types and every test that needs no
#                                   root, QEMU or network namespace
# Further arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/root.sh
PY=.venv/bin/python
# What this machine lacks: a fresh clone, a new dependency, QEMU gone.
lacks_setup() {
    [ ! -x "$PY" ] || ! sha256sum --status -c .venv/.setup-stamp 2>/dev/null \
        || ! command -v qemu-system-x86_64 >/dev/null || ! [ -x /usr/sbin/debootstrap ]
}
if [ "${1:-}" != "--quick" ] || lacks_setup; then
    as_root "$PWD/scripts/test.sh" "$@"
fi
if lacks_setup; then
    echo "==> scripts/setup.sh (this machine lacks part of the set-up)"
    bash scripts/setup.sh
fi
QUICK=0
if [ "${1:-}" = "--quick" ]; then
    QUICK=1
    shift
fi

echo "==> ruff"
.venv/bin/ruff check vmmesh cli tests benchmarks
.venv/bin/ruff format --check vmmesh cli tests benchmarks
echo "==> mypy --strict"
.venv/bin/mypy

# Two workers (pytest-xdist), each taking whole modules, the slowest first
# (tests/conftest.py orders them; --no-loadscope-reorder keeps that order, not
# xdist's most-tests-first): tests spend much of their time waiting (lab
# tests about half of it on guests, nodes and timers), so a second worker
# fills the other core; a module's lab is still set up once.
# VMMESH_TEST_WORKERS=0 runs in one process.  A short base directory: a
# guest's sockets live under its test's tmp_path, a Unix socket path has 107
# bytes, and xdist adds popen-gw<N>/ to every path.
WORKERS=${VMMESH_TEST_WORKERS:-2}
XDIST=(-n "$WORKERS" --dist loadfile --no-loadscope-reorder --basetemp="/tmp/vmmesh-tests-$(id -u)")

if [ "$QUICK" = 1 ]; then
    echo "==> pytest (quick: no root, QEMU or namespaces; $WORKERS workers)"
    exec "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" -m "not lab and not qemu" "$@"
fi

# The shared base image the QEMU tests boot (built once, then reused).
IMAGE_LINK=${VMMESH_BASE_IMAGE_DIR:-/var/cache/vmmesh-dev/base}
# Rebuilt when the recipe in vmmesh/host/imagebuild.py changed since.
echo "==> base image for the QEMU tests (built once per recipe; a few minutes)"
"$PY" -m vmmesh.host.imagebuild --publish "$IMAGE_LINK" --if-stale
export VMMESH_BASE_IMAGE_DIR="$IMAGE_LINK"
# Every lab host would boot the image once to save the same warm state: made
# once here instead (again when the image or QEMU changed), linked into labs.
echo "==> the base image's warm state for the labs (made once per image and QEMU)"
"$PY" -m tests.warmseed "$IMAGE_LINK" "$IMAGE_LINK.warm"
export VMMESH_WARM_SEED="$IMAGE_LINK.warm"

echo "==> pytest ($WORKERS workers)"
exec "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" --durations=25 "$@"
