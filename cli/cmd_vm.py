"""`vmmesh request`, `vms`, `templates`, `shutdown`, `exec`, `ssh`."""

from __future__ import annotations

import argparse
import base64
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from vmmesh.api.host import check_package, check_vm_name
from vmmesh.config import Config
from vmmesh.errors import UsageError
from vmmesh.host.sshkeys import check_public_key, known_hosts_line

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
            (
                v.get("name"),
                v.get("host"),
                v.get("template", "")[:12],
                "built" if v.get("built") else "reused",
                f"{v.get('seconds', 0):.1f}s",
            )
            for v in vms
        ]
        table(
            f"request {reply.get('name', '')}: {len(vms)} VM(s)",
            ["VM", "host", "template", "template was", "took"],
            rows,
        )
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
        (
            v.get("name"),
            v.get("host"),
            v.get("state"),
            " ".join(v.get("packages", [])),
            v.get("vcpus"),
            v.get("memory_mb"),
            v.get("vm_id", "")[:12],
        )
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
        (
            t.get("host"),
            t.get("template_id", "")[:12],
            " ".join(t.get("packages", [])),
            f"{t.get('size', 0) / 1e6:.1f} MB",
            t.get("depth", ""),
        )
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


def _options_then_command(args: argparse.Namespace, *, identity: bool = False) -> list[str]:
    """Split what follows NAME: our options (``--json``, ``-i KEY``) up to ``--``, then the command.

    argparse hands everything after NAME to the REMAINDER argument, options too.
    """
    rest = list(args.argv)
    while rest and rest[0] != "--":
        opt = rest.pop(0)
        if opt == "--json":
            args.json = True
        elif identity and opt == "-i" and rest:
            args.identity = Path(rest.pop(0))
        elif opt.startswith("-"):
            raise UsageError(f"unknown option {opt!r} (put the command after --)")
        else:
            rest.insert(0, opt)
            break
    if rest and rest[0] == "--":
        rest.pop(0)
    return rest


def exec_(args: argparse.Namespace, cfg: Config) -> int:
    name = _check_name(args.name)
    argv = _options_then_command(args)
    if not argv:
        raise UsageError("usage: vmmesh exec NAME -- COMMAND [ARGS...]")
    reply = client.call(cfg, "vm.exec", {"name": name, "argv": argv})
    out = base64.b64decode(reply.get("stdout", ""))
    err = base64.b64decode(reply.get("stderr", ""))
    if args.json:
        print_json(
            {
                **reply,
                "stdout": out.decode(errors="replace"),
                "stderr": err.decode(errors="replace"),
            }
        )
    else:
        sys.stdout.buffer.write(out)
        sys.stderr.buffer.write(err)
        sys.stdout.flush()
    return int(reply.get("exit_code", 1))


SSH_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")


def _ssh_identity(path: Path | None) -> tuple[Path, str]:
    """The private key ssh will use and its public half (``KEY.pub``)."""
    candidates = [path] if path is not None else [Path.home() / ".ssh" / n for n in SSH_KEYS]
    for key in candidates:
        pub = key.with_name(key.name + ".pub")
        if key.is_file() and pub.is_file():
            return key, check_public_key(pub.read_text(errors="replace"))
    if path is not None:
        raise UsageError(f"no ssh key pair at {path} (needs {path} and {path}.pub)")
    raise UsageError(
        "no ssh key in ~/.ssh (id_ed25519, id_ecdsa or id_rsa): make one with "
        "`ssh-keygen -t ed25519`, or pass -i KEY"
    )


def ssh(args: argparse.Namespace, cfg: Config) -> int:
    """Authorise the user's key in the VM, then run ssh with the VM's host key pinned."""
    name = _check_name(args.name)
    command = _options_then_command(args, identity=True)
    key, public = _ssh_identity(args.identity)
    if not args.json and shutil.which("ssh") is None:
        raise UsageError("no ssh client here: install openssh-client")
    reply = client.call(cfg, "vm.ssh", {"name": name, "keys": [public]})
    address, port = str(reply["address"]), int(reply["port"])
    known_line = known_hosts_line(address, port, str(reply["host_key"]))
    if args.json:
        print_json({**reply, "identity": str(key), "known_hosts": known_line.strip()})
        return 0
    with tempfile.TemporaryDirectory(prefix="vmmesh-ssh-") as tmp:
        known = Path(tmp) / "known_hosts"
        known.write_text(known_line)
        argv = [
            "ssh",
            "-i",
            str(key),
            "-p",
            str(port),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={known}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=60",
            "-o",
            "LogLevel=ERROR",
            f"{reply.get('user', 'root')}@{address}",
            *command,
        ]
        proc = subprocess.Popen(argv)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue  # ^C belongs to the ssh session
