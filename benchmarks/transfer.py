"""Templates between lab hosts: bytes on the wire against the .debs, rate against raw
TCP, two holders against one, fetch against install to a VM ready.

Brings up a lab of four hosts and serves, on the lab bridge, a proxy of the
Debian mirror that counts the bytes of every ``.deb`` it passes (what
installing downloads).  Then:

1. h1 builds templates of real packages (``--packages``, default
   ``python3`` then ``povray``; more may follow, e.g. ``default-jdk-headless``):
   each through ``vmmesh request`` on h1, end to end to a VM ready, the proxy
   counting the ``.deb`` bytes and everything installing downloads (apt's
   lists too); then h1 packs each (``transfer.packs``, zstd 19, in the
   background) and the benchmark waits for the packs;
2. every host's uplink is shaped to 1 Gbit/s (``tc tbf`` on its eth0): h2
   fetches each template from h1 (``vmmesh fetch --from h1``: one holder),
   and the same file goes from h1 to h2 over a plain TCP socket before and
   after it: the two rates, same run, same link;
3. uplinks shaped to 100 Mbit/s (the thesis's LAN): h3 fetches the largest
   template from h1 alone, then h4 fetches it from h1 and h3 at once: two
   holders against one;
4. still at 100 Mbit/s, ``vmmesh request`` on h4 for the first template's
   packages with ``--fetch``: a VM ready through a fetch, against h1's build.

Prints, per template: .deb bytes, the delta's size (file and allocated),
bytes on the wire (from the pack, and what compressing on the fly at zstd 3
would send: the same pieces, counted) and the ratios to the targets (<= 1.0x the .debs, <= 0.5x
the raw delta; thesis: 2.2x the packages, sent twice); the rates against raw
TCP (>= 80 %) and two holders against one (>= 1.7x); fetch and install to a
VM ready beside the thesis's 94 s / 184 s and 81 s / 123 s.  Needs root, the
base image and the Debian mirror reachable from this machine.

    python benchmarks/transfer.py [--packages python3 povray [PKG...]] [--json]
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.report import print_result  # noqa: E402
from tests.labutil import lab_context  # noqa: E402
from tests.meshutil import all_up, cli_json, eventually  # noqa: E402
from vmmesh.lab import Lab  # noqa: E402
from vmmesh.transfer import blobfile, packs  # noqa: E402

BASE_DIR = Path(os.environ.get("VMMESH_BASE_IMAGE_DIR", "/var/cache/vmmesh-dev/base"))
MIRROR = "http://deb.debian.org"
PATIENCE = 1800.0
THESIS = {"fetch": "94 s / 184 s", "install": "81 s / 123 s", "wire": "2.2x the packages, twice"}


class CountingProxy(http.server.ThreadingHTTPServer):
    """GET /debian/... passed to the mirror; counts the bytes of .deb files."""

    def __init__(self, address: str, port: int) -> None:
        super().__init__((address, port), _ProxyHandler)
        self.deb_bytes = 0
        self.debs = 0
        self.all_bytes = 0  # apt's lists and everything else installing downloads
        self.lock = threading.Lock()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: CountingProxy

    def do_GET(self) -> None:
        try:
            upstream = urllib.request.urlopen(MIRROR + self.path, timeout=60)
        except Exception as exc:  # the mirror's 404 and friends, passed on
            code = getattr(exc, "code", 502)
            self.send_error(code if isinstance(code, int) else 502)
            return
        with upstream:
            self.send_response(200)
            length = upstream.headers.get("Content-Length")
            if length:
                self.send_header("Content-Length", length)
            self.end_headers()
            total = 0
            while chunk := upstream.read(1 << 16):
                self.wfile.write(chunk)
                total += len(chunk)
        with self.server.lock:
            self.server.all_bytes += total
            if self.path.endswith(".deb"):
                self.server.deb_bytes += total
                self.server.debs += 1

    def log_message(self, format: str, *args: Any) -> None:
        return


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _shape(lab: Lab, rate: str) -> None:
    burst = "1mb" if rate.endswith("gbit") else "128kb"
    for h in lab.hosts:
        subprocess.run(["ip", "netns", "exec", h.netns, "tc", "qdisc", "replace", "dev", "eth0",
                        "root", "tbf", "rate", rate, "burst", burst, "latency", "50ms"],
                       check=True)  # fmt: skip


def _json(lab: Lab, i: int, *args: str) -> dict[str, Any]:
    argv = [*lab.vmmesh_argv(), args[0], "--data-dir", lab.host(i).data_dir, *args[1:], "--json"]
    r = lab.lab_exec(i, argv, check=False, timeout=PATIENCE)
    if not r.stdout:
        raise SystemExit(f"vmmesh {' '.join(args)} on h{i} failed: {r.stderr.strip()}")
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def _template(lab: Lab, i: int, packages: list[str]) -> dict[str, Any]:
    for t in cli_json(lab, i, "templates")["templates"]:
        if t["packages"] == sorted(packages) and t["host"] == f"h{i}":
            return dict(t)
    raise SystemExit(f"h{i} holds no template of {packages}")


def _delta_file(lab: Lab, i: int, tpl: dict[str, Any]) -> Path:
    path = lab.host_data_dir(i) / "templates" / f"{tpl['sha256']}.qcow2"
    if not path.is_file():
        raise SystemExit(f"no delta file {path.name} on h{i}")
    return path


def _build(lab: Lab, proxy: CountingProxy, packages: list[str], name: str) -> dict[str, Any]:
    before = proxy.deb_bytes, proxy.debs, proxy.all_bytes
    started = time.monotonic()
    reply = _json(lab, 1, "request", name, "1", *packages)
    seconds = time.monotonic() - started
    if not reply.get("vms"):
        raise SystemExit(f"no VM of {packages}: {reply}")
    lab.cli(1, "shutdown", name)
    tpl = _template(lab, 1, packages)
    path = _delta_file(lab, 1, tpl)
    return {
        "packages": packages,
        "template_id": tpl["template_id"],
        "deb_bytes": proxy.deb_bytes - before[0],
        "debs": proxy.debs - before[1],
        "download_bytes": proxy.all_bytes - before[2],
        "delta_bytes": path.stat().st_size,
        "delta_allocated": path.stat().st_blocks * 512,
        "install_to_vm_seconds": round(seconds, 1),
        "path": str(path),
        "sha256": tpl["sha256"],
        "fly_bytes": _on_the_fly(path, tpl["sha256"]),
    }


def _on_the_fly(path: Path, sha: str) -> int:
    """Bytes the pieces of ``path`` cost when compressed as they are sent (zstd 3)."""
    info = blobfile.describe(path, sha)
    return sum(
        len(c.data)
        for i in range(len(info.pieces))
        if i not in info.zero
        for c in blobfile.read_chunks(path, info, i)
    )


def _packed(lab: Lab, i: int, sha: str) -> int:
    """The size of host ``i``'s pack of blob ``sha`` once it is made (0 while it is not)."""
    path = packs.pack_path(lab.host_data_dir(i) / "packs", sha)
    return path.stat().st_size if path.is_file() else 0


RECEIVER = """
import socket
s = socket.create_server(("ADDR", PORT))
c, _ = s.accept()
n = 0
while b := c.recv(1 << 20):
    n += len(b)
print(n)
"""
SENDER = """
import socket, sys, time
for _ in range(200):
    try:
        c = socket.create_connection(("ADDR", PORT))
        break
    except OSError:
        time.sleep(0.05)
with open(sys.argv[1], "rb") as f:
    c.sendfile(f)
c.close()
"""


def _raw_copy(lab: Lab, src: int, dst: int, path: Path) -> float:
    """Seconds to send ``path`` from host ``src`` to host ``dst`` over one TCP socket."""
    port = _free_port()
    addr = lab.host_address(dst)
    recv = RECEIVER.replace("ADDR", addr).replace("PORT", str(port))
    send = SENDER.replace("ADDR", addr).replace("PORT", str(port))
    receiver = subprocess.Popen(["ip", "netns", "exec", lab.host_netns(dst), sys.executable, "-c",
                                 recv], stdout=subprocess.PIPE, text=True)  # fmt: skip
    started = time.monotonic()
    subprocess.run(["ip", "netns", "exec", lab.host_netns(src), sys.executable, "-c", send,
                    str(path)], check=True)  # fmt: skip
    out, _ = receiver.communicate(timeout=PATIENCE)
    seconds = time.monotonic() - started
    if int(out.strip() or 0) != path.stat().st_size:
        raise SystemExit("the raw copy lost bytes")
    return seconds


def _fetch(lab: Lab, i: int, template_id: str, *sources: int) -> dict[str, Any]:
    """Host ``i`` fetches the template from hosts ``sources`` only."""
    pinned = [arg for h in sources for arg in ("--from", f"h{h}")]
    reply = _json(lab, i, "fetch", template_id, *pinned)
    reply["rate"] = reply["bytes"] / reply["seconds"] if reply["seconds"] else 0.0
    return reply


def run(args: argparse.Namespace) -> dict[str, Any]:
    port = _free_port()
    with (
        tempfile.TemporaryDirectory(dir="/tmp", prefix="vmt-") as tmp,
        lab_context(Path(tmp), 4, image=BASE_DIR) as lab,
    ):
        source = f"--apt-source=deb http://{lab.bridge_address}:{port}/debian bookworm main"
        running = lab.with_node_args([f"--accel={args.accel}", source]).start_all()
        proxy = CountingProxy(running.bridge_address, port)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            for i in (1, 2, 3, 4):
                eventually(all_up, f"h{i} sees four hosts", running, i, 4)
            return _measure(running, proxy, args)
        finally:
            proxy.shutdown()


def _configure(lab: Lab, room_on: set[int]) -> None:
    """No warm boots in the background (they would share the CPU with the figures);
    only the hosts ``room_on`` offer room, so a request lands there (h1 builds; h4
    fetches for a VM)."""
    for i in (1, 2, 3, 4):
        text = "warm_start = false\n"
        if i not in room_on:
            text += "storage_quota_mb = 0\n"
        (lab.host_data_dir(i) / "config.toml").write_text(text)
        lab.kill_host(i, signal.SIGHUP)
    for i in (1, 2, 3, 4):
        want = None if i in room_on else 0
        eventually(_slots_are, f"h1 sees h{i}'s room", lab, f"h{i}", want)


def _packs_done(lab: Lab, i: int) -> bool:
    """Host ``i`` has packed every template it holds (its packer is idle)."""
    held = [t for t in cli_json(lab, i, "templates")["templates"] if t["host"] == f"h{i}"]
    return all(_packed(lab, i, t["sha256"]) for t in held)


def _holds(lab: Lab, i: int, host: str, template_id: str) -> bool:
    """Host ``i``'s gossip says ``host`` holds the template (so a fetch asks it too)."""
    rows = {h["name"]: h for h in cli_json(lab, i, "peers")["hosts"]}
    return template_id in {t["template_id"] for t in rows.get(host, {}).get("templates", [])}


def _slots_are(lab: Lab, host: str, want: int | None) -> bool:
    rows = {h["name"]: h for h in cli_json(lab, 1, "peers")["hosts"]}
    free = rows[host]["capacity"]["free_slots"]
    return bool(free == 0) if want == 0 else bool(free > 0)


def _measure(lab: Lab, proxy: CountingProxy, args: argparse.Namespace) -> dict[str, Any]:
    _configure(lab, {1})
    built = [_build(lab, proxy, [p], f"t{n}") for n, p in enumerate(args.packages)]
    a = built[0]
    for t in built:
        t["pack_bytes"] = eventually(
            _packed, f"h1 packs {t['packages']}", lab, 1, t["sha256"], patience=PATIENCE
        )
    _configure(lab, {1, 2, 3, 4})
    out: dict[str, Any] = {"accel": args.accel, "templates": built}
    _shape(lab, "1gbit")
    runs = []
    for t in built:
        raws = [_raw_copy(lab, 1, 2, Path(t["path"]))]  # raw, fetch, raw: drift cancels
        fetch = _fetch(lab, 2, t["template_id"], 1)
        raws.append(_raw_copy(lab, 1, 2, Path(t["path"])))
        raw = sum(raws) / len(raws)
        t["wire_bytes"] = fetch["wire_bytes"]
        eventually(_packs_done, "h2 packs what it fetched", lab, 2, patience=PATIENCE)
        runs.append({"packages": t["packages"], "fetch_seconds": fetch["seconds"],
                     "raw_seconds": round(raw, 2), "raw_runs": [round(x, 2) for x in raws],
                     "bytes": fetch["bytes"], "wire_bytes": fetch["wire_bytes"],
                     "ratio": round(raw / fetch["seconds"], 3)})  # fmt: skip
    out["one_holder_1gbit"] = runs
    _shape(lab, "100mbit")
    big = max(built, key=lambda t: int(t["delta_allocated"]))
    one = _fetch(lab, 3, big["template_id"], 1)
    eventually(_holds, "h4 learns that h3 holds it", lab, 4, "h3", big["template_id"])
    eventually(_packed, "h3 packs it", lab, 3, big["sha256"], patience=PATIENCE)
    two = _fetch(lab, 4, big["template_id"], 1, 3)
    eventually(_packs_done, "h4 packs it", lab, 4, patience=PATIENCE)
    out["holders_100mbit"] = {"packages": big["packages"], "one_seconds": one["seconds"],
                              "two_seconds": two["seconds"],
                              "speedup": round(one["seconds"] / two["seconds"], 2),
                              "wire_bytes": two["wire_bytes"],
                              "two_from": [h["host"] for h in two["holders"]]}  # fmt: skip
    _configure(lab, {4})  # the VM must be made where the template is not
    started = time.monotonic()
    reply = _json(lab, 4, "request", "tf", "1", *a["packages"], "--fetch")
    out["fetch_to_vm_100mbit"] = {"seconds": round(time.monotonic() - started, 1),
                                  "vm": reply["vms"][0] if reply.get("vms") else reply}  # fmt: skip
    lab.cli(4, "shutdown", "tf", check=False)
    return out


def _print(r: dict[str, Any]) -> None:
    print(f"templates between lab hosts ({r['accel'].upper()} guests); thesis: {THESIS['wire']}")
    print(f"  {'packages':<22}{'.debs':>9}{'all dl':>9}{'delta':>9}{'alloc':>9}{'wire':>9}"
          f"{'on fly':>9}{'wire/.debs':>11}{'wire/all':>9}{'wire/delta':>11}")  # fmt: skip
    for t in r["templates"]:
        wire = t.get("wire_bytes", 0)
        print(f"  {' '.join(t['packages']):<22}{t['deb_bytes'] / 1e6:>8.1f}M"
              f"{t['download_bytes'] / 1e6:>8.1f}M"
              f"{t['delta_bytes'] / 1e6:>8.1f}M{t['delta_allocated'] / 1e6:>8.1f}M"
              f"{wire / 1e6:>8.1f}M{t['fly_bytes'] / 1e6:>8.1f}M"
              f"{wire / max(1, t['deb_bytes']):>10.2f}x"
              f"{wire / max(1, t['download_bytes']):>8.2f}x"
              f"{wire / max(1, t['delta_bytes']):>10.2f}x")  # fmt: skip
    print("  targets: wire <= 1.0x the .debs and <= 0.5x the raw delta; 'all dl' is every byte")
    print("  installing downloads (apt's lists too); 'on fly': the same pieces at zstd 3, no pack")
    for o in r["one_holder_1gbit"]:
        print(
            f"one holder, 1 Gbit/s uplinks, {' '.join(o['packages'])}: fetch "
            f"{o['fetch_seconds']:.2f} s, raw TCP of the same file {o['raw_seconds']:.2f} s: "
            f"{o['ratio'] * 100:.0f} % of raw (target >= 80 %)"
        )
    h = r["holders_100mbit"]
    two_from = ", ".join(h["two_from"])
    what = " ".join(h["packages"])
    print(f"100 Mbit/s uplinks, {what}: one holder {h['one_seconds']:.1f} s, two ({two_from})"
          f" {h['two_seconds']:.1f} s: {h['speedup']:.2f}x (target >= 1.7x)")  # fmt: skip
    inst = r["templates"][0]["install_to_vm_seconds"]
    f = r["fetch_to_vm_100mbit"]["seconds"]
    print(
        f"to a VM ready, {' '.join(r['templates'][0]['packages'])}: install {inst:.0f} s "
        f"(thesis {THESIS['install']}), fetch at 100 Mbit/s {f:.0f} s (thesis {THESIS['fetch']})"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--packages", nargs="+", default=["python3", "povray"], metavar="PKG")
    ap.add_argument("--accel", default="tcg", choices=["tcg", "kvm"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if len(args.packages) < 2:
        ap.error("--packages needs two packages at least")
    return print_result(run(args), args, _print)


if __name__ == "__main__":
    sys.exit(main())
