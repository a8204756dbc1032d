"""Warm states: a template's saved boot, so its VMs resume in about a second instead of booting.

Theory of operation (issue 9):

* Once a template exists here (built or fetched), a guest of it is booted
  once, in the background, never in a request's way: an overlay over the
  template (``warm/<id>/disk.qcow2``), the guest agent answering, boot
  settled (``systemctl is-system-running --wait``), then its RAM and devices
  are saved (``state``) and QEMU ends.  The shape the state needs
  (``hypervisor.savedstate.Shape``: QEMU, machine, accelerator, CPU, memory,
  vCPUs, devices, kernel) is written beside it (``shape.json``).  All of it
  is made in ``warm/.saving-<id>/`` and renamed into place whole: a node
  killed while saving leaves a ``.saving-`` directory, which ``reconcile``
  removes.
* A VM of that template gets its own overlay over the warm overlay (it sees
  the disk exactly as the saved RAM expects) and QEMU resumes the state,
  *if* the VM's shape is the state's; otherwise it boots cold and says why.
* A resumed VM becomes itself before anyone uses it (``persona.become_itself``):
  host name, a new machine id, a reseeded RNG (QEMU gives every start a new
  VM generation id, which makes Linux reseed; vmmesh also feeds it fresh
  bytes), the clock set from the host, a new DHCP lease.
* A state that does not resume (shape, a corrupt file, a guest that does not
  answer in time) is deleted and logged, and the VM boots cold: a request
  never fails because of a warm state.
* Warm states count against the storage quota (``warm/`` is a quota
  directory) and go with their template.
* The base image has a warm state too, under its image id (made when the
  node takes the image up): VMs with no packages resume it, and so do
  template builds (``host.build.WarmBuild``): the build's delta starts as a
  copy of the state's overlay, the guest resumes, installs, and is saved
  rather than powered off, and that saved guest becomes the new template's
  state (``staging`` then ``adopt``).  A build over a template resumes that
  template's state the same way.  So a template made here costs no boot at
  all, and neither does its first VM; only a template fetched from a peer
  needs a warm boot of its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from vmmesh.errors import HypervisorError, VmmeshError
from vmmesh.host.build import BaseImage
from vmmesh.host.persona import PRELOAD
from vmmesh.host.reconcile import kill_leftovers
from vmmesh.hypervisor.base import BootSpec, Guest, Hypervisor
from vmmesh.hypervisor.savedstate import Shape

log = logging.getLogger("vmmesh.host.warm")

SAVING = ".saving-"
STATE = "state"
DISK = "disk.qcow2"
SHAPE = "shape.json"
SETTLE = f"systemctl is-system-running --wait >/dev/null 2>&1; {PRELOAD}; sync; true"


@dataclass(frozen=True)
class WarmState:
    """A template's saved boot: its overlay, RAM + device state, and shape."""

    template_id: str
    directory: Path
    shape: Shape
    made_seconds: float

    @property
    def disk(self) -> Path:
        return self.directory / DISK

    @property
    def state(self) -> Path:
        return self.directory / STATE

    def size(self) -> int:
        return sum(p.stat().st_blocks * 512 for p in self.directory.iterdir() if p.is_file())


class WarmStore:
    """The warm states of this host's templates (``<data_dir>/warm``)."""

    def __init__(
        self,
        data_dir: Path,
        hypervisor: Hypervisor,
        base: BaseImage,
        *,
        agent_timeout: float = 300.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.dir = data_dir / "warm"
        self.run_root = data_dir / "run"
        self.hv = hypervisor
        self.base = base
        self.agent_timeout = agent_timeout
        self.now = now
        self.dir.mkdir(parents=True, exist_ok=True)
        self._making: set[str] = set()

    def get(self, template_id: str) -> WarmState | None:
        """The warm state of ``template_id`` if it is whole; None otherwise."""
        directory = self.dir / template_id
        try:
            raw = json.loads((directory / SHAPE).read_text())
        except (OSError, ValueError):
            return None
        shape = Shape.from_json(raw.get("shape")) if isinstance(raw, dict) else None
        if shape is None or not (directory / STATE).is_file() or not (directory / DISK).is_file():
            return None
        made = raw.get("made_seconds", 0.0)
        return WarmState(template_id, directory, shape, float(made) if made else 0.0)

    def held(self) -> set[str]:
        """Ids of the templates with a saved state (one directory listing: cheap enough
        for every gossip tick; a state is renamed into place only once whole)."""
        try:
            return {e.name for e in os.scandir(self.dir) if not e.name.startswith(SAVING)}
        except OSError:
            return set()

    def sizes(self) -> dict[str, int]:
        """Bytes on disk per warm state (allocated blocks), half-saved ones included
        under their ``SAVING`` name: all of it is storage the quota must see."""
        out: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.dir):
                if entry.is_dir(follow_symlinks=False):
                    total = 0
                    with contextlib.suppress(OSError):
                        for f in os.scandir(entry.path):
                            if f.is_file(follow_symlinks=False):
                                total += f.stat(follow_symlinks=False).st_blocks * 512
                    out[entry.name] = total
        return out

    def spec(self, name: str, disk: Path, run_dir: Path, vcpus: int, memory_mb: int) -> BootSpec:
        return self.base.boot_spec(name, disk, run_dir, vcpus, memory_mb)

    async def make(
        self, template_id: str, template_disk: Path, vcpus: int, memory_mb: int
    ) -> WarmState | None:
        """Boot the template once and save it (None if another make is under way)."""
        if template_id in self._making or self.get(template_id) is not None:
            return None
        staging = self.staging(template_id)
        run_dir = self.run_root / f"warm-{template_id[:16]}"
        guest: Guest | None = None
        started = time.monotonic()
        try:
            await self.hv.create_overlay(template_disk, staging / DISK)
            spec = self.spec(run_dir.name, staging / DISK, run_dir, vcpus, memory_mb)
            guest = await self.hv.start(spec)
            await guest.wait_agent(self.agent_timeout)
            await guest.exec(["sh", "-c", SETTLE], timeout=120.0)
            await guest.save_state(staging / STATE)
            guest = None
            shape = await self.hv.shape(spec)
            return self._commit(template_id, staging, shape, time.monotonic() - started)
        finally:
            self._making.discard(template_id)
            if guest is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await guest.kill()
                    except (HypervisorError, OSError) as exc:
                        log.debug("killing the warm boot of %s: %s", template_id[:12], exc)
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)

    def _commit(
        self, template_id: str, staging: Path, shape: Shape, seconds: float, how: str = "made"
    ) -> WarmState | None:
        """Write the shape beside the state and rename the whole into place."""
        doc = {"shape": shape.to_json(), "made_seconds": round(seconds, 2)}
        (staging / SHAPE).write_text(json.dumps(doc, indent=1) + "\n")
        target = self.dir / template_id
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        state = self.get(template_id)
        if state is not None:
            if how == "made":
                log.info(
                    "warm state of %s made in %.1f s (%d MB)",
                    template_id[:12],
                    seconds,
                    state.size() >> 20,
                )
            else:
                log.info("warm state of %s %s (%d MB)", template_id[:12], how, state.size() >> 20)
        return state

    def staging(self, template_id: str) -> Path:
        """An empty directory where ``template_id``'s state is being made (here, or by
        a warm build); ``making`` says so until ``adopt`` or ``abandon``.  A node
        killed meanwhile leaves it, and ``reconcile`` removes it."""
        self._making.add(template_id)
        staging = self.dir / f"{SAVING}{template_id}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def abandon(self, template_id: str) -> None:
        """A state that will not be made after ``staging``: its directory goes."""
        self._making.discard(template_id)
        shutil.rmtree(self.dir / f"{SAVING}{template_id}", ignore_errors=True)

    async def adopt(
        self, template_id: str, template_disk: Path, shape: Shape, seconds: float
    ) -> WarmState | None:
        """Keep the state a warm build saved in ``staging(template_id)`` as the template's:
        it was taken when the disk held exactly the template, so its overlay is empty."""
        staging = self.dir / f"{SAVING}{template_id}"
        try:
            await self.hv.create_overlay(template_disk, staging / DISK)
            return self._commit(template_id, staging, shape, seconds)
        finally:
            self.abandon(template_id)

    def receive(
        self, template_id: str, shape: Shape, made_seconds: float, source: str
    ) -> WarmState | None:
        """Keep the state fetched from ``source`` into ``staging(template_id)`` (its
        ``STATE`` and ``DISK``, checked by the fetcher) as this host's; it keeps the
        seconds its warm boot took where it was made."""
        try:
            staging = self.dir / f"{SAVING}{template_id}"
            return self._commit(template_id, staging, shape, made_seconds, f"fetched from {source}")
        finally:
            self.abandon(template_id)

    def discard(self, template_id: str, reason: str) -> None:
        if (self.dir / template_id).exists():
            log.warning("warm state of %s dropped: %s", template_id[:12], reason)
        shutil.rmtree(self.dir / template_id, ignore_errors=True)

    def making(self, template_id: str) -> bool:
        return template_id in self._making

    async def reconcile(self, templates: set[str]) -> list[str]:
        """Half-saved states, states of templates that are gone, leftover warm boots: removed."""
        removed = await kill_leftovers(self.hv, self.run_root.glob("warm-*"), "warm boot")
        for entry in sorted(self.dir.iterdir()):
            whole = not entry.name.startswith(SAVING) and self.get(entry.name) is not None
            if not whole or entry.name not in templates:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
                removed.append(f"warm state {entry.name}")
        return removed


def warm_error(exc: BaseException) -> str:
    """Why a resume failed, in one line."""
    if isinstance(exc, VmmeshError):
        return str(exc)
    if isinstance(exc, trio.TooSlowError):
        return "the guest did not answer in time"
    return f"{type(exc).__name__}: {exc}"
