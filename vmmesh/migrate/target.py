"""The target's side: a VM arriving, from ``prepare`` to ``commit`` or ``abort``.

``prepare`` refuses what cannot work before anything is made (another QEMU
or machine shape, another base image, no free slot, a VM of that id already
here), fetches the template chain it lacks, and writes the VM's row as
``incoming`` (it holds its slot from then on).  ``listen`` (live) makes an
empty overlay on the same chain and starts QEMU waiting for the stream;
the files of ``--offline`` arrive through pipes instead.  ``commit`` is the
source saying its part is done: the guest must run here (live: QEMU says
``running``; offline: QEMU resumes the state that came), and then the row
is ``running`` and watched like any VM.  ``abort`` (or any failure) kills
what was started and deletes the row and its files: nothing is left.  A
session the source stops talking to is aborted after ``IDLE`` seconds, unless
it was committed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from vmmesh.api.migrate import Channel, CommitReply, Mode, PrepareReply, PrepareRequest
from vmmesh.api.vm import FETCH_ALWAYS
from vmmesh.errors import CapacityError, HypervisorError, NotFound, StateError, VmmeshError
from vmmesh.host.build import ProgressSink
from vmmesh.host.templates import TemplateRecord
from vmmesh.hypervisor.base import BootSpec
from vmmesh.hypervisor.migration import target_done, target_listen
from vmmesh.hypervisor.qemu import QemuGuest
from vmmesh.hypervisor.savedstate import Shape
from vmmesh.migrate import faults
from vmmesh.migrate.pipes import End, FileSink, PipeSession, StreamEnd
from vmmesh.vm.manager import VmManager
from vmmesh.vm.rows import NewVm
from vmmesh.vm.state import VmEvent, VmState

log = logging.getLogger("vmmesh.migrate")

NBD_SOCKET = "nbd.sock"
STATE_FILE = "incoming.state"
RUNNING_WAIT = 120.0  # seconds from the source's "done" to QEMU running the guest here
CLOCK_WAIT = 10.0  # seconds for the arriving guest's agent to set its clock


@dataclass
class Incoming:
    """One VM arriving here."""

    req: PrepareRequest
    pipes: PipeSession
    spec: BootSpec
    backing: Path
    guest: QemuGuest | None = None
    ram_peer: socket.socket | None = None
    committed: bool = False
    finished: trio.Event = field(default_factory=trio.Event)


class Target:
    """Sessions of VMs arriving at this host."""

    def __init__(self, mgr: VmManager) -> None:
        self.mgr = mgr
        self.sessions: dict[str, Incoming] = {}

    async def prepare(
        self, peer_id: str, req: PrepareRequest, progress: ProgressSink
    ) -> PrepareReply:
        t0 = time.monotonic()
        mgr = self.mgr
        if req.session in self.sessions:
            raise StateError(f"migration {req.session[:8]} is under way already")
        base = mgr.templates.base
        if req.image_id != base.image_id:
            raise StateError(
                f"this host runs base image {base.image_id[:12]}, the VM's is {req.image_id[:12]}"
            )
        if mgr.rows.state_of(req.vm_id) is not None:
            raise StateError(f"a VM {req.vm_id} is here already")
        disk = mgr.rows.vm_dir / f"{req.vm_id}.qcow2"
        spec = base.boot_spec(
            req.vm_id, disk, mgr.rows.run_root / req.vm_id, req.vcpus, req.memory_mb
        )
        why = Shape.of(req.shape).differs(await mgr.hv.shape(spec))
        if why:
            raise StateError(f"this host cannot run the VM's QEMU state: {why}")
        fetched = False
        backing = base.disk
        if req.template_id is not None:
            try:
                rec = mgr.templates.get(req.template_id)
            except NotFound:
                rec = await self._fetch(req.template_id, progress)
                fetched = True
            backing = mgr.templates.disk_path(rec)
        if mgr.reserve(1) == 0:
            raise CapacityError("no free VM slot on this host")
        try:
            port = mgr.rows.insert(
                NewVm(
                    req.vm_id,
                    req.name,
                    req.template_id,
                    disk,
                    req.vcpus,
                    req.memory_mb,
                    req.request_id,
                    req.lineage,
                ),
                VmState.INCOMING,
            )
        finally:
            mgr.release(1)
        spec = spec.with_ssh(port or None, mgr.rows.ssh_bind)
        inc = Incoming(req, PipeSession(req.session, peer_id), spec, backing)
        inc.pipes = PipeSession(req.session, peer_id, lambda ch: self._open(inc, ch))
        self.sessions[req.session] = inc
        return PrepareReply(fetched_template=fetched, seconds=time.monotonic() - t0)

    async def _fetch(self, template_id: str, progress: ProgressSink) -> TemplateRecord:
        fetcher = self.mgr.templates.fetcher
        if fetcher is None:
            raise StateError("this host cannot fetch templates")
        rec, source = await fetcher.obtain(
            template_id, frozenset(), float("inf"), FETCH_ALWAYS, progress
        )
        if rec is None:
            raise StateError(f"template {template_id[:12]} could not be fetched: {source.why}")
        return rec

    async def _open(self, inc: Incoming, channel: Channel) -> End:
        """This host's end of a channel the source starts."""
        rows = self.mgr.rows
        if channel is Channel.LAYER and inc.req.layer_bytes:
            return FileSink(rows.layer_path(inc.req.vm_id), inc.req.layer_bytes)
        if channel is Channel.OVERLAY and inc.req.mode is Mode.OFFLINE:
            return FileSink(inc.spec.disk, inc.req.disk_limit)
        if channel is Channel.STATE and inc.req.mode is Mode.OFFLINE:
            inc.spec.run_dir.mkdir(parents=True, exist_ok=True)
            limit = (inc.req.memory_mb << 20) * 2 + (64 << 20)
            return FileSink(inc.spec.run_dir / STATE_FILE, limit)
        if channel is Channel.NBD and inc.guest is not None:
            stream = await trio.open_unix_socket(str(inc.spec.run_dir / NBD_SOCKET))
            return StreamEnd(stream)
        if channel is Channel.RAM and inc.ram_peer is not None:
            sock, inc.ram_peer = inc.ram_peer, None
            return StreamEnd(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
        raise NotFound(f"migration {inc.req.session[:8]}: no {channel} channel now")

    def get(self, session: str, peer_id: str) -> Incoming:
        inc = self.sessions.get(session)
        if inc is None or inc.pipes.peer_id != peer_id:
            raise NotFound(f"no migration {session[:8]} from {peer_id[:12]} here")
        return inc

    async def _backing(self, inc: Incoming) -> Path:
        """What the overlay sits on: the layer that came (rebased onto our copy of the
        template), or the template itself."""
        if not inc.req.layer_bytes:
            return inc.backing
        layer = self.mgr.rows.layer_path(inc.req.vm_id)
        if not layer.is_file():
            raise StateError("the VM's disk layer has not arrived")
        await self.mgr.hv.rebase_unsafe(layer, inc.backing)
        return layer

    async def listen(self, inc: Incoming) -> None:
        """Live: an empty overlay on the chain, QEMU waiting, the NBD export, the RAM fd."""
        if inc.req.mode is not Mode.LIVE or inc.guest is not None:
            raise StateError("this migration does not listen")
        backing = await self._backing(inc)
        inc.spec.disk.unlink(missing_ok=True)
        await self.mgr.hv.create_overlay(backing, inc.spec.disk)
        guest = await self.mgr.hv.start(replace(inc.spec, defer_incoming=True))
        if not isinstance(guest, QemuGuest):
            await guest.kill()
            raise HypervisorError("this host's hypervisor cannot take a live migration")
        inc.guest = guest
        mine, theirs = socket.socketpair()
        try:
            async with guest.monitor() as client:
                await target_listen(client, inc.spec.run_dir / NBD_SOCKET, mine.fileno())
        except BaseException:
            theirs.close()
            raise
        finally:
            mine.close()
        inc.ram_peer = theirs

    async def commit(self, inc: Incoming) -> CommitReply:
        """The source is done: run the guest here, or fail (and the source keeps it)."""
        t0 = time.monotonic()
        if inc.req.mode is Mode.OFFLINE:
            backing = await self._backing(inc)
            await self.mgr.hv.rebase_unsafe(inc.spec.disk, backing)
            state = inc.spec.run_dir / STATE_FILE
            if not state.is_file():
                raise StateError("the VM's saved state has not arrived")
            inc.guest = await self._start_offline(replace(inc.spec, incoming=state))
            state.unlink(missing_ok=True)
        else:
            guest = inc.guest
            if guest is None:
                raise StateError("commit before listen")
            with trio.fail_after(RUNNING_WAIT):
                while (status := await guest.query_status()) != "running":
                    if status in ("postmigrate", "shutdown", "internal-error"):
                        raise HypervisorError(f"the arriving guest is {status}")
                    if status == "paused":  # paused by the source for its RAM copy (TCG)
                        await guest.qmp("cont")
                        continue
                    await trio.sleep(0.02)
            async with guest.monitor() as client:
                await target_done(client)
        guest = inc.guest
        assert guest is not None
        await _set_clock(guest)
        now = self.mgr.rows.apply(
            inc.req.vm_id,
            VmEvent.STARTED,
            pid=guest.pid,
            started=self.mgr.rows.now(),
            start_kind="migrated",
            start_seconds=time.monotonic() - t0,
        )
        if now != VmState.RUNNING:  # aborted while it started (a late commit): no row
            with contextlib.suppress(VmmeshError, OSError):
                await guest.kill()
            raise StateError(f"the migration of {inc.req.name} was aborted as it started")
        self.mgr.lifecycle.watch(inc.req.vm_id, guest)
        faults.hit("committed", side="target")
        inc.committed = True
        inc.finished.set()
        self.sessions.pop(inc.req.session, None)
        await inc.pipes.aclose()
        return CommitReply(resume_seconds=time.monotonic() - t0)

    async def _start_offline(self, spec: BootSpec) -> QemuGuest:
        guest = await self.mgr.hv.start(spec)
        if not isinstance(guest, QemuGuest):
            await guest.kill()
            raise HypervisorError("this host's hypervisor cannot take a migrated VM")
        return guest

    async def abort(self, inc: Incoming, reason: str) -> None:
        """Nothing of the VM stays here (once: a second abort, or one after the commit,
        does nothing)."""
        if inc.committed or inc.finished.is_set():
            return
        self.sessions.pop(inc.req.session, None)
        with trio.CancelScope(shield=True):
            if inc.ram_peer is not None:
                inc.ram_peer.close()
            await inc.pipes.aclose()
            if inc.guest is not None:
                with contextlib.suppress(VmmeshError, OSError):
                    await inc.guest.kill()
            self.mgr.rows.apply(inc.req.vm_id, VmEvent.FAILED)
        inc.finished.set()
        log.warning("migration of %s to here aborted: %s", inc.req.name, reason)


async def _set_clock(guest: QemuGuest) -> None:
    """The guest's clock stood still while it was paused: set it from this host's."""
    t0 = time.monotonic()
    try:
        with trio.move_on_after(CLOCK_WAIT) as scope:
            await guest.set_time()
    except VmmeshError as exc:
        log.warning("the arriving guest's clock was not set: %s", exc)
        return
    took = time.monotonic() - t0
    if scope.cancelled_caught:
        log.warning("the arriving guest's clock was not set: no answer in %.0f s", took)
    else:
        log.info("the arriving guest's clock set in %.3f s", took)
