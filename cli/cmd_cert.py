"""`vmmesh cert issue`: a client certificate of the mesh CA for the web page (PEM files)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from vmmesh.api.web import ISSUE, IssueRequest, Role
from vmmesh.config import Config
from vmmesh.errors import UsageError

from . import client
from .output import console, print_json


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def cert(args: argparse.Namespace, cfg: Config) -> int:
    role = Role(args.role)
    label = args.label or role.value
    out: Path = args.out
    files = {"cert": out / f"{label}.crt", "key": out / f"{label}.key", "ca": out / "ca.crt"}
    for what in ("cert", "key"):
        if files[what].exists():
            raise UsageError(f"{files[what]} exists: choose another --out or --label")
    reply = client.call(cfg, ISSUE, IssueRequest(role=role, label=label).checked())
    out.mkdir(parents=True, exist_ok=True)
    _write(files["key"], reply.key, 0o600)
    _write(files["cert"], reply.cert, 0o644)
    if not files["ca"].exists():
        _write(files["ca"], reply.ca, 0o644)
    if args.json:
        print_json(
            {**{k: str(v) for k, v in files.items()}, "role": role.value, "expires": reply.expires}
        )
    else:
        until = time.strftime("%Y-%m-%d", time.gmtime(reply.expires))
        console.print(
            f"{role.value} certificate until {until}: {files['cert']}, key {files['key']}, "
            f"mesh CA {files['ca']}"
        )
    return 0
