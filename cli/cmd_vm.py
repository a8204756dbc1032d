"""`vmmesh request`, `vms`, `templates`, `shutdown`, `exec`, `ssh`."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vmmesh.api.codec import Empty
from vmmesh.api.vm import (
    EXEC,
    FETCH_ALWAYS,
    FETCH_AUTO,
    FETCH_NEVER,
    LIST,
    MAX_CUSTOM_ZIP,
    REQUEST,
    SHUTDOWN,
    SSH,
    TEMPLATES,
    ExecRequest,
    Lineage,
    RequestReport,
    RequestVms,
    ShutdownRequest,
    SshRequest,
)
from vmmesh.config import Config
from vmmesh.errors import UsageError
from vmmesh.host.sshkeys import check_public_key, known_hosts_line

from . import client
from .output import ago, console, print_json, progress_view, table


def _fetch_policy(args: argparse.Namespace) -> str:
    if getattr(args, "fetch", False) and getattr(args, "install", False):
        raise UsageError("--fetch and --install exclude each other")
    if getattr(args, "fetch", False):
        return FETCH_ALWAYS
    if getattr(args, "install", False):
        return FETCH_NEVER
    return FETCH_AUTO


def read_custom_zip(path: Path | None) -> bytes | None:
    """The ``--custom`` zip, checked for what the CLI can see (size, magic)."""
    if path is None:
        return None
    if not path.is_file():
        raise UsageError(f"--custom: no such file: {path}")
    if path.stat().st_size > MAX_CUSTOM_ZIP:
        raise UsageError(f"--custom: {path} is over {MAX_CUSTOM_ZIP >> 20} MB")
    data = path.read_bytes()
    if not data.startswith(b"PK"):
        raise UsageError(f"--custom: {path} is not a zip file")
    return data


def request(args: argparse.Namespace, cfg: Config) -> int:
    if args.count < 1:
        raise UsageError("COUNT must be at least 1")
    body = RequestVms(
        name=args.name,
        count=args.count,
        packages=frozenset(args.packages),
        custom_zip=read_custom_zip(args.custom),
        dry_run=bool(args.dry_run),
        vcpus=args.vcpus,
        memory_mb=args.memory,
        fetch=_fetch_policy(args),
        keep_alive=args.keep_alive,
    ).checked()
    show = not args.json and sys.stderr.isatty()
    with progress_view(show) as view:
        reply = client.stream(cfg, REQUEST, body, view.update if view else None)
    if args.json:
        print_json(reply)
    else:
        print_report(reply)
    if args.dry_run:
        return 0
    return 0 if not reply.unplaced else 1


def print_report(reply: RequestReport) -> None:
    if reply.plan:
        rows = [(s.host, s.count, s.reason) for s in reply.plan]
        table("placement plan", ["host", "VMs", "why"], rows)
    if reply.vms:
        vm_rows = [
            (
                v.name,
                v.host,
                v.template[:12],
                _how(v.source.how, v.built),
                v.start,
                f"{v.seconds:.1f}s",
            )
            for v in reply.vms
        ]
        table(
            f"request {reply.name}: {len(reply.vms)} VM(s)",
            ["VM", "host", "template", "template was", "start", "took"],
            vm_rows,
        )
    for v in reply.vms:
        src = v.source
        if src.why:
            console.print(f"{v.name}: template {src.how}: {src.why}")
    for miss in reply.unplaced:
        console.print(f"[red]not placed[/]: {miss.count} VM(s): {miss.reason}")
    for note in reply.notes:
        console.print(f"[yellow]note[/]: {note}")
    for err in reply.errors:
        console.print(f"[red]error[/]: {err}")


def _how(how: str, built: bool) -> str:
    if how != "reused":
        return how
    return "built" if built else "reused"


def vms(args: argparse.Namespace, cfg: Config) -> int:
    reply = client.call(cfg, LIST, Empty())
    if args.json:
        print_json(reply)
        return 0
    rows = [
        (
            v.name,
            v.host,
            v.state if v.state != "lost" else f"lost: {v.stop_reason}",
            " ".join(sorted(v.packages)),
            v.vcpus,
            v.memory_mb,
            f"{v.start} {v.start_seconds:.1f}s" if v.state == "running" else "",
            _lineage(v.lineage),
            v.vm_id[:12],
        )
        for v in reply.vms
    ]
    columns = ["name", "host", "state", "packages", "vCPUs", "MB", "start", "kept", "id"]
    table("VMs", columns, rows)
    for err in reply.errors:
        console.print(f"[yellow]not answered[/]: {err}")
    return 0


def _lineage(lineage: Lineage) -> str:
    """Keep-alive, generation and origin, for the table ("" for a plain VM)."""
    if not lineage.keep_alive and lineage.origin in ("", "requested"):
        return ""
    kept = f"gen {lineage.generation}" if lineage.keep_alive else ""
    origin = "" if lineage.origin == "requested" else lineage.origin
    return "; ".join(part for part in (kept, origin) if part)


def templates(args: argparse.Namespace, cfg: Config) -> int:
    reply = client.call(cfg, TEMPLATES, Empty())
    if args.json:
        print_json(reply)
        return 0
    rows = [
        (
            t.host,
            t.template_id[:12],
            " ".join(sorted(t.packages)),
            f"{t.size / 1e6:.1f} MB",
            t.depth,
            t.origin,
            f"{t.warm_size / 1e6:.0f} MB" if t.warm_size else "-",
            ago(t.last_used),
            ", ".join(t.holders),
        )
        for t in reply.templates
    ]
    table(
        "templates",
        ["host", "id", "packages", "delta", "depth", "origin", "warm", "last used", "held by"],
        rows,
    )
    for err in reply.errors:
        console.print(f"[yellow]not answered[/]: {err}")
    return 0


def shutdown(args: argparse.Namespace, cfg: Config) -> int:
    reply = client.call(cfg, SHUTDOWN, ShutdownRequest(name=args.name).checked())
    if args.json:
        print_json(reply)
    else:
        for r in reply.removed:
            console.print(f"{r.host}: removed {r.name} ({r.state})")
        for err in reply.errors:
            console.print(f"[red]failed[/]: {err}")
        console.print(f"{len(reply.removed)} VM(s) called {args.name} removed")
    return 0 if not reply.errors else 1


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
    argv = _options_then_command(args)
    if not argv:
        raise UsageError("usage: vmmesh exec NAME -- COMMAND [ARGS...]")
    reply = client.call(cfg, EXEC, ExecRequest(name=args.name, argv=tuple(argv)).checked())
    if args.json:
        print_json(reply)
    else:
        sys.stdout.buffer.write(reply.stdout)
        sys.stderr.buffer.write(reply.stderr)
        sys.stdout.flush()
    return reply.exit_code if 0 <= reply.exit_code <= 255 else 1


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
    command = _options_then_command(args, identity=True)
    key, public = _ssh_identity(args.identity)
    if not args.json and shutil.which("ssh") is None:
        raise UsageError("no ssh client here: install openssh-client")
    reply = client.call(cfg, SSH, SshRequest(name=args.name, keys=(public,)).checked())
    known_line = known_hosts_line(reply.address, reply.port, reply.host_key)
    if args.json:
        out = {**reply.to_wire(), "identity": str(key), "known_hosts": known_line.strip()}
        out.pop("v", None)
        print_json(out)
        return 0
    with tempfile.TemporaryDirectory(prefix="vmmesh-ssh-") as tmp:
        known = Path(tmp) / "known_hosts"
        known.write_text(known_line)
        argv = [
            "ssh", "-i", str(key), "-p", str(reply.port),
            "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={known}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "ConnectTimeout=60",
            "-o", "LogLevel=ERROR",
            f"{reply.user}@{reply.address}",
            *command,
        ]  # fmt: skip
        proc = subprocess.Popen(argv)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue  # ^C belongs to the ssh session
