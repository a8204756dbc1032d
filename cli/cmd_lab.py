"""`vmmesh lab up N | down | status`: hosts in network namespaces on this machine."""

from __future__ import annotations

import argparse

from vmmesh import lab as labmod
from vmmesh.config import Config

from .output import console, print_json, table


def lab(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "up":
        with console.status(f"bringing up {args.count} lab hosts in {args.dir} ..."):
            made = labmod.lab_up(
                args.count, args.dir, tag=args.tag, node_args=args.node_arg, image=args.image
            )
        hosts = [
            {"host": h.index, "netns": h.netns, "address": h.address, "data_dir": h.data_dir}
            for h in made.hosts
        ]
        if args.json:
            print_json({"lab_dir": str(args.dir), "bridge": made.bridge, "hosts": hosts})
        else:
            table(
                f"lab {args.tag} on bridge {made.bridge}",
                ["host", "netns", "address", "data dir"],
                [(h["host"], h["netns"], h["address"], h["data_dir"]) for h in hosts],
            )
            console.print(f"talk to host i with: vmmesh --data-dir {args.dir}/hosts/h<i> peers")
        return 0
    if args.action == "down":
        removed = labmod.lab_down(args.dir, tag=args.tag)
        if args.json:
            print_json({"removed": removed})
        else:
            console.print(f"lab down: removed {len(removed)} item(s)")
        return 0
    rows = labmod.lab_status(args.dir)
    if args.json:
        print_json({"hosts": rows})
    else:
        table(
            "lab",
            ["host", "netns", "address", "node"],
            [
                (r["host"], r["netns"], r["address"], "running" if r["node_running"] else "stopped")
                for r in rows
            ],
        )
    return 0
