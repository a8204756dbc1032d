"""`vmmesh image build | import | export | list`: the base images of this host."""

from __future__ import annotations

import argparse
import time

from vmmesh.config import Config
from vmmesh.errors import UsageError
from vmmesh.host.images import ImageRecord, ImageStore

from .output import console, err_console, print_json, table


def _row(rec: ImageRecord, default: str | None) -> dict[str, object]:
    m = rec.manifest
    return {
        "image_id": rec.image_id,
        "default": rec.image_id == default,
        "size": m.size,
        "virtual_size": rec.virtual_size,
        "kernel": m.kernel,
        "packages": len(m.packages),
        "created": m.created,
        "path": str(rec.path),
    }


def image(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "fetch":  # through the node: it knows the peers
        from .cmd_transfer import fetch_image

        return fetch_image(args, cfg)
    store = ImageStore(cfg.data_dir)
    if args.action == "build":
        from vmmesh.host.imagebuild import BuildOptions, build_base_image

        start = time.monotonic()

        def show(phase: str, seconds: float | None) -> None:
            if args.json:
                return
            if seconds is None:
                err_console.print(f"[bold]…[/] {phase}")
            else:
                err_console.print(f"[green]✓[/] {phase} ({seconds:.1f} s)")

        options = BuildOptions() if args.path is None else BuildOptions(cache_dir=args.path)
        rec = build_base_image(store, options, show)
        if store.default_id() is None:
            store.set_default(rec.image_id)
        result = {**_row(rec, rec.image_id), "seconds": round(time.monotonic() - start, 1)}
        if args.json:
            print_json(result)
        else:
            console.print(f"base image {rec.image_id} built in {result['seconds']} s")
        return 0
    if args.action == "import":
        if args.path is None:
            raise UsageError("usage: vmmesh image import FILE")
        if not args.path.exists():
            raise UsageError(f"no such file: {args.path}")
        rec = store.import_image(args.path)
        if store.default_id() is None:
            store.set_default(rec.image_id)
        if args.json:
            print_json(_row(rec, store.default_id()))
        else:
            console.print(f"imported base image {rec.image_id}")
        return 0
    if args.action == "export":
        if args.path is None:
            raise UsageError("usage: vmmesh image export FILE [--id IMAGE_ID]")
        image_id = args.image_id or store.default_image().image_id
        out = store.export_image(image_id, args.path, compress=str(args.path).endswith(".zst"))
        if args.json:
            print_json({"image_id": image_id, "file": str(out)})
        else:
            console.print(f"exported {image_id} to {out}")
        return 0
    default = store.default_id()
    rows = [_row(r, default) for r in store.list_images()]
    if args.json:
        print_json({"images": rows})
    else:
        table(
            "base images",
            ["id", "default", "disk", "kernel", "packages"],
            [
                (
                    str(r["image_id"])[:16],
                    "*" if r["default"] else "",
                    f"{int(str(r['size'])) / 1e6:.0f} MB",
                    r["kernel"],
                    r["packages"],
                )
                for r in rows
            ],
        )
    return 0
