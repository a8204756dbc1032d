"""Start-up clean-up shared by the VM, template and warm-state managers.

QEMU runs in its own session, so a guest outlives the node that started it.
At the next start each manager's ``reconcile`` finds the run directories no
row of its own accounts for (a VM without a row, a build or warm boot that
never finished) and hands them here: the guest still running in one is
adopted and killed, then the directory goes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from vmmesh.hypervisor.base import Hypervisor


async def kill_leftovers(hv: Hypervisor, run_dirs: Iterable[Path], what: str) -> list[str]:
    """Kill the guest left running in each of ``run_dirs`` and remove the directories.

    Returns ``"<what> <directory name>"`` for each guest that was still running.
    """
    killed: list[str] = []
    for run_dir in sorted(run_dirs):
        guest = await hv.adopt(run_dir.name, run_dir)
        if guest is not None:
            await guest.kill()
            killed.append(f"{what} {run_dir.name}")
        shutil.rmtree(run_dir, ignore_errors=True)
    return killed
