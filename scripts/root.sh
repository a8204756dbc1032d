# Sourced by the scripts that need root (setup, demo, test, install).
#
#   as_root /abs/path/of/script.sh "$@"
#
# returns at once when run by root (a fresh Debian 12 logged in as root has no
# sudo); for any other user it runs the script again under sudo, keeping the
# VMMESH_*, PYTHON and CI variables sudo would drop, or stops with one line
# when sudo is not installed.
as_root() {
    [ "$(id -u)" -eq 0 ] && return 0
    if ! command -v sudo >/dev/null; then
        echo "$(basename "$1"): needs root and sudo is not installed: run it as root" >&2
        exit 2
    fi
    local keep
    keep=$(compgen -e | grep -E '^(VMMESH_[A-Z0-9_]+|PYTHON|CI)$' | paste -sd, -) || true
    exec sudo ${keep:+"--preserve-env=$keep"} -- bash "$@"
}
