"""The base image's warm state, made once for every lab of the test suite.

Every lab host takes the base image up and then boots it once to save its
warm state (builds and package-less VMs resume it).  Under TCG that is a cold
boot per host per lab module, about a third of the suite's cold boots.  The
guest would be the same on every host of this machine (same image, QEMU,
accelerator, memory, kernel: the same ``Shape``), so ``scripts/test.sh``
makes it once here (``python -m tests.warmseed IMAGE_DIR SEED_DIR``), and
``vmmesh.lab.lab_up(warm_seed=...)`` links it into each host's ``warm/``,
where the node finds it whole and makes none.  A seed of another shape
(QEMU upgraded, image rebuilt) is made again; one a host cannot resume is
deleted by the host, which then boots cold as it would have anyway.

This is test support: a node never takes a warm state it did not make, except
in a lab this way.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import trio

from vmmesh.host.build import BaseImage
from vmmesh.host.images import ImageStore
from vmmesh.host.warm import SHAPE, WarmStore
from vmmesh.hypervisor.qemu import QemuHypervisor

VCPUS, MEMORY_MB = 1, 512  # a lab host's defaults (config vm_vcpus, vm_memory_mb)


def link_seed(data: Path, base_dir: Path, image_id: str) -> None:
    """For a host's managers built by a test (no node, no lab): link the suite's warm
    state of the base image in ``base_dir`` into ``data/warm``, where there is one.
    Its overlay names the image as ``../../images/<id>/disk.qcow2``, so the image is
    linked there too.  Without a seed the host makes the state itself (a cold boot)."""
    seed = Path(os.environ.get("VMMESH_WARM_SEED", f"{base_dir}.warm")) / image_id
    if not (seed / SHAPE).is_file():
        return
    (data / "images").mkdir(parents=True)
    (data / "images" / image_id).symlink_to(base_dir.resolve())
    shutil.copytree(seed, data / "warm" / image_id, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


async def make_seed(image_dir: Path, seed_dir: Path) -> str:
    """Make (or keep, when current) the seed of ``image_dir``'s warm state; says which."""
    seed_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=seed_dir.parent, prefix=".warmseed-") as scratch:
        data = Path(scratch)
        images = ImageStore(data)
        rec = images.import_image(image_dir, link=True)
        images.set_default(rec.image_id)
        base = BaseImage(rec.path, rec.manifest)
        hv = QemuHypervisor("tcg")
        spec = base.boot_spec("seed", base.disk, data / "run", VCPUS, MEMORY_MB)
        shape = (await hv.shape(spec)).to_json()
        have = seed_dir / rec.image_id / SHAPE
        try:
            if json.loads(have.read_text()).get("shape") == shape:
                return f"warm seed of {rec.image_id[:12]} is current"
        except (OSError, ValueError):
            pass
        warm = WarmStore(data, hv, base)
        state = await warm.make(rec.image_id, base.disk, VCPUS, MEMORY_MB)
        if state is None:
            raise SystemExit("the warm seed was not made")
        for old in seed_dir.iterdir():
            shutil.rmtree(old, ignore_errors=True)
        shutil.move(str(state.directory), seed_dir / rec.image_id)
        return f"warm seed of {rec.image_id[:12]} made in {state.made_seconds:.0f} s"


def main(argv: list[str]) -> int:
    print(trio.run(make_seed, Path(argv[1]), Path(argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
