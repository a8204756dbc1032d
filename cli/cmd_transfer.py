"""`vmmesh fetch TEMPLATE` and `vmmesh image fetch [ID]`: moving things from peers by hand."""

from __future__ import annotations

import argparse
import sys

from vmmesh.api.transfer import (
    FETCH_IMAGE,
    FETCH_TEMPLATE,
    FetchImageRequest,
    FetchReport,
    FetchTemplateRequest,
)
from vmmesh.config import Config

from . import client
from .output import console, print_json, progress_view, rate


def fetch(args: argparse.Namespace, cfg: Config) -> int:
    body = FetchTemplateRequest(template=args.template, sources=frozenset(args.sources)).checked()
    show = not args.json and sys.stderr.isatty()
    with progress_view(show) as view:
        reply = client.stream(cfg, FETCH_TEMPLATE, body, view.update if view else None)
    _print(args, reply)
    return 0


def fetch_image(args: argparse.Namespace, cfg: Config) -> int:
    image_id = str(args.path) if args.path is not None else (args.image_id or "")
    body = FetchImageRequest(image_id=image_id).checked()
    show = not args.json and sys.stderr.isatty()
    with progress_view(show) as view:
        reply = client.stream(cfg, FETCH_IMAGE, body, view.update if view else None)
    _print(args, reply)
    return 0


def _print(args: argparse.Namespace, reply: FetchReport) -> None:
    if args.json:
        print_json(reply)
        return
    if reply.already_here:
        console.print(f"{reply.what} {reply.item_id[:16]} is already here")
        return
    speed = rate(reply.bytes / reply.seconds) if reply.seconds else "-"
    console.print(
        f"fetched {reply.what} {reply.item_id[:16]}: {reply.bytes / 1e6:.1f} MB "
        f"({reply.wire_bytes / 1e6:.1f} MB on the wire) in {reply.seconds:.1f} s, {speed}"
    )
    for h in reply.holders:
        dropped = f", dropped: {h.dropped}" if h.dropped else ""
        console.print(f"  from {h.host}: {h.bytes / 1e6:.1f} MB, {h.pieces} pieces{dropped}")
