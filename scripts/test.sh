#!/usr/bin/env bash
# The whole test suite: lint, types, then every test (unit, property, real
# TLS between node processes, mDNS across network namespaces, QEMU guests).
# Needs root (namespaces, debootstrap) and scripts/setup.sh done once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
    echo "scripts/test.sh: no .venv — run scripts/setup.sh first" >&2
    exit 2
fi

echo "==> ruff"
.venv/bin/ruff check vmmesh cli tests benchmarks
.venv/bin/ruff format --check vmmesh cli tests benchmarks
echo "==> mypy --strict"
.venv/bin/mypy

# The shared base image the QEMU tests boot (built once, then reused).
IMAGE_LINK=${VMMESH_BASE_IMAGE_DIR:-/var/cache/vmmesh-dev/base}
# Rebuilt when the recipe in vmmesh/host/imagebuild.py changed since.
echo "==> base image for the QEMU tests (built once per recipe; a few minutes)"
"$PY" -m vmmesh.host.imagebuild --publish "$IMAGE_LINK" --if-stale
export VMMESH_BASE_IMAGE_DIR="$IMAGE_LINK"

echo "==> pytest"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
