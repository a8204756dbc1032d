"""Request of N VMs across a lab of hosts, end to end, without and with templates.

Brings up a lab (``--hosts`` hosts in network namespaces on a bridge, each
running ``vmmesh node`` with the base image, two VM slots each), serves the
test apt repository on the lab bridge, then from host 1:

1. ``vmmesh request bench N vmm-test-a vmm-test-b`` on a fresh mesh: every
   chosen host builds the template (clone, boot, install, shut down) and then
   boots its VMs;
2. the same request again after shutting those down: templates are present,
   only linked clones and boots remain.

Prints the seconds end to end beside the thesis's figures for one VM (81 s
from scratch, 26 s from an existing template, VirtualBox on an i5 with KVM
hardware virtualisation) and says which accelerator ran the guests here.
Needs root and the base image (``VMMESH_BASE_IMAGE_DIR``).

    python benchmarks/mesh_request.py [--hosts 3] [--vms 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.aptrepo import AptRepo  # noqa: E402
from tests.labutil import lab_context  # noqa: E402
from tests.meshutil import all_up, eventually, field_is  # noqa: E402
from vmmesh.lab import Lab  # noqa: E402

BASE_DIR = Path(os.environ.get("VMMESH_BASE_IMAGE_DIR", "/var/cache/vmmesh-dev/base"))
THESIS = {"scratch": 81.0, "template": 26.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(lab: Lab, count: int) -> tuple[float, dict[str, Any]]:
    start = time.monotonic()
    argv = [
        *lab.vmmesh_argv(),
        "request",
        "--data-dir",
        str(lab.host_data_dir(1)),
        "bench",
        str(count),
        "vmm-test-a",
        "vmm-test-b",
        "--json",
    ]
    r = lab.lab_exec(1, argv, check=False, timeout=3600)
    seconds = time.monotonic() - start
    reply: dict[str, Any] = json.loads(r.stdout) if r.stdout else {"error": r.stderr}
    return seconds, reply


def run(hosts: int, vms: int, accel: str) -> dict[str, Any]:
    port = _free_port()
    args = [f"--accel={accel}", f"--apt-source=deb [trusted=yes] http://BRIDGE:{port}/ ./"]
    with (
        tempfile.TemporaryDirectory(dir="/tmp", prefix="vmb-") as tmp,
        lab_context(Path(tmp), hosts, image=BASE_DIR) as lab,
    ):
        for i in range(1, hosts + 1):  # two VM slots per host (1 GB disk each) + templates
            (lab.host_data_dir(i) / "config.toml").write_text("storage_quota_mb = 2600\n")
        running = lab.with_node_args([a.replace("BRIDGE", lab.bridge_address) for a in args])
        running = running.start_all()
        with AptRepo(Path(tmp) / "repo", host=running.bridge_address, port=port):
            for i in range(1, hosts + 1):
                eventually(all_up, f"h{i} sees all hosts", running, i, hosts)
            cold, cold_reply = _request(running, vms)
            running.cli(1, "shutdown", "bench")
            for i in range(1, hosts + 1):  # the planner's view shows the slots free again
                eventually(
                    field_is,
                    f"h1 sees h{i} free",
                    running,
                    1,
                    f"h{i}",
                    ("capacity", "free_slots"),
                    2,
                )
            warm, warm_reply = _request(running, vms)
            running.cli(1, "shutdown", "bench")
    return {
        "hosts": hosts,
        "vms": vms,
        "accel": accel,
        "without_templates": {
            "seconds": round(cold, 1),
            "placed": len(cold_reply.get("vms", [])),
            "per_host": _per_host(cold_reply),
        },
        "with_templates": {
            "seconds": round(warm, 1),
            "placed": len(warm_reply.get("vms", [])),
            "per_host": _per_host(warm_reply),
        },
        "thesis_one_vm": THESIS,
    }


def _per_host(reply: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in reply.get("vms", []):
        out[v["host"]] = out.get(v["host"], 0) + 1
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--vms", type=int, default=4)
    parser.add_argument("--accel", default="tcg", choices=["tcg", "kvm"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.hosts, args.vms, args.accel)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"request of {args.vms} VMs across {args.hosts} lab hosts ({args.accel.upper()})")
    print(f"{'case':<22}{'ours (s)':>10}{'placed':>8}  per host        thesis, ONE VM (s)")
    for key, label, thesis in (
        ("without_templates", "templates missing", THESIS["scratch"]),
        ("with_templates", "templates present", THESIS["template"]),
    ):
        r = result[key]
        print(
            f"{label:<22}{r['seconds']:>10.1f}{r['placed']:>8}  "
            f"{json.dumps(r['per_host']):<16}{thesis:>6.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
