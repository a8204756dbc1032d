#!/usr/bin/env bash
# The main job: set up this machine, then a mesh of three lab hosts on it,
# a request placed across them, the VMs shown, shut down; a template fetched
# from a peer, a warm VM, a job and a bag of tasks; the lab removed.
#
#   bash scripts/demo.sh [--keep]     (--keep leaves the lab up)
#
# As root, or as a user who may use sudo (it runs itself under sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/root.sh
as_root "$PWD/scripts/demo.sh" "$@"
KEEP=${1:-}
bash scripts/setup.sh
PY=.venv/bin/python
VMMESH=.venv/bin/vmmesh
IMAGE=${VMMESH_BASE_IMAGE_DIR:-/var/cache/vmmesh-dev/base}
LAB=${VMMESH_LAB_DIR:-/tmp/vmmesh-demo}
TAG=demo

echo "==> base image (built once per recipe; a few minutes)"
"$PY" -m vmmesh.host.imagebuild --publish "$IMAGE" --if-stale

# Guests install packages from a small local apt repository served on the
# lab bridge (the lab hosts reach it; nothing outside this machine is used).
BRIDGE_IP=$("$PY" -c "from vmmesh.lab import default_subnet; print(f'10.213.{default_subnet(\"$TAG\")}.254')")
REPO_PORT=8791
cleanup() {
    [ -n "${REPO_PID:-}" ] && kill "$REPO_PID" 2>/dev/null || true
    if [ "$KEEP" != "--keep" ]; then
        "$VMMESH" lab down --dir "$LAB" --tag "$TAG" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT
"$VMMESH" lab down --dir "$LAB" --tag "$TAG" >/dev/null 2>&1 || true
rm -rf "$LAB/hosts" "$LAB/job" "$LAB/prom"   # a previous run's hosts, job files, certificate

echo "==> lab up: 3 hosts (network namespaces on a bridge), joined by init/invite/join"
"$VMMESH" lab up 3 --dir "$LAB" --tag "$TAG" --image "$IMAGE" \
    --node-arg=--storage-quota=2600 \
    --node-arg="--apt-source=deb [trusted=yes] http://$BRIDGE_IP:$REPO_PORT/ ./"
"$PY" -m tests.aptrepo --host "$BRIDGE_IP" --port "$REPO_PORT" --dir "$LAB/aptrepo" &
REPO_PID=$!

H1="--data-dir $LAB/hosts/h1"
echo "==> waiting until every host sees the other two (mDNS + gossip)"
for _ in $(seq 1 120); do
    up=$("$VMMESH" $H1 peers --json | "$PY" -c "import json,sys; print(sum(h['status']=='up' for h in json.load(sys.stdin)['hosts']))")
    [ "$up" = 3 ] && break
    sleep 0.5
done
"$VMMESH" $H1 peers

echo "==> vmmesh request demo 3 vmm-test-a vmm-test-b   (on h1; each host takes 2 at most)"
"$VMMESH" $H1 request demo 3 vmm-test-a vmm-test-b --dry-run
"$VMMESH" $H1 request demo 3 vmm-test-a vmm-test-b
echo "==> where the VMs run"
"$VMMESH" $H1 vms
"$VMMESH" $H1 templates
echo "==> a command in one of them"
"$VMMESH" --data-dir "$LAB/hosts/h2" exec demo-1 -- cat /usr/share/vmm-test-a/marker
echo "==> vmmesh ssh demo-2 (from h3's namespace; the guest's own host key is pinned)"
KEY="$LAB/id_ed25519"
[ -e "$KEY" ] || ssh-keygen -q -t ed25519 -N "" -f "$KEY"
NS3=$("$VMMESH" lab status --dir "$LAB" --json | "$PY" -c "import json,sys; d=json.load(sys.stdin); print(next(h['netns'] for h in d['hosts'] if h['host']==3))")
ip netns exec "$NS3" "$VMMESH" --data-dir "$LAB/hosts/h3" ssh demo-2 -i "$KEY" -- \
    'echo "logged in to $(hostname) as $(id -un)"; cat /usr/share/vmm-test-b/marker'
echo "==> vmmesh shutdown demo (from h3)"
"$VMMESH" --data-dir "$LAB/hosts/h3" shutdown demo
"$VMMESH" $H1 vms

echo "==> a template fetched from a peer: a host without it takes the delta straight from its holders"
TID=$("$VMMESH" $H1 templates --json | "$PY" -c "import json,sys; print(next(t['template_id'] for t in json.load(sys.stdin)['templates'] if t['packages']==['vmm-test-a','vmm-test-b']))")
LACKS=$("$VMMESH" $H1 templates --json | "$PY" -c "import json,sys; held={t['host'] for t in json.load(sys.stdin)['templates'] if t['template_id']=='$TID'}; print(next((h for h in ('h1','h2','h3') if h not in held), 'h3'))")
"$VMMESH" --data-dir "$LAB/hosts/$LACKS" fetch "$TID"
"$VMMESH" $H1 templates

echo "==> a warm VM: hosts keep a saved boot of each template; the next VM resumes from it"
for _ in $(seq 1 240); do
    cold=$("$VMMESH" $H1 templates --json | "$PY" -c "import json,sys; print(sum(t['warm_size']==0 for t in json.load(sys.stdin)['templates']))")
    [ "$cold" = 0 ] && break
    sleep 1
done
"$VMMESH" $H1 templates
"$VMMESH" $H1 request again 1 vmm-test-a vmm-test-b
"$VMMESH" $H1 vms
echo "==> live migration: the VM moves to another host while it runs (same processes)"
PID=$("$VMMESH" $H1 exec again-1 -- sh -c 'setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!')
echo "    a process in the guest: pid $PID"
"$VMMESH" $H1 migrate again-1
"$VMMESH" $H1 exec again-1 -- sh -c "echo \"    after the move: pid $PID is \$(cat /proc/$PID/comm), still running\""
"$VMMESH" $H1 vms
echo "==> the web page and Prometheus metrics of every host, behind the mesh's own CA"
WEB=$("$VMMESH" $H1 status --json | "$PY" -c "import json,sys; print(json.load(sys.stdin)['facts'].get('web','').split(' ')[0])")
echo "    h1's page: $WEB   (a browser on h1: vmmesh web prints a login link)"
"$VMMESH" $H1 cert issue --role metrics --out "$LAB/prom"
"$PY" - "$LAB/prom" "$WEB" <<'PYEOF'
import json, ssl, sys, urllib.request
prom, url = sys.argv[1], sys.argv[2]
ctx = ssl.create_default_context(cafile=f"{prom}/ca.crt")  # names and CA checked
ctx.load_cert_chain(f"{prom}/metrics.crt", f"{prom}/metrics.key")
def get(u):
    with urllib.request.urlopen(u, context=ctx, timeout=10) as r:
        return r.read()
groups = json.loads(get(url + "sd"))
print("    /sd (Prometheus service discovery):", ", ".join(
    f"{g['labels']['__meta_vmmesh_member']} {g['targets'][0]}" for g in groups))
for g in groups:
    lines = get(f"https://{g['targets'][0]}/metrics").decode().splitlines()
    up = sum(l.startswith("vmmesh_member_status{") and 'status="up"' in l and l.endswith(" 1.0")
             for l in lines)
    print(f"    {g['labels']['__meta_vmmesh_member']}: /metrics has {len(lines)} lines, sees {up} hosts up")
    for l in lines:
        if l.startswith(("vmmesh_vm_cpu_seconds_total", "vmmesh_vm_resident_memory_bytes")):
            print("      " + l)
PYEOF
"$VMMESH" $H1 shutdown again

echo "==> a job: vmmesh run copies the input in, streams the output, brings the result back"
JOB="$LAB/job"
mkdir -p "$JOB" && echo "hello from the demo" > "$JOB/in.txt"
(cd "$JOB" && "$OLDPWD/$VMMESH" $H1 run --pkg vmm-test-a --input in.txt -- \
    sh -c 'tr a-z A-Z < in.txt > out.txt; echo "ran on $(hostname)"; cat out.txt')
echo "    result beside the input: $(cat "$JOB/out.txt")"

echo "==> a bag of 6 tasks over 2 VMs of the mesh, one result folder per task"
mkdir -p "$JOB/tasks" && for n in 1 2 3 4 5 6; do seq "$n" > "$JOB/tasks/t$n"; done
(cd "$JOB" && "$OLDPWD/$VMMESH" $H1 run --pkg vmm-test-a --tasks tasks --vms 2 \
    --results results -- sh -c 'wc -l < {} > {}.lines')
"$VMMESH" $H1 vms
