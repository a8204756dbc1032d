"""`vmmesh peers` and `vmmesh status`."""

from __future__ import annotations

import argparse
import time

from vmmesh.config import Config

from . import client
from .output import ago, mb, print_json, table


def peers(args: argparse.Namespace, cfg: Config) -> int:
    reply = client.call(cfg, "node.peers", {})
    hosts = reply.get("hosts", [])
    if args.json:
        print_json(reply)
        return 0
    now = time.time()
    rows = []
    for h in hosts:
        cap = h.get("capacity") or {}
        free = f"{cap.get('free_slots', 0)} VMs, {mb(cap.get('storage_free_mb', 0))}"
        rows.append(
            (
                h.get("name", "") + (" (this host)" if h.get("self") else ""),
                h.get("address", ""),
                h.get("status", ""),
                ago(h.get("last_heard", 0.0), now) if not h.get("self") else "-",
                f"{cap.get('cores', 0)} cores, {mb(cap.get('memory_mb', 0))}",
                free,
                len(h.get("templates", [])),
                len(h.get("vms", [])),
            )
        )
    table(
        f"mesh {reply.get('mesh_id', '')[:12]}",
        ["host", "address", "state", "last heard", "size", "free", "templates", "VMs"],
        rows,
    )
    return 0


def status(args: argparse.Namespace, cfg: Config) -> int:
    reply = client.call(cfg, "node.status", {})
    if args.json:
        print_json(reply)
        return 0
    cap = reply.get("capacity") or {}
    rows = [
        ("node", f"{reply.get('name')} ({reply.get('node_id')})"),
        ("mesh", reply.get("mesh_id", "")),
        ("admin", "yes" if reply.get("admin") else "no"),
        ("listening", f"{reply.get('address')}:{reply.get('port')}"),
        ("accelerator", reply.get("accel", "")),
        ("uptime", f"{reply.get('uptime', 0):.0f}s"),
        ("peers", f"{reply.get('peers_up', 0)} up / {reply.get('peers_total', 0)} known"),
        (
            "capacity",
            f"{cap.get('cores', 0)} cores, {mb(cap.get('memory_mb', 0))}, "
            f"{cap.get('free_slots', 0)} free VM slots",
        ),
        (
            "storage",
            f"{mb(cap.get('storage_free_mb', 0))} free of "
            f"{mb(cap.get('storage_quota_mb', 0))} quota",
        ),
    ]
    table("vmmesh status", ["", ""], rows)
    return 0
