"""`vmmesh migrate VM [--to HOST] [--offline]`: move a running VM to another host."""

from __future__ import annotations

import argparse
import sys

from vmmesh.api.migrate import (
    DRAIN,
    MIGRATE,
    UNDRAIN,
    DrainReport,
    DrainRequest,
    MigrateReport,
    MigrateRequest,
    Mode,
)
from vmmesh.config import Config

from . import client
from .output import console, print_json, progress_view, rate


def migrate(args: argparse.Namespace, cfg: Config) -> int:
    mode = Mode.OFFLINE if args.offline else Mode.LIVE
    body = MigrateRequest(vm=args.vm, to=args.to, mode=mode).checked()
    show = not args.json and sys.stderr.isatty()
    with progress_view(show) as view:
        reply = client.stream(cfg, MIGRATE, body, view.update if view else None)
    _print(args, reply)
    return 0


def _print(args: argparse.Namespace, r: MigrateReport) -> None:
    if args.json:
        print_json(r)
        return
    speed = rate(r.wire_bytes / r.seconds) if r.seconds else "-"
    downtime = f", downtime {r.downtime_ms} ms" if r.downtime_ms is not None else ""
    console.print(
        f"migrated {r.vm} from {r.source} to {r.target} ({r.mode}) in {r.seconds:.1f} s"
        f"{downtime}: {r.ram_bytes / 1e6:.1f} MB of memory, {r.disk_bytes / 1e6:.1f} MB of disk, "
        f"{r.wire_bytes / 1e6:.1f} MB on the wire ({speed})"
    )
    if r.why_target:
        console.print(f"  target: {r.target} ({r.why_target})")
    console.print("  " + ", ".join(f"{p.name} {p.seconds:.2f} s" for p in r.phases))


def drain(args: argparse.Namespace, cfg: Config) -> int:
    body = DrainRequest(host=args.host).checked()
    show = not args.json and sys.stderr.isatty()
    with progress_view(show) as view:
        reply = client.stream(cfg, DRAIN, body, view.update if view else None)
    return _print_drain(args, reply)


def undrain(args: argparse.Namespace, cfg: Config) -> int:
    body = DrainRequest(host=args.host, bring_back=args.bring_back).checked()
    show = not args.json and sys.stderr.isatty()
    with progress_view(show) as view:
        reply = client.stream(cfg, UNDRAIN, body, view.update if view else None)
    return _print_drain(args, reply)


def _print_drain(args: argparse.Namespace, r: DrainReport) -> int:
    """Exit 1 when a VM could not be moved (the report says which and why)."""
    if args.json:
        print_json(r)
        return 1 if r.errors else 0
    what = "draining: takes no new VM" if r.draining else "takes VMs again"
    console.print(f"{r.host} {what}; {len(r.moved)} VM(s) moved in {r.seconds:.1f} s")
    for m in r.moved:
        downtime = f", downtime {m.downtime_ms} ms" if m.downtime_ms is not None else ""
        console.print(f"  {m.vm}: {m.source} -> {m.target} in {m.seconds:.1f} s{downtime}")
    for line in r.left:
        console.print(f"  left: {line}")
    for line in r.errors:
        console.print(f"  [red]not moved[/red]: {line}")
    return 1 if r.errors else 0
