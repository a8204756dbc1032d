"""Bring a lab of hosts up for a test and always take it down again.

Use in a fixture::

    @pytest.fixture
    def lab3(tmp_path: Path) -> Iterator[Lab]:
        with lab_context(tmp_path, 3) as lab:
            yield lab

Each lab gets a random tag (names ``vmmesh-t1a2b3c-<i>``, ``vmmbr-t1a2b3c``)
and a free 10.213.<k>.0/24, so parallel tests and other engineers' labs do not
collide.  Tests are skipped, with the reason, when the machine cannot make
network namespaces.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from vmmesh.errors import SubnetInUse
from vmmesh.lab import Lab, lab_down, lab_up


def lab_unavailable() -> str | None:
    """Why this machine cannot run a lab, or None if it can."""
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, bridge)"
    if shutil.which("ip") is None:
        return "lab tests need iproute2 (`ip`)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True, check=False).returncode:
        return "`ip netns` is not available here"
    return None


def skip_unless_lab() -> None:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)


def unique_tag() -> str:
    return "t" + secrets.token_hex(3)


def suite_warm_seed(image: Path | None) -> Path | None:
    """The suite's warm states of ``image`` (``tests.warmseed``), if they were made."""
    if image is None:
        return None
    seed = Path(os.environ.get("VMMESH_WARM_SEED", f"{image}.warm"))
    return seed if seed.is_dir() else None


@contextmanager
def lab_context(
    base_dir: Path,
    n: int,
    *,
    start_nodes: bool = False,
    node_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    tag: str | None = None,
    cli_argv: Sequence[str] = (),
    image: Path | None = None,
    warm_seed: bool = True,
) -> Iterator[Lab]:
    """A lab of ``n`` hosts under ``base_dir``; removed on exit even if the test fails.

    With ``image``, each host also gets the image's warm state made once for the
    whole suite (``tests.warmseed``; ``VMMESH_WARM_SEED`` or ``IMAGE.warm``), when
    there is one and ``warm_seed`` is left on."""
    skip_unless_lab()
    tag = tag or unique_tag()
    lab_dir = base_dir / f"lab-{tag}"
    try:
        lab = None
        for _ in range(8):
            try:
                lab = lab_up(
                    n,
                    lab_dir,
                    tag=tag,
                    subnet=random.randrange(1, 251),
                    start_nodes=start_nodes,
                    node_args=node_args,
                    env=env,
                    cli_argv=cli_argv,
                    image=image,
                    warm_seed=suite_warm_seed(image) if warm_seed else None,
                )
                break
            except SubnetInUse:
                pass  # another lab has it: draw again
        if lab is None:
            pytest.skip("no free 10.213.<k>.0/24 subnet for a lab")
        yield lab
    finally:
        lab_down(lab_dir, tag=tag)
