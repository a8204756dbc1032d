"""Linked clone of a template vs. a full copy, over bases of several sizes.

What it shows (SPEC table, row 1): a VM's disk is a qcow2 overlay over its
template, written by ``Hypervisor.create_overlay`` (``qemu-img create -b``),
so its cost must be a few milliseconds and *flat* in the size of what lies
underneath, where the thesis copied the whole disk (1-2 s, plus 13-15 s of
VirtualBox lock wait).

For each size it builds a base of that virtual size, fills it with real data
(``--no-fill`` leaves it sparse, which is quicker and changes nothing for the
overlay), puts a small template delta on top, then times ``--runs`` linked
clones of the template and, for bases up to ``--copy-max-gb``, one full copy
(``cp``) of the base in the same run for the ratio.

    .venv/bin/python -m benchmarks.linked_clone [--sizes 1,8] [--runs 30] [--no-fill]

``create_overlay`` is two qemu-img processes (create, then info for the
returned DiskInfo); the "create only" column times the bare ``qemu-img
create`` in the same run, to show where the milliseconds go.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from vmmesh.hypervisor.qemu import QemuHypervisor

GB = 1 << 30


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def make_base(path: Path, size_gb: int, fill: bool) -> None:
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_gb}G")
    if fill:
        # 0xa5 pattern over the whole virtual size: every cluster allocated
        # (one qemu-io request is limited to under 2 GB: write 1 GB at a time)
        writes = [a for g in range(size_gb) for a in ("-c", f"write -P 0xa5 {g}G 1G")]
        _run("qemu-io", "-f", "qcow2", *writes, str(path))


def make_template(base: Path, path: Path) -> None:
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(path))
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 8M", str(path))


async def time_clones(hv: QemuHypervisor, template: Path, out: Path, runs: int) -> list[float]:
    times = []
    for i in range(runs):
        dest = out / f"vm{i}.qcow2"
        t = time.perf_counter()
        await hv.create_overlay(template, dest)
        times.append(time.perf_counter() - t)
        await trio.Path(dest).unlink()
    return times


def time_bare_creates(template: Path, out: Path, runs: int) -> list[float]:
    times = []
    dest = out / "bare.qcow2"
    for _ in range(runs):
        t = time.perf_counter()
        _run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(template),
             str(dest))  # fmt: skip
        times.append(time.perf_counter() - t)
        dest.unlink()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,8", help="base sizes in GB, comma separated")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--no-fill", action="store_true", help="sparse bases (no data written)")
    ap.add_argument("--copy-max-gb", type=int, default=8, help="full-copy only up to this size")
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (default: /var/tmp)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    hv = QemuHypervisor(accel="tcg")  # disks only: the accelerator plays no part
    rows = []
    with tempfile.TemporaryDirectory(prefix="vmmesh-clone-", dir=args.dir or "/var/tmp") as tmp:
        work = Path(tmp)
        for size in sizes:
            base = work / f"base{size}.qcow2"
            template = work / f"tpl{size}.qcow2"
            make_base(base, size, not args.no_fill)
            make_template(base, template)
            os.sync()  # so the clones are not timed against the fill's writeback
            times = trio.run(time_clones, hv, template, work, args.runs)
            bare = time_bare_creates(template, work, args.runs)
            copy_s = None
            if size <= args.copy_max_gb:
                t = time.perf_counter()
                shutil.copyfile(base, work / "copy.qcow2")
                copy_s = time.perf_counter() - t
                (work / "copy.qcow2").unlink()
            allocated = base.stat().st_blocks * 512
            rows.append((size, allocated, times, statistics.median(bare), copy_s))
            base.unlink()
            template.unlink()

    print(f"linked clone (qemu-img create -b), {args.runs} runs per size")
    head = (
        f"{'base':>6} {'allocated':>10} {'median':>9} {'p95':>9} {'max':>9}"
        f" {'create only':>11} {'full copy':>10} {'thesis':>22} {'target':>9}"
    )
    print(head)
    print("-" * len(head))
    for size, allocated, times, bare_s, copy_s in rows:
        times.sort()
        p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
        copy = f"{copy_s:.2f} s" if copy_s is not None else "-"
        print(
            f"{size:>4} GB {allocated / GB:>7.2f} GB {statistics.median(times) * 1e3:>6.1f} ms"
            f" {p95 * 1e3:>6.1f} ms {times[-1] * 1e3:>6.1f} ms {bare_s * 1e3:>8.1f} ms {copy:>10}"
            f" {'1-2 s copy +13-15 s lock':>22} {'<= 20 ms':>9}"
        )
    medians = [statistics.median(r[2]) for r in rows]
    if len(medians) > 1:
        print(f"largest/smallest base median ratio: {max(medians) / min(medians):.2f} (flat = 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
