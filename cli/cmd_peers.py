"""`vmmesh peers` and `vmmesh status`."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from vmmesh.api.codec import Empty
from vmmesh.api.figures import Figure, Unit
from vmmesh.api.host import WorkItem, WorkKind
from vmmesh.api.node import PEERS, STATUS
from vmmesh.config import Config

from . import client
from .output import ago, mb, print_json, rate, table


def peers(args: argparse.Namespace, cfg: Config) -> int:
    reply = client.call(cfg, PEERS, Empty())
    if args.json:
        print_json(reply)
        return 0
    now = time.time()
    rows = []
    for h in reply.hosts:
        cap = h.capacity
        free = f"{cap.free_slots} VMs, {mb(cap.storage_free_mb)}"
        if cap.blocked:
            free = f"none: {cap.blocked}"
        rows.append(
            (
                h.name + (" (this host)" if h.this_host else ""),
                h.address,
                h.status,
                "-" if h.this_host else ago(h.last_heard, now),
                f"{cap.cores} cores, {mb(cap.memory_mb)}",
                free,
                len(h.templates),
                len(h.vms),
            )
        )
    table(
        f"mesh {reply.mesh_id[:12]}",
        ["host", "address", "state", "last heard", "size", "free", "templates", "VMs"],
        rows,
    )
    work = [(h.name, w) for h in reply.hosts if h.status != "down" for w in h.work]
    if work:
        table("work under way", ["host", "work"], [(host, work_line(w, now)) for host, w in work])
    return 0


def work_line(w: WorkItem, now: float) -> str:
    """One line for a host's work as it gossips it (what every host's page shows too)."""
    what = {WorkKind.FETCH: "fetching", WorkKind.MIGRATION: "moving", WorkKind.JOB: "job"}[w.kind]
    text = f"{what} {w.name}" + (f" to {w.peer}" if w.peer else "")
    if w.kind is WorkKind.JOB:
        text += f": {w.done} of {w.total} commands" + (f", {w.failed} failed" if w.failed else "")
        text += f" on {w.vms} VMs" if w.vms else ""
    elif w.total:
        text += f": {mb(w.done / (1 << 20))} of {mb(w.total / (1 << 20))}"
    if w.fraction is not None:
        text += f" ({w.fraction:.0%})"
    if w.rate:
        text += f", {rate(w.rate)}"
    if w.phase:
        text += f", {w.phase}"
    if w.started:
        text += f", started {ago(w.started, now)}"
    return text


def status(args: argparse.Namespace, cfg: Config) -> int:
    reply = client.call(cfg, STATUS, Empty())
    if args.json:
        print_json(reply)
        return 0
    cap = reply.capacity
    refused = ", ".join(f"{n} {cause}" for cause, n in reply.refusals.items() if n) or "none"
    rows = [
        ("node", f"{reply.name} ({reply.node_id})"),
        ("mesh", reply.mesh_id),
        ("admin", "yes" if reply.admin else "no"),
        ("listening", f"{reply.address}:{reply.port}"),
        ("uptime", f"{reply.uptime:.0f}s"),
        ("peers", f"{reply.peers_up} up / {reply.peers_total} known"),
        (
            "capacity",
            f"{cap.cores} cores, {mb(cap.memory_mb)}, {cap.free_slots} free VM slots"
            + (f" (none: {cap.blocked})" if cap.blocked else ""),
        ),
        ("storage", f"{mb(cap.storage_free_mb)} free of {mb(cap.storage_quota_mb)} quota"),
        *reply.facts.items(),
        ("refused", refused),
        *figure_lines(reply.figures),
    ]
    table("vmmesh status", ["", ""], rows)
    return 0


def figure_lines(figures: Sequence[Figure]) -> list[tuple[str, str]]:
    """The extensions' figures, one line per name: its value, or each label's."""
    lines: dict[str, list[str]] = {}
    for f in figures:
        value = _size(f.value) if f.unit is Unit.BYTES else f"{f.value:g}"
        if f.unit is Unit.SECONDS:
            value += " s"
        label = " ".join(f.labels[k] for k in sorted(f.labels))
        lines.setdefault(f.name.replace("_", " "), []).append(
            f"{label} {value}" if label else value
        )
    return [(name, ", ".join(values)) for name, values in lines.items()]


def _size(n: float) -> str:
    return mb(n / (1 << 20)) if n >= 1 << 20 else f"{n / 1024:.1f} kB"
