"""The base image to a new host: `vmmesh image fetch` against `scp` of the same files
between the same network namespaces, on shaped links.

Brings up a lab of six hosts (no guests are booted).  h1 and h2 hold the base
image; h3 to h6 start without one (``image_autofetch = false``).  An sshd runs
in h1's namespace on a port of its own, with a throwaway host key and client
key.  Every host's uplink is shaped with ``tc tbf``; per rate, two new hosts
take the image both ways in the order fetch, scp / scp, fetch (ABBA), so
that drift cancels:

* ``vmmesh image fetch`` on the new host: pieces from every holder (h1 and
  h2), zstd, each piece hashed, the whole image verified before it is
  recorded;
* ``scp -r`` of the image directory (disk, kernel, initrd, manifest) from h1
  to the same host.

The thesis had no image transfer: every host was set up by hand (§4.1.1).
The issue's target is a figure beside ``scp``.  Needs root, the base image
(``VMMESH_BASE_IMAGE_DIR``) and ``sshd`` (``apt-get install openssh-server``;
the benchmark starts its own in the lab, never the system's).

    python benchmarks/image_fetch.py [--rates 1gbit 100mbit] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.report import print_result  # noqa: E402
from tests.labutil import lab_context  # noqa: E402
from tests.meshutil import all_up, eventually  # noqa: E402
from vmmesh.host.images import ImageStore  # noqa: E402
from vmmesh.lab import Lab  # noqa: E402

BASE_DIR = Path(os.environ.get("VMMESH_BASE_IMAGE_DIR", "/var/cache/vmmesh-dev/base"))
SSHD = Path("/usr/sbin/sshd")
SSH_PORT = 2222
PATIENCE = 1800.0


def _shape(lab: Lab, n: int, rate: str) -> None:
    burst = "1mb" if rate.endswith("gbit") else "256kb"
    for i in range(1, n + 1):
        subprocess.run(["ip", "netns", "exec", lab.host_netns(i), "tc", "qdisc", "replace", "dev",
                        "eth0", "root", "tbf", "rate", rate, "burst", burst, "latency", "100ms"],
                       check=True)  # fmt: skip


class Sshd:
    """An sshd in h1's namespace that lets a throwaway key in, and nothing else."""

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.dir = tmp / "ssh"
        self.dir.mkdir(mode=0o700)
        self.key = self.dir / "client"
        for name in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(self.dir / name)], check=True)  # fmt: skip
        (self.dir / "authorized_keys").write_text((self.dir / "client.pub").read_text())
        self.address = lab.host_address(1)
        config = self.dir / "sshd_config"
        config.write_text(
            f"Port {SSH_PORT}\nListenAddress {self.address}\nHostKey {self.dir / 'host'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPidFile {self.dir / 'pid'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\n"
            "StrictModes no\nSubsystem sftp internal-sftp\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.host_netns(1), str(SSHD), "-D", "-e", "-f", str(config)],
            stderr=subprocess.DEVNULL,
        )

    def copy(self, lab: Lab, dst: int, src: Path, target: Path) -> float:
        """Seconds to ``scp -r`` h1's ``src`` into ``target`` from host ``dst``."""
        argv = ["scp", "-q", "-r", "-i", str(self.key), "-P", str(SSH_PORT),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", f"root@{self.address}:{src}", str(target)]  # fmt: skip
        for _ in range(50):  # sshd may still be starting
            started = time.monotonic()
            r = subprocess.run(["ip", "netns", "exec", lab.host_netns(dst), *argv],
                               check=False, capture_output=True, text=True)  # fmt: skip
            if r.returncode == 0:
                return time.monotonic() - started
            time.sleep(0.2)
        raise SystemExit(f"scp to h{dst} failed: {r.stderr.strip()}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _fetch(lab: Lab, i: int) -> dict[str, Any]:
    argv = [*lab.vmmesh_argv(), "image", "fetch", "--data-dir", str(lab.host_data_dir(i)),
            "--json"]  # fmt: skip
    started = time.monotonic()
    r = lab.lab_exec(i, argv, check=False, timeout=PATIENCE)
    seconds = time.monotonic() - started
    if r.returncode != 0:
        log = lab.host_data_dir(i) / "node.log"
        tail = log.read_text(errors="replace").splitlines()[-40:] if log.exists() else []
        print(*tail, sep="\n", file=sys.stderr)
        raise SystemExit(f"image fetch on h{i} failed: {r.stderr.strip()}")
    report: dict[str, Any] = json.loads(r.stdout)
    report["cli_seconds"] = round(seconds, 2)
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not SSHD.is_file():
        raise SystemExit("needs sshd for the scp anchor: apt-get install openssh-server")
    n = 2 + 2 * len(args.rates)
    with (
        tempfile.TemporaryDirectory(dir="/tmp", prefix="vmi-") as tmp_name,
        lab_context(Path(tmp_name), n, start_nodes=False) as made,
    ):
        tmp = Path(tmp_name)
        for i in (1, 2):
            store = ImageStore(made.host_data_dir(i))
            store.set_default(store.import_image(BASE_DIR, link=True).image_id)
        for i in range(3, n + 1):
            (made.host_data_dir(i) / "config.toml").write_text("image_autofetch = false\n")
        lab = made.start_all()
        for i in range(1, n + 1):
            eventually(all_up, f"h{i} sees {n} hosts up", lab, i, n)
        source = ImageStore(lab.host_data_dir(1)).default_image().path
        size = sum(p.stat().st_size for p in source.iterdir() if p.is_file())
        sshd = Sshd(lab, tmp)
        try:
            rounds = []
            for k, rate in enumerate(args.rates):
                _shape(lab, n, rate)
                a, b = 3 + 2 * k, 4 + 2 * k
                fetches, copies = [], []
                for host, order in ((a, "fetch scp"), (b, "scp fetch")):
                    for what in order.split():
                        if what == "fetch":
                            fetches.append(_fetch(lab, host))
                        else:
                            target = tmp / f"scp-h{host}"
                            copies.append(round(sshd.copy(lab, host, source, target), 2))
                            shutil.rmtree(target)
                rounds.append({"rate": rate, "fetch": fetches, "scp_seconds": copies})
        finally:
            sshd.stop()
    return {"image_bytes": size, "rounds": rounds}


def _print(r: dict[str, Any]) -> None:
    mb = r["image_bytes"] / 1e6
    print(f"base image to a new host ({mb:.0f} MB: disk, kernel, initrd, manifest)")
    print(f"  {'uplinks':<10}{'vmmesh image fetch':>22}{'scp -r from h1':>18}{'fetch/scp':>11}"
          f"{'on the wire':>13}")  # fmt: skip
    for rnd in r["rounds"]:
        fetch = [f["cli_seconds"] for f in rnd["fetch"]]
        scp = rnd["scp_seconds"]
        f_mean, s_mean = sum(fetch) / len(fetch), sum(scp) / len(scp)
        wire = rnd["fetch"][0].get("wire_bytes", 0) / 1e6
        holders = ", ".join(h["host"] for h in rnd["fetch"][0].get("holders", []))
        print(f"  {rnd['rate']:<10}{f_mean:>9.1f} s ({'/'.join(f'{x:.1f}' for x in fetch)})"
              f"{s_mean:>8.1f} s ({'/'.join(f'{x:.1f}' for x in scp)})"
              f"{f_mean / s_mean:>9.2f}x{wire:>10.0f} MB   from {holders}")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rates", nargs="+", default=["1gbit", "100mbit"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    return print_result(run(args), args, _print)


if __name__ == "__main__":
    sys.exit(main())
