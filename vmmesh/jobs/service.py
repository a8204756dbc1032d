"""The job service: job sessions for the CLI, and the job side of each VM's host.

Control side (the caller's node): ``job.open`` places the VMs through the
same request coordinator as ``vmmesh request`` (request name
``job-<8 hex>``), answers ``ready``, renews a lease on every host holding one
of its VMs, and holds them until the caller says ``job.end`` or the call
ends; then it shuts them down (shielded from the cancellation that ended
it), unless the session said ``keep``.  ``job.end`` answers once that is
done, so the caller returns with its VMs gone.  ``job.put``, ``job.exec`` and
``job.get`` go to the VM's host.

Host side: ``job.*_local`` do the guest work (``guestjob``); a watchdog shuts
down the VMs of any job whose lease ran out: the owner crashed, restarted or
lost its link, and nobody else would ever stop them.  A job VM the host has
no lease for (created a moment ago, or found at start) gets one lease period
of grace, counted from when it stopped being made (a slow boot spends none).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from vmmesh.api.codec import Empty
from vmmesh.api.common import Progress
from vmmesh.api.figures import Figure, counter, gauge
from vmmesh.api.jobs import (
    END,
    EXEC,
    EXEC_LOCAL,
    GET,
    GET_LOCAL,
    LEASE_LOCAL,
    OPEN,
    PUT,
    PUT_LOCAL,
    FileChunk,
    FileDone,
    JobEnd,
    JobEvent,
    JobExec,
    JobExit,
    JobGet,
    JobLease,
    JobOpen,
    JobPut,
    JobVm,
    Output,
)
from vmmesh.api.names import JOB_PREFIX, request_name_of
from vmmesh.api.vm import REQUEST, SHUTDOWN_LOCAL, RequestReport, RequestVms, ShutdownRequest
from vmmesh.errors import (
    HypervisorError,
    JobLost,
    NoJobVm,
    NotFound,
    PeerUnavailable,
    VmmeshError,
)
from vmmesh.extension import NodeContext, NodeExtension
from vmmesh.hypervisor.base import Guest
from vmmesh.jobs import guestjob
from vmmesh.net.rpc import Context, Handlers, LocalContext
from vmmesh.nurseries import open_nursery

if TYPE_CHECKING:
    from vmmesh.vmservice.service import VmService

log = logging.getLogger("vmmesh.jobs")

WATCH_EVERY = 2.0


@contextlib.contextmanager
def _lost(vm: str) -> Iterator[None]:
    """The VM's host unreachable, the VM not running, its agent gone: the job lost it."""
    try:
        yield
    except (PeerUnavailable, NotFound, HypervisorError) as exc:
        raise JobLost(f"{vm} was lost: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


JOB_STATES = ("placing", "running", "ending")


@dataclass
class Commands:
    """The commands a job ran through ``job.exec`` (a bag's tasks among them)."""

    running: int = 0
    ok: int = 0  # exited 0
    failed: int = 0  # exited non-zero or timed out
    lost: int = 0  # its VM, host or agent was lost


@dataclass
class Session:
    """One open job: its VMs and the hosts that run them."""

    job_id: str
    name: str
    keep: bool
    vms: dict[str, str] = field(default_factory=dict)  # VM name -> node id
    ended: trio.Event = field(default_factory=trio.Event)  # the caller said job.end
    closed: trio.Event = field(default_factory=trio.Event)  # its VMs are gone (or kept)
    opened: float = field(default_factory=time.time)
    commands: Commands = field(default_factory=Commands)
    tasks: int = 0  # a bag's number of tasks, as its caller said (0: not known)

    @property
    def state(self) -> str:
        """placing (its VMs are being made), running (held for the caller), ending."""
        if self.ended.is_set():
            return "ending"
        return "running" if self.vms else "placing"


class JobService(NodeExtension):
    def __init__(self, vms: VmService) -> None:
        self.vms = vms
        self._node: NodeContext | None = None
        self._control: Handlers | None = None
        self.sessions: dict[str, Session] = {}
        self.leases: dict[str, float] = {}  # job request name -> expiry (trio clock)
        self.commands = Commands()  # of every job this node opened, since it started

    def figures(self) -> list[Figure]:
        states = Counter(s.state for s in self.sessions.values())
        c = self.commands
        results = (("ok", c.ok), ("failed", c.failed), ("lost", c.lost))
        return [
            *(gauge("jobs", "Jobs this host opened for callers, by state.", states[state],
                    state=state) for state in JOB_STATES),
            gauge("job_commands_running", "Commands of those jobs running now.", c.running),
            *(counter("job_commands", "Commands (a bag's tasks among them) of the jobs this "
                      "host opened, by result (ok: exit 0; failed: non-zero or timed out; lost: "
                      "its VM or host was lost).", n, result=r) for r, n in results),
        ]  # fmt: skip

    @property
    def node(self) -> NodeContext:
        assert self._node is not None
        return self._node

    @property
    def lease_seconds(self) -> float:
        return float(self.node.cfg.job_lease)

    async def start(
        self,
        node: NodeContext,
        nursery: trio.Nursery,
        peer_handlers: Handlers,
        control_handlers: Handlers,
    ) -> None:
        self._node = node
        self._control = control_handlers
        peer_handlers.add(PUT_LOCAL, self._put_local)
        peer_handlers.add(EXEC_LOCAL, self._exec_local)
        peer_handlers.add(GET_LOCAL, self._get_local)
        peer_handlers.add(LEASE_LOCAL, self._lease_local)
        control_handlers.add(OPEN, self._open)
        control_handlers.add(END, self._end)
        control_handlers.add(PUT, self._put)
        control_handlers.add(EXEC, self._exec)
        control_handlers.add(GET, self._get)
        nursery.start_soon(self._watchdog)

    # --- the caller's node -----------------------------------------------------

    async def _open(self, ctx: Context, req: JobOpen) -> Empty:
        job_id = secrets.token_hex(8)
        session = Session(job_id, f"{JOB_PREFIX}{job_id[:8]}", req.keep, tasks=req.tasks)
        self.sessions[job_id] = session
        try:
            report = await self._place(ctx, session, req)
            for v in report.vms:
                session.vms[v.name] = v.node_id
            ready = tuple(
                JobVm(
                    name=v.name,
                    host=v.host,
                    node_id=v.node_id,
                    start=v.start,
                    seconds=v.seconds,
                    phases=v.phases,
                )
                for v in report.vms
            )
            why = "; ".join(u.reason for u in report.unplaced)
            if not ready:
                raise NoJobVm(f"no VM for the job: {why or 'nothing placed'}")
            await ctx.send_item(JobEvent(job_id=job_id, ready=ready, unplaced=why))
            await self._hold(session)
            return Empty()
        finally:
            del self.sessions[job_id]
            with trio.CancelScope(shield=True):
                try:
                    if session.keep:
                        await self._lease(session, keep=True)
                        log.info("job %s ended; its VMs stay (--keep): %s", job_id, session.name)
                    else:
                        await self._close(session)
                finally:
                    session.closed.set()

    async def _end(self, ctx: Context, req: JobEnd) -> Empty:
        """The caller is done: end the session and answer once its VMs are gone."""
        session = self.sessions.get(req.job_id)
        if session is None:
            raise NotFound(f"no open job {req.job_id}")
        session.ended.set()
        await session.closed.wait()
        return Empty()

    async def _place(self, ctx: Context, session: Session, req: JobOpen) -> RequestReport:
        async def forward(item: Progress) -> None:
            with contextlib.suppress(VmmeshError):
                await ctx.send_item(JobEvent(progress=item))

        request = RequestVms(
            name=session.name,
            count=req.count,
            packages=req.packages,
            custom_zip=req.custom_zip,
            vcpus=req.vcpus,
            memory_mb=req.memory_mb,
            fetch=req.fetch,
        )
        assert self._control is not None
        local = LocalContext(self.node.node_id, forward)
        async with open_nursery() as nursery:
            nursery.start_soon(self._renew_while_placing, session)
            report = await self._control.local(REQUEST, local, request)
            nursery.cancel_scope.cancel()
        return report

    async def _renew_while_placing(self, session: Session) -> None:
        """Renew the job's lease on every host that is up until the request answers: a
        share made early must not lapse while a slower host is still booting its VMs."""
        while True:
            async with open_nursery() as nursery:
                for h in self.node.hosts():
                    if h.status == "up":
                        nursery.start_soon(self._lease_on, session, h.node_id, (), False)
            await trio.sleep(self.lease_seconds / 4)

    async def _hold(self, session: Session) -> None:
        """Renew the VMs' leases until the caller ends the job (or its call ends)."""
        while not session.ended.is_set():
            await self._lease(session)
            with trio.move_on_after(self.lease_seconds / 4):
                await session.ended.wait()

    async def _lease(self, session: Session, keep: bool = False) -> None:
        by_host: dict[str, list[str]] = {}
        for vm, nid in session.vms.items():
            by_host.setdefault(nid, []).append(vm)
        async with open_nursery() as nursery:
            for nid, names in by_host.items():
                nursery.start_soon(self._lease_on, session, nid, tuple(names), keep)

    async def _lease_on(
        self, session: Session, nid: str, names: tuple[str, ...], keep: bool
    ) -> None:
        lease = JobLease(
            job_id=session.job_id,
            vms=names,
            seconds=self.lease_seconds,
            owner=self.node.node_id,
            keep=keep,
        )
        try:
            await self.node.pool.call(nid, LEASE_LOCAL, lease, timeout=10.0)
        except VmmeshError as exc:
            log.warning("job %s: cannot renew the lease on %s: %s", session.job_id, nid[:12], exc)

    async def _close(self, session: Session) -> None:
        for nid in sorted(set(session.vms.values())):
            try:
                with trio.fail_after(120):
                    await self.node.pool.call(
                        nid, SHUTDOWN_LOCAL, ShutdownRequest(name=session.name)
                    )
            except (VmmeshError, trio.TooSlowError) as exc:
                log.warning(
                    "job %s: its VMs on %s were not shut down (%s); that host's lease will",
                    session.job_id,
                    nid[:12],
                    exc,
                )
        log.info("job %s ended; its VMs are gone", session.job_id)

    def _host_of(self, job_id: str, vm: str) -> str:
        session = self.sessions.get(job_id)
        if session is None:
            raise NotFound(f"no open job {job_id}")
        nid = session.vms.get(vm)
        if nid is None:
            raise NotFound(f"job {job_id} has no VM {vm}")
        return nid

    async def _put(self, ctx: Context, req: JobPut) -> Empty:
        nid = self._host_of(req.job_id, req.vm)
        with _lost(req.vm):
            return await self.node.pool.call(nid, PUT_LOCAL, req, 300.0)

    async def _exec(self, ctx: Context, req: JobExec) -> JobExit:
        nid = self._host_of(req.job_id, req.vm)
        both = (self.sessions[req.job_id].commands, self.commands)
        for counts in both:
            counts.running += 1
        try:
            with _lost(req.vm):
                done = await self.node.pool.stream(nid, EXEC_LOCAL, req, ctx.send_item)
        except JobLost:
            for counts in both:
                counts.lost += 1
            raise
        finally:
            for counts in both:
                counts.running -= 1
        for counts in both:
            if done.exit_code == 0 and not done.timed_out:
                counts.ok += 1
            else:
                counts.failed += 1
        return done

    async def _get(self, ctx: Context, req: JobGet) -> FileDone:
        nid = self._host_of(req.job_id, req.vm)
        with _lost(req.vm):
            return await self.node.pool.stream(nid, GET_LOCAL, req, ctx.send_item)

    # --- the VM's host ------------------------------------------------------------

    def _guest(self, job_id: str, vm: str) -> Guest:
        """The running guest of ``vm``, which must belong to job ``job_id``."""
        if not vm.startswith(f"{JOB_PREFIX}{job_id[:8]}-"):
            raise NotFound(f"{vm} is not a VM of job {job_id}")
        return self.vms.manager().running(vm)[1]

    async def _put_local(self, ctx: Context, req: JobPut) -> Empty:
        guest = self._guest(req.job_id, req.vm)
        await guestjob.put(guest, guestjob.Place(req.job_id, req.workdir), req)
        return Empty()

    async def _exec_local(self, ctx: Context, req: JobExec) -> JobExit:
        guest = self._guest(req.job_id, req.vm)
        place = guestjob.Place(req.job_id, req.workdir)

        async def emit(item: Output) -> None:
            await ctx.send_item(item)

        return await guestjob.run(guest, place, list(req.argv), req.timeout, emit)

    async def _get_local(self, ctx: Context, req: JobGet) -> FileDone:
        guest = self._guest(req.job_id, req.vm)
        place = guestjob.Place(req.job_id, req.workdir)

        async def emit(data: bytes) -> None:
            await ctx.send_item(FileChunk(data=data))

        kind, size, mode = await guestjob.fetch(guest, place, req.path, emit)
        return FileDone(kind=kind, size=size, mode=mode)

    async def _lease_local(self, ctx: Context, req: JobLease) -> Empty:
        name = f"{JOB_PREFIX}{req.job_id[:8]}"
        if req.keep:
            self._set_kept(self._kept() | {name})
        self.leases[name] = trio.current_time() + req.seconds
        return Empty()

    @property
    def _kept_file(self) -> Path:
        return self.node.cfg.data_dir / "jobs-kept.json"

    def _kept(self) -> set[str]:
        """Job VMs kept with ``--keep``: the watchdog leaves them alone (a file, so that
        a restart of this node does not shut them down)."""
        try:
            names = json.loads(self._kept_file.read_text())
        except (OSError, ValueError):
            return set()
        return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()

    def _set_kept(self, names: set[str]) -> None:
        tmp = self._kept_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(names)))
        os.replace(tmp, self._kept_file)

    async def _watchdog(self) -> None:
        """Shut down the VMs of jobs whose owner stopped renewing their lease."""
        while True:
            await trio.sleep(WATCH_EVERY)
            mgr = self.vms.mgr
            if mgr is None:
                continue
            now = trio.current_time()
            jobvms = [v for v in mgr.list_vms() if v.name.startswith(JOB_PREFIX)]
            names = {request_name_of(v.name) for v in jobvms}
            # A VM still being made (booting, resuming) spends no lease: the owner is
            # waiting for the request to answer and renews only once it has. On a slow
            # host the boot alone may outlast a lease period.
            making = {request_name_of(n) for n in self.vms.being_made() if n.startswith(JOB_PREFIX)}
            kept = self._kept()
            if kept - names:
                self._set_kept(kept & names)  # shut down by hand since
            for name in making:
                self.leases[name] = max(self.leases.get(name, now), now + self.lease_seconds)
            for name in names - kept:
                expiry = self.leases.setdefault(name, now + self.lease_seconds)  # grace
                if expiry < now:
                    log.warning(
                        "job VMs %s: their owner stopped renewing the lease: shut down", name
                    )
                    self.leases.pop(name, None)
                    await mgr.shutdown(name)
                    self.vms.publish_now()
            for name in list(self.leases):
                if name not in names and self.leases[name] < now:
                    del self.leases[name]
