#!/usr/bin/env bash
# Install vmmesh on this host as a system service, usable by the `vmmesh` group.
#
#   bash scripts/install.sh              install (or upgrade) from this checkout
#   bash scripts/install.sh --uninstall  remove everything it installed but the
#                                        data directory (/var/lib/vmmesh)
#
# As root, or as a user who may use sudo (it runs itself under sudo).
#
# What it puts where:
#   /opt/vmmesh/                 a virtualenv made with the system's python3, holding
#                                vmmesh and what it needs (readable by everyone)
#   /usr/local/bin/vmmesh        the command (and vmmesh-condor, the HTCondor wrapper)
#   /etc/vmmesh/config.toml      settings, with comments (kept if it exists)
#   /etc/systemd/system/vmmesh-node.service   enabled where systemd runs; it starts
#                                once the host belongs to a mesh (init or join)
#   /var/lib/vmmesh              the data directory, root:vmmesh 0750
#   group vmmesh                 members use the CLI (the node's socket is 0660 vmmesh)
#
# The locations can be moved with VMMESH_OPT, VMMESH_BIN, VMMESH_ETC, VMMESH_UNITS
# and VMMESH_DATA (tests install into a scratch directory this way).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)
OPT=${VMMESH_OPT:-/opt/vmmesh}
BIN=${VMMESH_BIN:-/usr/local/bin}
ETC=${VMMESH_ETC:-/etc/vmmesh}
UNITS=${VMMESH_UNITS:-/etc/systemd/system}
DATA=${VMMESH_DATA:-/var/lib/vmmesh}
GROUP=vmmesh
MANIFEST="$OPT/installed-by-vmmesh"
COMMANDS=(vmmesh vmmesh-condor)

source scripts/root.sh
as_root "$SRC/scripts/install.sh" "$@"   # it installs packages, a service and a group

# systemctl only for the real unit directory (tests install into a scratch one)
have_systemd() {
    [ -d /run/systemd/system ] && command -v systemctl >/dev/null \
        && [ "$UNITS" = /etc/systemd/system ]
}

uninstall() {
    if have_systemd && [ -f "$UNITS/vmmesh-node.service" ]; then
        systemctl disable --now vmmesh-node.service >/dev/null 2>&1 || true
    fi
    rm -f "$UNITS/vmmesh-node.service"
    have_systemd && systemctl daemon-reload || true
    for cmd in "${COMMANDS[@]}"; do
        if [ -L "$BIN/$cmd" ] && [ "$(readlink "$BIN/$cmd")" = "$OPT/bin/$cmd" ]; then
            rm -f "$BIN/$cmd"
        fi
    done
    local made_group=no
    if [ -f "$MANIFEST" ] && grep -qx "group=created" "$MANIFEST"; then
        made_group=yes
    fi
    rm -rf "$ETC" "$OPT"
    if [ "$made_group" = yes ] && getent group "$GROUP" >/dev/null; then
        groupdel "$GROUP"
    fi
    echo "vmmesh uninstalled (the data directory $DATA is kept)"
}

if [ "${1:-}" = "--uninstall" ]; then
    uninstall
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
need=()
for pkg in qemu-system-x86 qemu-utils debootstrap e2fsprogs iproute2 zstd \
           python3 python3-venv ca-certificates openssh-client; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "==> apt-get install ${need[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
fi

group_note=existed
if ! getent group "$GROUP" >/dev/null; then
    groupadd --system "$GROUP"
    group_note=created
fi

echo "==> virtualenv $OPT (system python3)"
# The system's interpreter, not one under root's home: group members must be
# able to run it.
/usr/bin/python3 -m venv "$OPT"
"$OPT/bin/pip" install -q --upgrade pip
# from a clean copy: setuptools builds in the source tree, and a stale build/ of
# a development checkout would leak old modules into the install
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
tar --exclude=./.venv --exclude=./build --exclude=./.git --exclude='*.egg-info' -cf - . \
    | tar -xf - -C "$stage"
"$OPT/bin/pip" install -q "$stage"
printf 'group=%s\nsource=%s\n' "$group_note" "$SRC" > "$MANIFEST"
chmod -R a+rX "$OPT"

mkdir -p "$BIN"
for cmd in "${COMMANDS[@]}"; do
    if [ -x "$OPT/bin/$cmd" ]; then
        ln -sfn "$OPT/bin/$cmd" "$BIN/$cmd"
    fi
done

mkdir -p "$ETC"
if [ ! -f "$ETC/config.toml" ]; then
    cat > "$ETC/config.toml" <<EOF
# vmmesh settings (defaults shown).  Environment variables VMMESH_<SETTING>
# and command-line flags override them; \`kill -HUP\` the node (or
# \`systemctl reload vmmesh-node\`) to apply capacity settings at once.

# data_dir = "$DATA"
# name = ""                    # this host's name in the mesh (default: hostname)
# port = 7400                  # peer port (mutual TLS); the join port is port + 1
# peers = []                   # static seeds "ADDR:PORT" where multicast does not reach
# mdns = true                  # find peers on the LAN by mDNS
# swim_profile = "lan"         # gossip timing: lan, or wan across a VPN (slower probes)
# storage_quota_mb = 20000     # disk for templates and VM disks
# cpu_overcommit = 2.0         # vCPUs offered per core
# memory_reserve_mb = 512      # memory kept for the host itself
# vm_vcpus = 1                 # default VM size
# vm_memory_mb = 512
# vm_disk_allowance_mb = 1024  # disk each VM may grow into
# accel = "auto"               # auto (probe), kvm or tcg
# apt_sources = []             # apt lines for guests; empty: the image's own
# image_autofetch = true       # no base image here: fetch the mesh's from peers
# pack_level = 19              # zstd level templates are kept at for peers; 0: compress as sent
# ssh_bind = "0.0.0.0"         # where VM ssh forwards listen
# ssh_port_first = 22000
# ssh_port_count = 1000
EOF
    chmod 0644 "$ETC/config.toml"
fi

mkdir -p "$DATA"
chown root:"$GROUP" "$DATA"
chmod 0750 "$DATA"

mkdir -p "$UNITS"
sed -e "s#/opt/vmmesh/bin/vmmesh#$OPT/bin/vmmesh#" \
    -e "s#/var/lib/vmmesh#$DATA#g" \
    deploy/vmmesh-node.service > "$UNITS/vmmesh-node.service"
if have_systemd; then
    systemctl daemon-reload
    systemctl enable vmmesh-node.service >/dev/null
    echo "==> vmmesh-node.service enabled (it starts once this host is in a mesh)"
else
    echo "==> no systemd here: run \`vmmesh node\` yourself (unit file in $UNITS)"
fi
"$BIN/vmmesh" --help >/dev/null  # fails the install if the command does not run
echo "vmmesh installed: $BIN/vmmesh"
echo "next: vmmesh init (first host) or vmmesh join TOKEN; add users to group $GROUP"
