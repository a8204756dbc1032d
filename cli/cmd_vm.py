"""`vmmesh request`, `vms`, `templates`, `shutdown`, `exec`, `ssh`."""

from __future__ import annotations

import argparse
import base64
import os
import sys
from typing import Any

from vmmesh.config import Config
from vmmesh.errors import UsageError
from vmmesh.model import check_package, check_vm_name

from . import client
from .output import console, print_json, progress_view, table

MAX_CUSTOM_ZIP = 256 << 20


def _check_name(name: str) -> str:
    try:
        return check_vm_name(name)
    except Exception:
        raise UsageError(
            f"bad VM name {name!r}: use letters, digits, '-', '_' or '.', at most 63"
        ) from None


def request(args: argparse.Namespace, cfg: Config) -> int:
    name = _check_name(args.name)
    if args.count < 1:
        raise UsageError("COUNT must be at least 1")
    for pkg in args.packages:
        try:
            check_package(pkg)
        except Exception:
            raise UsageError(f"bad package name {pkg!r}") from None
    body: dict[str, Any] = {
        "name": name,
        "count": args.count,
        "packages": sorted(set(args.packages)),
        "dry_run": bool(args.dry_run),
    }
    if args.vcpus:
        body["vcpus"] = args.vcpus
    if args.memory:
        body["memory_mb"] = args.memory
    if args.custom is not None:
        if not args.custom.is_file():
            raise UsageError(f"--custom: no such file: {args.custom}")
        data = args.custom.read_bytes()
        if len(data) > MAX_CUSTOM_ZIP:
            raise UsageError(f"--custom: {args.custom} is over {MAX_CUSTOM_ZIP >> 20} MB")
        if not data.startswith(b"PK"):
            raise UsageError(f"--custom: {args.custom} is not a zip file")
        body["custom_zip"] = data
    show = not args.json and sys.stderr.isatty()
    with progress_view(show) as view:
        reply = client.stream(cfg, "vm.request", body, view.update if view else None)
    if args.json:
        print_json(reply)
    else:
        _print_report(reply)
    if args.dry_run:
        return 0
    return 0 if not reply.get("unplaced") else 1


def _print_report(reply: dict[str, Any]) -> None:
    plan = reply.get("plan")
    if plan:
        rows: list[tuple[Any, ...]] = [
            (s.get("host", s.get("node_id", "")), s.get("count"), s.get("reason", ""))
            for s in plan.get("shares", [])
        ]
        table("placement plan", ["host", "VMs", "why"], rows)
    vms = reply.get("vms", [])
    if vms:
        rows = [
            (v.get("name"), v.get("host"), v.get("template", "")[:12],
             "built" if v.get("built") else "reused", f"{v.get('seconds', 0):.1f}s")
            for v in vms
        ]
        table(f"request {reply.get('name', '')}: {len(vms)} VM(s)",
              ["VM", "host", "template", "template was", "took"], rows)
    for miss in reply.get("unplaced", []):
        console.print(f"[red]not placed[/]: {miss.get('count')} VM(s): {miss.get('reason')}")
    for note in reply.get("notes", []):
        console.print(f"[yellow]note[/]: {note}")


def vms(args: argparse.Namespace, cfg: Config) -> int:
    reply = client.call(cfg, "vm.list", {})
    if args.json:
        print_json(reply)
        return 0
    rows = [
        (v.get("name"), v.get("host"), v.get("state"), " ".join(v.get("packages", [])),
         v.get("vcpus"), v.get("memory_mb"), v.get("vm_id", "")[:12])
        for v in reply.get("vms", [])
    ]
    table("VMs", ["name", "host", "state", "packages", "vCPUs", "MB", "id"], rows)
    for err in reply.get("errors", []):
        console.print(f"[yellow]not answered[/]: {err}")
    return 0


def templates(args: argparse.Namespace, cfg: Config) -> int:
    reply = client.call(cfg, "template.list", {})
    if args.json:
        print_json(reply)
        return 0
    rows = [
        (t.get("host"), t.get("template_id", "")[:12], " ".join(t.get("packages", [])),
         f"{t.get('size', 0) / 1e6:.1f} MB", t.get("depth", ""))
        for t in reply.get("templates", [])
    ]
    table("templates", ["host", "id", "packages", "delta", "depth"], rows)
    return 0


def shutdown(args: argparse.Namespace, cfg: Config) -> int:
    name = _check_name(args.name)
    reply = client.call(cfg, "vm.shutdown", {"name": name})
    if args.json:
        print_json(reply)
    else:
        for h in reply.get("hosts", []):
            console.print(f"{h.get('host')}: stopped {h.get('stopped', 0)} VM(s)")
        for err in reply.get("errors", []):
            console.print(f"[red]failed[/]: {err}")
        console.print(f"{reply.get('stopped', 0)} VM(s) called {name} stopped and deleted")
    return 0 if not reply.get("errors") else 1


def exec_(args: argparse.Namespace, cfg: Config) -> int:
    name = _check_name(args.name)
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("usage: vmmesh exec NAME -- COMMAND [ARGS...]")
    reply = client.call(cfg, "vm.exec", {"name": name, "argv": argv})
    out = base64.b64decode(reply.get("stdout", ""))
    err = base64.b64decode(reply.get("stderr", ""))
    if args.json:
        print_json({**reply, "stdout": out.decode(errors="replace"),
                    "stderr": err.decode(errors="replace")})
    else:
        sys.stdout.buffer.write(out)
        sys.stderr.buffer.write(err)
        sys.stdout.flush()
    return int(reply.get("exit_code", 1))


def ssh(args: argparse.Namespace, cfg: Config) -> int:
    name = _check_name(args.name)
    reply = client.call(cfg, "vm.ssh", {"name": name})
    host, port = reply["address"], int(reply["port"])
    if args.json:
        print_json(reply)
        return 0
    os.execvp("ssh", ["ssh", "-p", str(port), f"root@{host}"])
