"""The source's side: one VM moved from here, live or offline.

Steps, each named in the report's phases:

1. ``prepare``: the VM's row becomes ``migrating`` here; the target checks it
   can run the VM, fetches the template chain and writes an ``incoming`` row.
2. ``layer``: if the VM's overlay sits on a layer of this host's own (the
   warm state's disk it was resumed from), that file goes first, whole.
3. Live: ``listen`` (the target's QEMU waits), then ``mirror`` (the overlay's
   own clusters over NBD until the job is ready) and ``ram`` (QEMU's stream,
   iterating until it pauses before the switchover), then ``switchover``
   (the mirror completes while the guest is paused, then the devices' state).
   Offline: ``save`` (the guest paused, its state to a file), then the
   overlay and the state as files.
4. ``commit``: the target runs the guest.  Only then is this copy deleted
   (``MIGRATED_AWAY``).

Anything that fails before the commit aborts the target (nothing is left
there) and resumes the guest here (``MIGRATE_FAILED``).  When the commit's
answer is lost, the source asks the target to abort: if it already runs the
VM the abort says so and this copy goes; if the target cannot be reached
the guest stays paused here (``migrating``): it may run there, and running
it twice is worse than waiting.  A target that stops answering (its node
dead, the link cut) is noticed within ``LINK_PATIENCE`` by a beat on the
mesh's shared connection, not when TCP gives up.

What did not end is *settled*, again and again until it is: each migration
leaves a note in the VM's run directory (``OUTGOING``: the session and the
target) from its start until the target has answered for it.  ``settle``
(every ``SETTLE_EVERY`` seconds from the node's start, so also after this
node was killed and started again) asks the target to abort that session:
a target that still held it uncommitted has now dropped it (a paused guest
resumes here); one that runs the VM says so (this copy goes); one that has
no such session is asked for its VMs: the VM listed there (its node was
restarted after the commit) means this copy goes, not listed means it never
ran there (a paused guest resumes here).  An unreachable target leaves
everything as it is until the next round.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from vmmesh.api.codec import Empty
from vmmesh.api.common import Progress
from vmmesh.api.migrate import (
    ABORT,
    COMMIT,
    LISTEN,
    PREPARE,
    Channel,
    MigrateReport,
    Mode,
    Phase,
    PrepareRequest,
    SessionRequest,
)
from vmmesh.api.vm import LIST_LOCAL
from vmmesh.errors import HypervisorError, NotFound, QMPError, StateError, VmmeshError
from vmmesh.hypervisor import migration as qm
from vmmesh.hypervisor.base import Guest
from vmmesh.hypervisor.qemu import QemuGuest
from vmmesh.hypervisor.qmp import MigrationStats, migrate_to_file_uri
from vmmesh.migrate import faults
from vmmesh.migrate.pipes import FileSource, PipeSession, StreamEnd, join
from vmmesh.net.peers import PeerPool
from vmmesh.net.rpc import RpcConnection
from vmmesh.nurseries import open_nursery
from vmmesh.vm.manager import VmManager
from vmmesh.vm.rows import VmRecord
from vmmesh.vm.state import VmEvent, VmState

log = logging.getLogger("vmmesh.migrate")

POLL = 0.05
RAM_POLL = 0.01  # seconds between two looks at the RAM stream
MIRROR_BRIDGE = "mirror.sock"
SAVED_STATE = "outgoing.state"
OUTGOING = "outgoing.json"  # the note of a migration from here that has not ended
LINK_BEAT = 2.0  # seconds between two beats to the target during a migration
LINK_PATIENCE = 15.0  # seconds a beat (or an abort) waits for the target's answer
SETTLE_EVERY = 5.0  # seconds between two rounds of ``settle``

Emit = Callable[[Progress], Awaitable[None]]


@dataclass
class Outgoing:
    """One VM leaving this host."""

    rec: VmRecord
    guest: QemuGuest
    target_id: str
    target_name: str
    mode: Mode
    session: str = field(default_factory=lambda: secrets.token_hex(16))
    phases: list[Phase] = field(default_factory=list)
    stats: MigrationStats | None = None
    disk_bytes: int = 0
    fetched: bool = False
    paused_at: float | None = None  # when the guest was paused for the RAM copy (TCG)

    def phase(self, name: str, since: float) -> float:
        now = time.monotonic()
        self.phases.append(Phase(name=name, seconds=round(now - since, 3)))
        return now


class Source:
    def __init__(self, mgr: VmManager, pool: PeerPool, host_name: str) -> None:
        self.mgr = mgr
        self.pool = pool
        self.host_name = host_name
        self.sessions: dict[str, PipeSession] = {}
        self.moving: set[str] = set()  # VMs whose migration from here is under way

    async def migrate(
        self, rec: VmRecord, target_id: str, target_name: str, mode: Mode, emit: Emit
    ) -> MigrateReport:
        guest = self.mgr.guests.get(rec.vm_id)
        if rec.state != VmState.RUNNING or guest is None:
            raise StateError(f"{rec.name} is {rec.state}, not running: it cannot migrate")
        if not isinstance(guest, QemuGuest):
            raise HypervisorError("this host's hypervisor cannot migrate VMs")
        out = Outgoing(rec, guest, target_id, target_name, mode)
        t_start = time.monotonic()
        layer = await self._layer(rec)
        disk = self.mgr.rows.vm_dir / rec.disk
        pipes = PipeSession(out.session, target_id)
        self.sessions[out.session] = pipes
        self.moving.add(rec.vm_id)
        try:
            _write_note(guest.run_dir / OUTGOING, out)  # before anything may need settling
        except OSError:
            self.moving.discard(rec.vm_id)
            self.sessions.pop(out.session, None)
            raise
        self.mgr.rows.apply(rec.vm_id, VmEvent.MIGRATE_BEGUN)
        committed = False
        try:
            async with self.pool.dedicated(target_id) as conn, open_nursery() as beat:
                beat.start_soon(self._beat, out)
                t = time.monotonic()
                await emit(Progress(task=rec.name, phase=f"preparing {target_name}"))
                prepared = await conn.request(PREPARE, await self._prepare(out, layer))
                out.fetched = prepared.fetched_template
                t = out.phase("prepare", t)
                faults.hit("prepare")
                if layer is not None:
                    await emit(Progress(task=rec.name, phase="sending the disk's layer"))
                    pipes.put(Channel.LAYER, FileSource(layer))
                    await join(conn, pipes, Channel.LAYER)
                    t = out.phase("layer", t)
                if mode is Mode.LIVE:
                    await self._live(out, conn, pipes, emit)
                else:
                    await self._offline(out, conn, pipes, disk, emit)
                faults.hit("switchover")
                t = time.monotonic()
                await emit(Progress(task=rec.name, phase=f"starting on {target_name}"))
                committed = await self._commit(out, conn)
                out.phase("commit", t)
                beat.cancel_scope.cancel()
        except BaseException as exc:
            if not committed:
                with trio.CancelScope(shield=True):
                    await self._give_up(out, exc)
            raise
        finally:
            self.moving.discard(rec.vm_id)
            self.sessions.pop(out.session, None)
            with trio.CancelScope(shield=True):
                await pipes.aclose()
        faults.hit("resumed")
        await self._gone(rec.vm_id, guest)
        stats = out.stats
        return MigrateReport(
            vm=rec.name,
            source=self.host_name,
            target=target_name,
            mode=mode,
            seconds=round(time.monotonic() - t_start, 3),
            phases=tuple(out.phases),
            downtime_ms=stats.downtime_ms if stats else None,
            total_time_ms=stats.total_ms if stats else 0,
            ram_bytes=stats.ram_transferred if stats else 0,
            disk_bytes=out.disk_bytes,
            wire_bytes=pipes.counts.total,
            fetched_template=out.fetched,
        )

    async def _layer(self, rec: VmRecord) -> Path | None:
        """The file between the overlay and the template, if the VM has one (a warm
        state's disk); None when the overlay sits on the template or base image."""
        disk = self.mgr.rows.vm_dir / rec.disk
        name = await self.mgr.hv.backing_of(disk)
        if name is None:
            raise StateError(f"{rec.name}'s disk has no backing file")
        backing = (disk.parent / name).resolve()
        templates = self.mgr.templates
        chain = {templates.base.disk.resolve()}
        if rec.template_id is not None:
            chain.add(templates.disk_path(templates.get(rec.template_id)).resolve())
        if backing in chain:
            return None
        below = await self.mgr.hv.backing_of(backing)
        if below is None or (backing.parent / below).resolve() not in chain:
            raise StateError(f"{rec.name}'s disk sits on a chain this host cannot send")
        return backing

    async def _prepare(self, out: Outgoing, layer: Path | None) -> PrepareRequest:
        rec = out.rec
        spec = self.mgr.templates.base.boot_spec(
            rec.vm_id, Path(rec.disk), Path("."), rec.vcpus, rec.memory_mb
        )
        shape = await self.mgr.hv.shape(spec)
        return PrepareRequest(
            session=out.session,
            mode=out.mode,
            vm_id=rec.vm_id,
            name=rec.name,
            template_id=rec.template_id,
            image_id=self.mgr.templates.base.image_id,
            request_id=rec.request_id,
            lineage=replace(rec.lineage, origin=f"migrated from {self.host_name}"),
            vcpus=rec.vcpus,
            memory_mb=rec.memory_mb,
            shape=shape.to_json(),
            layer_bytes=layer.stat().st_size if layer is not None else 0,
        )

    async def _live(
        self, out: Outgoing, conn: RpcConnection, pipes: PipeSession, emit: Emit
    ) -> None:
        guest, name = out.guest, out.rec.name
        t = time.monotonic()
        await conn.request(LISTEN, SessionRequest(session=out.session))
        t = out.phase("listen", t)
        bridge = guest.run_dir / MIRROR_BRIDGE
        bridge.unlink(missing_ok=True)
        mine, theirs = socket.socketpair()
        async with open_nursery() as pumps, _listener(bridge) as listener:
            pumps.start_soon(_accept_nbd, listener, pipes, conn)
            try:
                async with guest.monitor() as qmp:
                    await emit(Progress(task=name, phase="mirroring the disk"))
                    await qm.start_mirror(qmp, bridge)
                    faults.hit("mirror")
                    while not (job := await qm.mirror(qmp)).ready:
                        frac = job.offset / job.length if job.length else None
                        await emit(Progress(task=name, phase="mirroring the disk", fraction=frac,
                                      done=job.offset, total=job.length))  # fmt: skip
                        await trio.sleep(POLL)
                    t = out.phase("mirror", t)
                    pipes.put(Channel.RAM, _stream_end(theirs))
                    pumps.start_soon(join, conn, pipes, Channel.RAM)
                    if not qm.tracks_guest_writes(self.mgr.hv.accel):
                        await qm.pause_for_copy(qmp)
                        out.paused_at = time.monotonic()
                    await qm.start_ram(qmp, mine.fileno())
                    mine.close()
                    faults.hit("ram")
                    while (stats := await qm.ram(qmp)).status != "pre-switchover":
                        if stats.failed:
                            raise QMPError(f"migration {stats.status}: {stats.error}")
                        await _emit_ram(emit, name, stats)
                        # the guest is paused from pre-switchover on: notice it soon
                        await trio.sleep(RAM_POLL)
                    t = out.phase("ram", t)
                    faults.hit("paused")
                    await qm.finish_mirror(qmp)
                    while not await qm.mirror_gone(qmp):  # noqa: ASYNC110 - QMP is polled
                        await trio.sleep(0.01)
                    job_bytes = job.length
                    await qm.drop_mirror_node(qmp)
                    await qm.switchover(qmp)
                    while (stats := await qm.ram(qmp)).status != "completed":
                        if stats.failed:
                            raise QMPError(f"migration {stats.status}: {stats.error}")
                        await trio.sleep(0.01)
                    if out.paused_at is not None:  # QEMU counts only its own stop
                        paused_ms = round((time.monotonic() - out.paused_at) * 1000)
                        stats = replace(stats, downtime_ms=max(stats.downtime_ms or 0, paused_ms))
                    out.stats = stats
                    out.disk_bytes = job_bytes
                    out.phase("switchover", t)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await pipes.aclose()  # no mirror write waits on a stalled link
                    async with guest.monitor() as qmp:
                        await qm.abort_source(qmp)
                raise
            finally:
                mine.close()

    async def _offline(
        self,
        out: Outgoing,
        conn: RpcConnection,
        pipes: PipeSession,
        disk: Path,
        emit: Emit,
    ) -> None:
        guest, name = out.guest, out.rec.name
        state = guest.run_dir / SAVED_STATE
        t = time.monotonic()
        await emit(Progress(task=name, phase="saving the guest's state"))
        try:
            async with guest.monitor() as qmp:
                await qm.save_paused(qmp, migrate_to_file_uri(state.absolute()))
                while (stats := await qm.ram(qmp)).status != "completed":
                    if stats.failed:
                        raise QMPError(f"saving {name} {stats.status}: {stats.error}")
                    await trio.sleep(POLL)
            out.stats = stats
            t = out.phase("save", t)
            await emit(Progress(task=name, phase="sending disk and state"))
            pipes.put(Channel.OVERLAY, FileSource(disk))
            pipes.put(Channel.STATE, FileSource(state))
            await join(conn, pipes, Channel.OVERLAY)
            await join(conn, pipes, Channel.STATE)
            out.disk_bytes = disk.stat().st_size
            out.phase("send", t)
        finally:
            state.unlink(missing_ok=True)

    async def _commit(self, out: Outgoing, conn: RpcConnection) -> bool:
        """True once the target runs the VM (or says it already does)."""
        try:
            await conn.request(COMMIT, SessionRequest(session=out.session))
            return True
        except VmmeshError as exc:
            log.warning("commit of %s on %s failed: %s", out.rec.name, out.target_name, exc)
            raise

    async def _beat(self, out: Outgoing) -> None:
        """PeerUnavailable once the target stops answering on the mesh's shared connection
        (its node dead, the link cut): a stalled stream would wait for TCP to give up."""
        while True:
            await trio.sleep(LINK_BEAT)
            await self.pool.call(out.target_id, LIST_LOCAL, Empty(), timeout=LINK_PATIENCE)

    async def _give_up(self, out: Outgoing, exc: BaseException) -> None:
        """Abort the target; resume here unless the target may run the VM."""
        reason = str(exc)[:200] or type(exc).__name__
        vm_id, note = out.rec.vm_id, out.guest.run_dir / OUTGOING
        req = SessionRequest(session=out.session, reason=reason)
        try:
            await self.pool.call(out.target_id, ABORT, req, timeout=LINK_PATIENCE)
        except StateError:  # "it runs here": the target has it
            log.warning("%s: the target already runs it", out.rec.name)
            await self._gone(vm_id, out.guest)
            return
        except VmmeshError as abort_exc:
            if await _paused_for_good(out.guest):
                log.error(
                    "%s: the migration to %s did not end and %s cannot tell (%s): the "
                    "guest stays paused here until it can, it may run there",
                    out.rec.name, out.target_name, out.target_name, abort_exc,
                )  # fmt: skip
                return
            if not isinstance(abort_exc, NotFound):  # it may hold the session: told later
                log.warning("%s: %s was not told to abort: %s", out.rec.name, out.target_name,
                            abort_exc)  # fmt: skip
                await self._resume(vm_id, out.guest)
                log.warning("migration of %s to %s failed: %s", out.rec.name, out.target_name,
                            reason)  # fmt: skip
                return
        await self._resume(vm_id, out.guest)
        _drop_note(note, out.session)
        log.warning("migration of %s to %s failed: %s", out.rec.name, out.target_name, reason)

    async def _resume(self, vm_id: str, guest: QemuGuest) -> None:
        """The guest runs on here (the target does not run it)."""
        async with guest.monitor() as qmp:
            await qm.abort_source(qmp)
        self.mgr.rows.apply(vm_id, VmEvent.MIGRATE_FAILED)
        if vm_id not in self.mgr.guests:  # found paused at the node's start: not watched
            self.mgr.lifecycle.watch(vm_id, guest)

    async def _gone(self, vm_id: str, guest: Guest) -> None:
        """The target runs the VM: this copy goes (row and files first, so the watcher
        does not take QEMU's end for a crash)."""
        self.mgr.rows.apply(vm_id, VmEvent.MIGRATED_AWAY)
        self.mgr.guests.pop(vm_id, None)
        await guest.kill()

    async def settle(self) -> None:
        """One round over the migrations from here that have not ended (their notes)."""
        rows = self.mgr.rows
        for rec in rows.list():
            path = rows.run_root / rec.vm_id / OUTGOING
            note = _read_note(path)
            if note is None or rec.vm_id in self.moving:
                continue
            try:
                await self._settle(rec.vm_id, rec.name, note, path)
            except (VmmeshError, OSError) as exc:
                log.warning("%s: settling its migration to %s: %s", rec.name, note.target, exc)

    async def _settle(self, vm_id: str, name: str, note: Note, path: Path) -> None:
        rows = self.mgr.rows
        if rows.state_of(vm_id) not in (VmState.RUNNING, VmState.MIGRATING):
            _drop_note(path, note.session)
            return
        where = await self._ask(note, vm_id)
        state = rows.state_of(vm_id)
        if where is Where.UNKNOWN or vm_id in self.moving or _read_note(path) != note:
            return
        if state == VmState.RUNNING:  # resumed here before the target answered
            if where is Where.THERE:
                log.error("%s runs here and on %s: a person must stop one", name, note.target)
            _drop_note(path, note.session)
            return
        if state != VmState.MIGRATING:
            _drop_note(path, note.session)
            return
        guest = self.mgr.guests.get(vm_id) or await self.mgr.hv.adopt(vm_id, rows.run_root / vm_id)
        if where is Where.THERE:
            log.warning("%s runs on %s: this paused copy goes", name, note.target)
            if guest is None:
                rows.apply(vm_id, VmEvent.MIGRATED_AWAY)
            else:
                await self._gone(vm_id, guest)
            return
        if not isinstance(guest, QemuGuest):
            self.mgr.lifecycle.mark_lost(vm_id, None, VmEvent.FOUND_GONE)
        else:
            await self._resume(vm_id, guest)
            log.warning("%s does not run on %s: it runs on here", name, note.target)
        _drop_note(path, note.session)

    async def _ask(self, note: Note, vm_id: str) -> Where:
        """Does the target run the VM?  Asking it to abort the session first, so that
        the answer cannot change after it is given."""
        req = SessionRequest(session=note.session, reason="the source settles it")
        try:
            await self.pool.call(note.target_id, ABORT, req, timeout=LINK_PATIENCE)
            return Where.NOT_THERE  # it held the session uncommitted: dropped now
        except StateError:
            return Where.THERE  # committed: it runs there
        except NotFound:
            pass  # no such session there (now): its rows say the rest
        except VmmeshError:
            return Where.UNKNOWN
        try:
            listed = await self.pool.call(
                note.target_id, LIST_LOCAL, Empty(), timeout=LINK_PATIENCE
            )
        except VmmeshError:
            return Where.UNKNOWN
        states = {v.state for v in listed.vms if v.vm_id == vm_id}
        if not states:
            return Where.NOT_THERE
        if states == {VmState.INCOMING}:  # a session it is about to drop
            return Where.UNKNOWN
        return Where.THERE


class Where(enum.Enum):
    """What the target said about a VM whose migration did not end."""

    THERE = "runs there"
    NOT_THERE = "does not run there, and will not"
    UNKNOWN = "no answer"


@dataclass(frozen=True)
class Note:
    """A migration from here, as written in the VM's run directory (``OUTGOING``)."""

    session: str
    target_id: str
    target: str


def _write_note(path: Path, out: Outgoing) -> None:
    tmp = path.with_name(path.name + ".tmp")
    note = {"session": out.session, "target_id": out.target_id, "target": out.target_name}
    tmp.write_text(json.dumps(note))
    os.replace(tmp, path)


def _read_note(path: Path) -> Note | None:
    try:
        d = json.loads(path.read_text())
        return Note(str(d["session"]), str(d["target_id"]), str(d["target"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _drop_note(path: Path, session: str) -> None:
    """The migration of ``session`` has ended: its note goes (not a newer one)."""
    note = _read_note(path)
    if note is not None and note.session == session:
        path.unlink(missing_ok=True)


async def settle_forever(source: Callable[[], Source]) -> None:
    """``Source.settle`` every ``SETTLE_EVERY`` seconds from the node's start."""
    while True:
        try:
            await source().settle()
        except VmmeshError as exc:  # no VM manager (yet)
            log.debug("no migration settled: %s", exc)
        await trio.sleep(SETTLE_EVERY)


async def _paused_for_good(guest: QemuGuest) -> bool:
    """Has the guest left this QEMU (its state sent whole: the target may run it)?

    QEMU's run state says so (``postmigrate``), not ``query-migrate``: a guest
    resumed from a saved state (a warm start) reports that incoming stream as
    ``completed`` long before any migration from here.  True when QEMU cannot
    be asked."""
    try:
        return await guest.query_status() == "postmigrate"
    except VmmeshError:
        return True


async def _emit_ram(emit: Emit, name: str, stats: MigrationStats) -> None:
    total = stats.ram_total or 1
    done = total - stats.ram_remaining
    expect = stats.expected_downtime_ms
    note = f"dirty {stats.dirty_pages_rate} pages/s"
    if expect is not None:
        note += f", expected downtime {expect} ms"
    await emit(
        Progress(
            task=name,
            phase="copying memory",
            fraction=min(1.0, max(0.0, done / total)),
            done=stats.ram_transferred,
            total=stats.ram_total,
            rate=stats.mbps * 1e6 / 8,
            note=note,
        )
    )


def _stream_end(sock: socket.socket) -> StreamEnd:
    return StreamEnd(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))


@asynccontextmanager
async def _listener(path: Path) -> AsyncIterator[trio.socket.SocketType]:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(1)
        yield sock
    finally:
        sock.close()
        path.unlink(missing_ok=True)


async def _accept_nbd(
    listener: trio.socket.SocketType, pipes: PipeSession, conn: RpcConnection
) -> None:
    """QEMU's NBD client connects here; its bytes go to the target's export."""
    sock, _ = await listener.accept()
    pipes.put(Channel.NBD, StreamEnd(trio.SocketStream(sock)))
    await join(conn, pipes, Channel.NBD)
