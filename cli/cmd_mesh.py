"""`vmmesh init`, `invite`, `join`, `remove`: the mesh's membership."""

from __future__ import annotations

import argparse
import socket

import trio

from vmmesh.api.node import INVITE, REMOVE, InviteRequest, RemoveRequest
from vmmesh.config import Config
from vmmesh.errors import UsageError
from vmmesh.mesh import join as join_protocol
from vmmesh.mesh import pki

from . import client
from .output import console, print_json


def _host_name(args: argparse.Namespace, cfg: Config) -> str:
    return str(getattr(args, "name", None) or cfg.name or socket.gethostname())


def init(args: argparse.Namespace, cfg: Config) -> int:
    if (cfg.pki_dir / "host.crt").exists():
        raise UsageError(f"{cfg.data_dir} already belongs to a mesh (remove {cfg.pki_dir} first)")
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    ident = pki.init_mesh(cfg.pki_dir, _host_name(args, cfg))
    info = {
        "node_id": ident.node_id,
        "mesh_id": ident.mesh_id,
        "name": ident.name,
        "admin": ident.is_admin,
        "data_dir": str(cfg.data_dir),
    }
    if args.json:
        print_json(info)
    else:
        console.print(
            f"created mesh [bold]{ident.mesh_id}[/] with host "
            f"[bold]{ident.name}[/] ({ident.node_id}) in {cfg.data_dir}"
        )
    return 0


def invite(args: argparse.Namespace, cfg: Config) -> int:
    if args.ttl <= 0:
        raise UsageError("--ttl must be positive")
    reply = client.call(cfg, INVITE, InviteRequest(ttl=args.ttl).checked())
    if args.json:
        print_json(reply)
    else:
        print(reply.token)
    return 0


def join(args: argparse.Namespace, cfg: Config) -> int:
    pki.decode_token(args.token)  # a bad token is refused before anything is written
    name = pki.check_host_name(_host_name(args, cfg))
    if (cfg.pki_dir / "host.crt").exists():
        raise UsageError(f"{cfg.data_dir} already belongs to a mesh")
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    ident = trio.run(join_protocol.join_mesh, args.token, cfg.pki_dir, name)
    info = {"node_id": ident.node_id, "mesh_id": ident.mesh_id, "name": ident.name}
    if args.json:
        print_json(info)
    else:
        console.print(
            f"joined mesh [bold]{ident.mesh_id}[/] as [bold]{ident.name}[/] "
            f"({ident.node_id}); start it with `vmmesh node`"
        )
    return 0


def remove(args: argparse.Namespace, cfg: Config) -> int:
    reply = client.call(cfg, REMOVE, RemoveRequest(host=args.host).checked())
    if args.json:
        print_json(reply)
    else:
        console.print(f"revoked {reply.name} ({reply.node_id}); the revocation spreads by gossip")
    return 0
