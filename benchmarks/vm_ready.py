"""VM ready (guest agent answers): from scratch, and from a template warm and cold.

What it shows (SPEC table, row 2; thesis §5.2): the time from a request to a
VM whose guest agent answers, through the same code the node runs
(``VmManager.request_local``), on a fresh data directory:

1. *from scratch*: no template holds the packages, so one is built — clone,
   boot, apt install, shut down, record — then linked-cloned and booted;
2. the template's warm state is made (in the background, as a node does),
   then *from a template*, ``--runs`` times each, alternating so that drift
   cancels: *warm* (a linked clone over the warm overlay, the saved RAM and
   devices resumed) and *cold* (a linked clone and a boot).  Reported: the
   VM's start (clone + resume or boot, to the agent's answer) and the whole
   ``request_local`` (which adds making the VM itself: host name, machine
   id, RNG, clock).

Packages come from the local test apt repository (``tests/aptrepo.py``:
tiny ``vmm-test-*`` packages, offline, deterministic) unless ``--apt-source``
names another and ``--packages`` real ones; the thesis installed python and
openjdk from a mirror, so its install step is far heavier than ours.  The
accelerator is probed (``vmmesh.hypervisor.accel``) unless ``--accel`` says.

    .venv/bin/python -m benchmarks.vm_ready [--runs 3] [--accel tcg]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from tests.aptrepo import AptRepo
from vmmesh.host.build import BaseImage
from vmmesh.host.capacity import CapacityPolicy, probe_host
from vmmesh.host.images import read_manifest
from vmmesh.host.store import Store
from vmmesh.host.templates import TemplateManager
from vmmesh.host.warm import WarmStore
from vmmesh.hypervisor.accel import probe_accel
from vmmesh.hypervisor.qemu import QemuHypervisor
from vmmesh.vm.creation import MadeHere
from vmmesh.vm.manager import VmManager

BASE_DIR = Path("/var/cache/vmmesh-dev/base")
SCRATCH_PHASES = ("clone", "boot", "install", "shutdown", "record", "vm_clone", "vm_boot")


async def bench(args: argparse.Namespace, data: Path, sources: list[str]) -> None:
    accel = args.accel if args.accel != "auto" else await probe_accel()
    hv = QemuHypervisor(accel=accel)
    record = read_manifest(args.base)
    store = Store.open(data / "state.db")
    base = BaseImage(args.base.resolve(), record.manifest)
    templates = TemplateManager(
        store=store,
        hypervisor=hv,
        data_dir=data,
        base=base,
        apt_sources=sources,
        build_vcpus=args.vcpus,
        build_memory_mb=args.memory,
    )
    vms = VmManager(
        store=store,
        hypervisor=hv,
        templates=templates,
        data_dir=data,
        policy=CapacityPolicy(cpu_overcommit=8.0, vm_vcpus=args.vcpus, vm_memory_mb=args.memory),
        probe=lambda: probe_host(data),
        warm=WarmStore(data, hv, base),
    )
    runs: dict[str, list[tuple[MadeHere, float]]] = {"warm": [], "cold": []}
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(vms.run)
            scratch, _ = await _one(vms, args)
            made = await _warmed(vms, scratch.template_id or "")
            for _ in range(args.runs):
                for mode in ("warm", "cold"):
                    vms.warm_enabled = mode == "warm"
                    runs[mode].append(await _one(vms, args))
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for guest in list(vms.guests.values()):
                await guest.kill()
        store.close()
    _print(accel, args, scratch, made, runs)


async def _one(vms: VmManager, args: argparse.Namespace) -> tuple[MadeHere, float]:
    started = time.monotonic()
    report = await vms.request_local(
        "bench", 1, args.packages, vcpus=args.vcpus, memory_mb=args.memory
    )
    took = time.monotonic() - started
    if not report.vms:
        raise SystemExit(f"no VM was made: {report.errors}")
    await vms.shutdown("bench")
    return report, took


async def _warmed(vms: VmManager, tid: str) -> tuple[float, int]:
    """Wait for the template's warm state (made in the background); (seconds, bytes)."""
    assert vms.warm is not None
    started = time.monotonic()
    with trio.fail_after(1800):
        while (state := vms.warm.get(tid)) is None:  # noqa: ASYNC110 - a background task
            await trio.sleep(0.5)
    return time.monotonic() - started, state.size()


def _print(
    accel: str,
    args: argparse.Namespace,
    scratch: MadeHere,
    made: tuple[float, int],
    runs: dict[str, list[tuple[MadeHere, float]]],
) -> None:
    s = scratch.vms[0].seconds
    print(
        f"VM ready (guest agent answers), accel={accel.upper()}, {args.vcpus} vCPU,"
        f" {args.memory} MB, packages: {' '.join(args.packages)}"
    )
    print(f"{'from scratch, phase':<24} {'seconds':>8}")
    for phase in SCRATCH_PHASES:
        print(f"  {phase:<22} {s.get(phase, 0.0):>8.1f}")
    total = sum(s.get(p, 0.0) for p in SCRATCH_PHASES)
    print(f"  {'total':<22} {total:>8.1f}   thesis: 81 s (python) / 123 s (openjdk)")
    print(f"warm state: {made[1] / 1e6:.0f} MB on disk, ready {made[0]:.0f} s after the first VM")
    print(f"{'from a template':<24} {'VM start':>8} {'request':>8}   (medians of {args.runs})")
    for mode, label in (("warm", "resume"), ("cold", "boot")):
        phase = "vm_resume" if mode == "warm" else "vm_boot"
        starts = [r.vms[0].seconds.get("vm_clone", 0.0) + r.vms[0].seconds.get(phase, 0.0)
                  for r, _ in runs[mode]]  # fmt: skip
        walls = [w for _, w in runs[mode]]
        kinds = sorted({r.vms[0].start_kind for r, _ in runs[mode]})
        ref = "target <= 1 s (TCG)" if mode == "warm" else "thesis: 26 s / 29 s (KVM)"
        print(
            f"  {mode + ' (' + label + ')':<22} {statistics.median(starts):>8.2f}"
            f" {statistics.median(walls):>8.2f}   {ref}; runs {[round(x, 2) for x in starts]}"
            f" started {kinds}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=BASE_DIR, help="base image directory")
    ap.add_argument("--packages", nargs="+", default=["vmm-test-a", "vmm-test-c"])
    ap.add_argument("--apt-source", action="append", default=None, help="guest apt line(s)")
    ap.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--vcpus", type=int, default=2)
    ap.add_argument("--memory", type=int, default=1024)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vmmesh-ready-", dir="/var/tmp") as tmp:
        data = Path(tmp) / "data"
        if args.apt_source:
            trio.run(bench, args, data, args.apt_source)
            return 0
        with AptRepo(Path(tmp) / "repo") as repo:
            trio.run(bench, args, data, [repo.source_line()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
