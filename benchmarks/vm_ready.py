"""VM ready (guest agent answers): from scratch, cold and warm builds; from a template.

What it shows (SPEC table, row 2; thesis §5.2): the time from a request to a
VM whose guest agent answers, through the same code the node runs
(``VmManager.request_local``), each build on a fresh data directory:

1. *from scratch*: no template holds the packages, so one is built, then
   the VM is made; ``--runs`` rounds, alternating so that machine noise
   cancels: a *cold build* (warm starts off: clone, boot, apt install,
   power off, record; the VM boots) and a *warm build* (the base image's
   warm state made first, as a node makes it once when it takes the image
   up, and reported apart: the build resumes it, installs, is saved as the
   new template's warm state, and the VM resumes that);
2. on the last warm build's directory, *from a template*, ``--runs`` times
   each, alternating: *warm* (a linked clone over the warm overlay, the
   saved RAM and devices resumed) and *cold* (a linked clone and a boot).

Each row gives the whole ``request_local`` (what the user waits for), the
VM's start (clone + boot or resume, to the agent's answer) and the phases,
medians over the runs.

Packages come from the local test apt repository (``tests/aptrepo.py``:
tiny ``vmm-test-*`` packages, offline, deterministic) unless ``--apt-source``
names another and ``--packages`` real ones; the thesis installed python and
openjdk from a mirror, so its install step is far heavier than ours.  The
accelerator is probed (``vmmesh.hypervisor.accel``) unless ``--accel`` says.

    .venv/bin/python -m benchmarks.vm_ready [--runs 3] [--accel tcg] [--json]
    .venv/bin/python -m benchmarks.vm_ready --packages python3 \\
        --apt-source "deb http://deb.debian.org/debian bookworm main"
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import trio

from benchmarks.report import print_result
from tests.aptrepo import AptRepo
from vmmesh.api.vm import ShareReply
from vmmesh.host.build import BaseImage
from vmmesh.host.capacity import CapacityPolicy, probe_host
from vmmesh.host.images import read_manifest
from vmmesh.host.store import Store
from vmmesh.host.templates import TemplateManager
from vmmesh.host.warm import WarmStore
from vmmesh.hypervisor.accel import probe_accel
from vmmesh.hypervisor.qemu import QemuHypervisor
from vmmesh.vm.manager import VmManager

BASE_DIR = Path("/var/cache/vmmesh-dev/base")
# Phases as the table shows them; a group's names are the cold and warm names
# of one step (a warm build resumes where a cold one boots, and is saved where
# a cold one is powered off).
BUILD_PHASES = (("clone",), ("boot", "resume"), ("update",), ("install",),
                ("shutdown", "save"), ("record",))  # fmt: skip
VM_PHASES = (("vm_clone",), ("vm_boot", "vm_resume"), ("identity",))
THESIS_SCRATCH = "thesis: 81 s (python) / 123 s (openjdk)"

Sample = tuple[ShareReply, float]  # the report and the whole request's seconds


async def bench(args: argparse.Namespace, tmp: Path, sources: list[str]) -> dict[str, Any]:
    accel = args.accel if args.accel != "auto" else await probe_accel()
    scratch: dict[str, list[Sample]] = {"cold": [], "warm": []}
    base_states: list[tuple[float, int]] = []
    for i in range(args.runs):
        for mode in ("cold", "warm"):
            data = tmp / f"{mode}-{i}"
            async with _host(args, accel, data, sources) as vms:
                if mode == "cold":
                    vms.warm_enabled = False
                else:
                    vms.schedule_warm(None)
                    base_states.append(await _warmed(vms, vms.templates.base.image_id))
                scratch[mode].append(await _one(vms, args))
                if mode == "warm" and i == args.runs - 1:
                    tid = scratch["warm"][-1][0].template
                    template_state, runs = await _from_template(vms, args, tid)
            shutil.rmtree(data, ignore_errors=True)
    return {
        "accel": accel,
        "vcpus": args.vcpus,
        "memory_mb": args.memory,
        "packages": args.packages,
        "runs": args.runs,
        "rows": [
            _row("from scratch, cold build", scratch["cold"], THESIS_SCRATCH),
            _row("from scratch, warm build", scratch["warm"], THESIS_SCRATCH),
            _row("from a template, warm (resume)", runs["warm"], "target <= 1 s (TCG)"),
            _row("from a template, cold (boot)", runs["cold"], "thesis: 26 s / 29 s (KVM)"),
        ],
        "base_warm_state": {
            "made_s": round(statistics.median(s for s, _ in base_states), 1),
            "runs_s": [round(s, 1) for s, _ in base_states],
            "mb": round(base_states[-1][1] / 1e6),
        },
        "template_warm_state": {
            "ready_after_first_vm_s": round(template_state[0], 1),
            "mb": round(template_state[1] / 1e6),
        },
    }


@contextlib.asynccontextmanager
async def _host(
    args: argparse.Namespace, accel: str, data: Path, sources: list[str]
) -> AsyncIterator[VmManager]:
    """A host's VM manager on ``data`` (a fresh directory), running until the block ends."""
    data.mkdir(parents=True)
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
        host="bench",  # the name and node id its VmMade records carry (no mesh here)
        node_id="0123456789abcdef",
        warm=WarmStore(data, hv, base),
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(vms.run)
            yield vms
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for guest in list(vms.guests.values()):
                await guest.kill()
        store.close()


async def _from_template(
    vms: VmManager, args: argparse.Namespace, tid: str
) -> tuple[tuple[float, int], dict[str, list[Sample]]]:
    """The template's warm state (waited for), then its VMs warm and cold, alternating."""
    state = await _warmed(vms, tid)
    runs: dict[str, list[Sample]] = {"warm": [], "cold": []}
    for _ in range(args.runs):
        for mode in ("warm", "cold"):
            vms.warm_enabled = mode == "warm"
            runs[mode].append(await _one(vms, args))
    return state, runs


async def _one(vms: VmManager, args: argparse.Namespace) -> Sample:
    started = time.monotonic()
    report = await vms.request_local(
        "bench", 1, args.packages, vcpus=args.vcpus, memory_mb=args.memory
    )
    took = time.monotonic() - started
    if not report.vms:
        raise SystemExit(f"no VM was made: {report.errors}")
    await vms.shutdown("bench")
    return report, took


async def _warmed(vms: VmManager, key: str) -> tuple[float, int]:
    """Wait for the warm state of ``key`` (a template, or the base image), made in the
    background; (seconds waited, bytes)."""
    assert vms.warm is not None
    started = time.monotonic()
    with trio.fail_after(1800):
        while (state := vms.warm.get(key)) is None:  # noqa: ASYNC110 - a background task
            await trio.sleep(0.5)
    return time.monotonic() - started, state.size()


def _row(label: str, samples: list[Sample], reference: str) -> dict[str, Any]:
    """One row of the table: medians of the whole request, the VM's start and each phase."""
    secs = [r.vms[0].phases for r, _ in samples]
    groups = (BUILD_PHASES if samples[0][0].built else ()) + VM_PHASES
    phases = {}
    for group in groups:
        name = "|".join(k for k in group if any(k in s for s in secs)) or group[0]
        phases[name] = round(statistics.median(sum(s.get(k, 0.0) for k in group) for s in secs), 2)
    walls = [w for _, w in samples]
    return {
        "row": label,
        "request_s": round(statistics.median(walls), 2),
        "vm_start_s": round(statistics.median(_vm_start(s) for s in secs), 2),
        "phases_s": phases,
        "runs_s": [round(w, 2) for w in walls],
        "started": sorted({_started(r) for r, _ in samples}),
        "reference": reference,
    }


def _vm_start(seconds: Mapping[str, float]) -> float:
    return sum(seconds.get(k, 0.0) for k in ("vm_clone", "vm_boot", "vm_resume"))


def _started(report: ShareReply) -> str:
    """How the build (if any) and the VM started: a warm state that did not resume shows."""
    vm = f"VM {report.vms[0].start}"
    if not report.built:
        return vm
    return f"build {'resumed' if 'resume' in report.template_seconds else 'booted'}, {vm}"


def _print(result: dict[str, Any]) -> None:
    print(
        f"VM ready (guest agent answers), accel={result['accel'].upper()},"
        f" {result['vcpus']} vCPU, {result['memory_mb']} MB,"
        f" packages: {' '.join(result['packages'])}; medians of {result['runs']}"
    )
    print(f"{'':<32} {'request':>8} {'VM start':>8}")
    for row in result["rows"][:2]:
        _print_row(row)
    base, tpl = result["base_warm_state"], result["template_warm_state"]
    print(
        f"base image's warm state (once per host, not in a request): made in"
        f" {base['made_s']:.0f} s (runs {base['runs_s']}), {base['mb']} MB"
    )
    print(
        f"template's warm state: {tpl['mb']} MB, ready {tpl['ready_after_first_vm_s']:.0f} s"
        " after its first VM (0: the build saved it)"
    )
    for row in result["rows"][2:]:
        _print_row(row)


def _print_row(row: dict[str, Any]) -> None:
    print(
        f"  {row['row']:<30} {row['request_s']:>8.2f} {row['vm_start_s']:>8.2f}"
        f"   {row['reference']}"
    )
    phases = ", ".join(f"{k} {v:.2f}" for k, v in row["phases_s"].items())
    print(f"    {phases}; runs {row['runs_s']}; {'; '.join(row['started'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=BASE_DIR, help="base image directory")
    ap.add_argument("--packages", nargs="+", default=["vmm-test-a", "vmm-test-c"])
    ap.add_argument("--apt-source", action="append", default=None, help="guest apt line(s)")
    ap.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    ap.add_argument("--runs", type=int, default=3, help="rounds of each comparison")
    ap.add_argument("--vcpus", type=int, default=2)
    ap.add_argument("--memory", type=int, default=1024)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    with (
        tempfile.TemporaryDirectory(prefix="vmmesh-ready-", dir="/var/tmp") as tmp,
        contextlib.ExitStack() as stack,
    ):
        sources = args.apt_source
        if not sources:
            sources = [stack.enter_context(AptRepo(Path(tmp) / "repo")).source_line()]
        result = trio.run(bench, args, Path(tmp), sources)
    return print_result(result, args, _print)


if __name__ == "__main__":
    sys.exit(main())
