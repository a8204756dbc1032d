"""Installing packages into a new delta: the guest's part of building a template.

``Builder.build`` starts a guest on a fresh delta (an overlay of the parent),
points apt at the configured sources, installs the missing packages through
the guest agent, cleans up and ends the guest, timing each phase.  It leaves
the delta file for ``TemplateManager`` to check, hash and record; on any
failure it kills the guest and raises, and the manager undoes the rest.

A *warm build* (``WarmBuild``) starts from the parent's warm state instead of
a boot: the delta begins as a copy of the overlay that state's boot wrote, the
guest resumes in the VM shape (about a second instead of a boot of 15-75 s
under TCG), takes a clock, RNG and machine id of its own
(``persona.become_itself``), installs, and is then saved, not powered off:
its RAM and devices become the new template's warm state, taken when the
disk holds exactly the template, so the template's first VM resumes too.  The
delta is then a disk whose filesystem was not unmounted (synced and trimmed
first, as before a power-off), which ext4's journal replays on a cold boot.

Errors say which kind of failure it was: ``PackageInstallError`` when the
source lacks a package or a package's own script fails (every host shares the
base image, so no host would do better), ``PackageSourceError``
when the guest could not reach its source or apt failed otherwise (another
host might), ``HypervisorError`` when the guest did not boot or power off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from vmmesh.errors import HypervisorError, PackageInstallError, PackageSourceError, VmmeshError
from vmmesh.host import apt, persona
from vmmesh.hypervisor.base import BootSpec, Guest, Hypervisor, ImageManifest

log = logging.getLogger("vmmesh.host.build")

ProgressSink = Callable[[str, float | None], None]
RESUME_TIMEOUT = 60.0  # a resumed guest answers in about a second; a stuck one is abandoned


@dataclass(frozen=True)
class BaseImage:
    """The base image as the template layer needs it: its id and its files."""

    directory: Path
    manifest: ImageManifest

    @property
    def image_id(self) -> str:
        return self.manifest.image_id

    @property
    def disk(self) -> Path:
        return self.directory / self.manifest.disk

    @property
    def kernel(self) -> Path:
        return self.directory / self.manifest.kernel

    @property
    def initrd(self) -> Path:
        return self.directory / self.manifest.initrd

    def boot_spec(
        self, name: str, disk: Path, run_dir: Path, vcpus: int, memory_mb: int
    ) -> BootSpec:
        """How to boot a guest of this image on ``disk``."""
        return BootSpec(
            name=name,
            disk=disk,
            kernel=self.kernel,
            initrd=self.initrd,
            run_dir=run_dir,
            cmdline=self.manifest.cmdline,
            vcpus=vcpus,
            memory_mb=memory_mb,
        )


@dataclass(frozen=True)
class WarmBuild:
    """A build that resumes its parent's warm state and saves its own at the end."""

    state: Path  # the parent's saved RAM and devices (resumed, never written)
    save_to: Path  # where the new template's state is written
    vcpus: int  # the shape of the parent's state, which the new one keeps
    memory_mb: int


@dataclass
class Builder:
    """Boots build guests and installs packages in them (one per template build)."""

    hv: Hypervisor
    base: BaseImage
    apt_sources: tuple[str, ...] = ()
    vcpus: int = 2
    memory_mb: int = 1024
    agent_timeout: float = 300.0
    install_timeout: float = 1800.0
    poweroff_timeout: float = 60.0

    async def build(
        self,
        delta: Path,
        run_dir: Path,
        missing: Sequence[str],
        progress: ProgressSink,
        on_guest: Callable[[Guest | None], None],
        *,
        warm: WarmBuild | None = None,
    ) -> dict[str, float]:
        """Install ``missing`` into ``delta`` (an overlay already made); seconds per phase.

        ``on_guest`` is told the running guest (and None once it is gone), so
        the caller can kill it if this is cancelled.  With ``warm`` the guest
        resumes ``warm.state`` (``delta`` must be a copy of that state's
        overlay) and ends saved into ``warm.save_to``; if the state does not
        resume, the build is a cold one (``"boot"`` in the timings, not
        ``"resume"``, and nothing saved).
        """
        timings: dict[str, float] = {}
        t = time.monotonic()
        guest, resumed = await self._start(delta, run_dir, progress, warm, on_guest)
        timings["resume" if resumed else "boot"] = time.monotonic() - t
        if not resumed:
            warm = None

        t = time.monotonic()
        timings.update(await self._install(guest, sorted(missing), progress))
        timings["install"] = time.monotonic() - t - timings.get("update", 0.0)

        t = time.monotonic()
        if warm is not None:
            progress("save", None)
            await guest.exec(["sh", "-c", persona.PRELOAD], timeout=120.0)  # as warm.SETTLE
            await guest.save_state(warm.save_to)
            on_guest(None)
            timings["save"] = time.monotonic() - t
            return timings
        progress("shutdown", None)
        status = await guest.shutdown(self.poweroff_timeout)
        on_guest(None)
        if status != 0:
            # killed after the power-off timeout: QEMU may not have written
            # out its qcow2 metadata, so the delta is not trusted
            raise HypervisorError(f"build guest did not power off cleanly (exit {status})")
        timings["shutdown"] = time.monotonic() - t
        return timings

    async def _start(
        self,
        delta: Path,
        run_dir: Path,
        progress: ProgressSink,
        warm: WarmBuild | None,
        on_guest: Callable[[Guest | None], None],
    ) -> tuple[Guest, bool]:
        """The build guest, its agent answering; True if it resumed ``warm``.

        A warm state that does not resume costs the build nothing but the try:
        the guest boots cold on the same delta (the copied overlay is a disk
        like any other), in the build shape, and is powered off at the end.
        """
        if warm is not None:
            progress("resume", None)
            spec = self.base.boot_spec(run_dir.name, delta, run_dir, warm.vcpus, warm.memory_mb)
            guest: Guest | None = None
            try:
                with trio.fail_after(RESUME_TIMEOUT):
                    guest = await self.hv.start(replace(spec, incoming=warm.state))
                    on_guest(guest)
                    await guest.wait_agent(RESUME_TIMEOUT)
                    # a clock, RNG and machine id of its own (apt checks dates)
                    await persona.become_itself(guest, run_dir.name)
                return guest, True
            except (VmmeshError, OSError, trio.TooSlowError) as exc:
                log.warning(
                    "%s: the parent's warm state did not resume (%s); booting instead",
                    run_dir.name,
                    str(exc) or type(exc).__name__,
                )
                if guest is not None:
                    with trio.CancelScope(shield=True), suppress(HypervisorError, OSError):
                        await guest.kill()
                on_guest(None)
        progress("boot", None)
        spec = self.base.boot_spec(run_dir.name, delta, run_dir, self.vcpus, self.memory_mb)
        guest = await self.hv.start(spec)
        on_guest(guest)
        await guest.wait_agent(self.agent_timeout)
        return guest, False

    async def _install(
        self, guest: Guest, missing: list[str], progress: ProgressSink
    ) -> dict[str, float]:
        """apt-get update and install; the update's seconds and what apt downloaded."""
        await self._sources(guest, progress)
        t = time.monotonic()
        await self._update(guest, progress)
        figures = {"update": time.monotonic() - t}
        progress("install", 0.0)
        res = await guest.exec(
            ["apt-get", "install", "-y", "--no-install-recommends", *missing],
            env=apt.ENV,
            timeout=self.install_timeout,
        )
        if res.exit_code != 0:
            output = (res.stdout + b"\n" + res.stderr).decode("utf-8", "replace")
            unknown = apt.missing_packages(output)
            if unknown:
                raise PackageInstallError(f"package not found: {', '.join(unknown)}")
            problem = apt.source_problem(output)
            if problem:
                raise PackageSourceError(f"the guest could not download packages: {problem}")
            broken = apt.dpkg_errors(output)
            if broken:  # a package's own script failed: it fails on every host alike
                raise PackageInstallError(f"installing {' '.join(missing)} failed: {broken}")
            raise PackageSourceError(
                f"installing {' '.join(missing)} failed (apt exit {res.exit_code}):"
                f" {apt.tail(res.stderr or res.stdout)}"
            )
        got = apt.fetched(res.stdout.decode("utf-8", "replace"))
        if got is not None:
            figures["download_bytes"], figures["download_seconds"] = float(got[0]), got[1]
        progress("install", 1.0)
        progress("clean", None)
        await guest.exec(["sh", "-c", apt.CLEAN])
        return figures

    async def _sources(self, guest: Guest, progress: ProgressSink) -> None:
        progress("sources", None)
        if self.apt_sources:
            text = "\n".join(self.apt_sources) + "\n"
            await guest.write_file("/etc/apt/sources.list", text.encode())
            await guest.exec(["sh", "-c", apt.REPLACE_SOURCES])
        # A package source that drops a connection now and then (a busy
        # mirror, a loaded host) should cost a retry, not the template.
        await guest.write_file(apt.RETRIES_FILE, apt.RETRIES)
        res = await guest.exec(["sh", "-c", apt.SCRATCH])
        if res.exit_code != 0:
            log.info("apt scratch space not on tmpfs: %s", apt.tail(res.stderr))

    async def _update(self, guest: Guest, progress: ProgressSink) -> None:
        """``apt-get update`` until the source answers (``UPDATE_ATTEMPTS`` tries)."""
        progress("update", None)
        problem = ""
        for attempt in range(1, apt.UPDATE_ATTEMPTS + 1):
            # the agent may answer before DHCP is done; apt needs the network
            await guest.exec(["sh", "-c", apt.WAIT_ONLINE], timeout=90.0)
            res = await guest.exec(["apt-get", "update"], timeout=self.install_timeout)
            output = (res.stdout + b"\n" + res.stderr).decode("utf-8", "replace")
            found = apt.source_problem(output)
            if res.exit_code == 0 and found is None:
                return
            problem = found or f"apt-get update exit {res.exit_code}: {apt.tail(res.stderr)}"
            if attempt < apt.UPDATE_ATTEMPTS:
                log.info(
                    "apt-get update failed in the build guest (attempt %d): %s", attempt, problem
                )
                await trio.sleep(5.0)
        sources = "; ".join(self.apt_sources) or "the image's own sources"
        raise PackageSourceError(
            f"the guest could not reach its package source ({sources}) in "
            f"{apt.UPDATE_ATTEMPTS} attempts: {problem}"
        )
