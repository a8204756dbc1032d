"""The keep-alive extension: VMs requested with ``--keep-alive`` are brought back.

Every ``TICK`` (and at once when a QEMU ends without an order) the service
reads the mesh from gossip (``decide.Member``) and:

1. publishes this host's keep-alive VMs (``keepalive``: name, template,
   packages, generation), so the others can make them again;
2. feeds the self-fencing watchdog while it may run keep-alive VMs
   (``fence``): it has the quorum, or the mesh is too small to vote;
3. for each of its own ``lost`` keep-alive VMs: deletes it if a live host
   runs that VM now (a newer generation: recovered or moved while this host
   was away), else, if it may run VMs, starts it again from its own disk
   once (``VmManager.restart``), and after that relocates it: the next
   generation is made from its template on another host, then this copy goes;
4. if it is the recoverer (``decide.recoverer``), makes the keep-alive VMs
   of hosts down for ``GRACE`` seconds again on other hosts, with the next
   generation, through the ordinary share call of a request.

``GRACE`` is longer than ``fence.FENCE`` plus the failure detector's time to
mark a host down, so a host that is cut off has killed its copies before
anyone else starts them; a host that comes back sees the newer generation
in gossip and deletes its old copies instead of starting them.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Mapping

import trio

from vmmesh.api.host import KeptVm
from vmmesh.api.names import request_name_of
from vmmesh.api.vm import FETCH_ALWAYS, SHARE, Lineage, ShareRequest
from vmmesh.errors import VmmeshError
from vmmesh.extension import NodeContext, NodeExtension
from vmmesh.gossip.hoststate import HostView
from vmmesh.keepalive import decide, fence
from vmmesh.net.rpc import Handlers
from vmmesh.vm.lifecycle import VmStopped
from vmmesh.vm.rows import VmRecord
from vmmesh.vm.state import VmState
from vmmesh.vmservice.service import VmService

log = logging.getLogger("vmmesh.keepalive")

TICK = 1.0
GRACE = 15.0  # seconds a host is down before its keep-alive VMs are made elsewhere
SETTLE = 10.0  # seconds after the node starts before it decides about its lost VMs
MAX_RESTART = 1  # restarts on the same host before the VM is relocated (Proxmox's default)
MEMBERS_KEY = "keepalive_members"  # hosts seen lately: the size of the vote
_KEPT_STATES = (
    VmState.CREATING,
    VmState.RUNNING,
    VmState.MIGRATING,
    VmState.RESTARTING,
    VmState.LOST,
)


class KeepAliveService(NodeExtension):
    def __init__(self, vms: VmService) -> None:
        self.vms = vms
        self._node: NodeContext | None = None
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self._restarts: dict[str, int] = {}
        self._busy: set[str] = set()  # VM names being restarted, relocated or recovered
        # names this host made elsewhere, until gossip surely shows them there
        self._made: dict[str, float] = {}
        self._fetching: set[str] = set()  # templates being pulled for keep-alive VMs
        self._started = 0.0
        self._settled_at = 0.0  # when this host last gained the right to run VMs
        self.quorum: bool | None = None
        self.recovered = 0
        self.restarted = 0
        vms.stop_hooks.append(self._on_stop)
        vms.publish_hooks.append(self.publish)
        self._membership: decide.Membership | None = None

    async def start(
        self,
        node: NodeContext,
        nursery: trio.Nursery,
        peer_handlers: Handlers,
        control_handlers: Handlers,
    ) -> None:
        self._node, self._nursery = node, nursery
        self._started = self._settled_at = time.monotonic()
        nursery.start_soon(self._loop)

    def publish(self, node: NodeContext) -> None:
        mgr = self.vms.mgr
        if mgr is None:
            return
        kept = tuple(self._kept(mgr.list_vms()))
        node.publish(dataclasses.replace(node.published, keepalive=kept))

    def facts(self) -> Mapping[str, str]:
        q = {None: "mesh too small to vote", True: "yes", False: "NO: keep-alive VMs fenced"}
        return {
            "keep-alive": f"quorum {q[self.quorum]}; {self.restarted} restarted, "
            f"{self.recovered} recovered from dead hosts"
        }

    def _kept(self, rows: list[VmRecord]) -> list[KeptVm]:
        packages = {t.template_id: t.packages for t in self.vms.manager().list_templates()}
        return [
            KeptVm(
                name=v.name,
                template=v.template_id or "",
                packages=packages.get(v.template_id or "", frozenset()),
                generation=v.lineage.generation,
                vcpus=v.vcpus,
                memory_mb=v.memory_mb,
            )
            for v in rows
            if v.lineage.keep_alive and v.state in _KEPT_STATES
        ]

    def _on_stop(self, ev: VmStopped) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            with trio.move_on_after(TICK):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                self._tick()
            except VmmeshError as exc:
                log.warning("keep-alive: %s", exc)

    # --- one look at the mesh ------------------------------------------------------

    def _members(self, hosts: list[HostView]) -> list[decide.Member]:
        now = time.time()
        return [
            decide.Member(
                node_id=h.node_id,
                name=h.name,
                status=h.status,
                silent_for=max(0.0, now - h.last_heard) if h.last_heard else 0.0,
                vms=h.vms,
                keepalive=h.keepalive,
                draining=h.draining,
            )
            for h in hosts
        ]

    def _tick(self) -> None:
        mgr = self.vms.mgr
        node = self._node
        if mgr is None or node is None:
            return
        hosts = node.hosts()
        members = self._members(hosts)
        me = node.node_id
        if self._membership is None:
            raw = node.store.get_meta(MEMBERS_KEY, {}) or {}
            seen = {str(k): float(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
            self._membership = decide.Membership(seen)
        before = dict(self._membership.seen)
        known = self._membership.update(members, time.time())
        if set(before) != set(self._membership.seen) or not before:
            node.store.set_meta(MEMBERS_KEY, self._membership.seen)
        quorum = decide.has_quorum(members, me, known)
        if quorum is not False and self.quorum is False:
            # back from a cut: hosts are heard again before their keys arrive,
            # so where the VMs run now is known only a little later
            self._settled_at = time.monotonic()
        self.quorum = quorum
        rows = mgr.list_vms()
        kept_running = [
            (mgr.guests[v.vm_id].pid, str(mgr.rows.run_root / v.vm_id))
            for v in rows
            if v.lineage.keep_alive and v.vm_id in mgr.guests
        ]
        fence.list_guests(node.data_dir, kept_running)
        if self.quorum is not False:
            fence.beat(node.data_dir)
        if kept_running:
            fence.start_watchdog(node.data_dir)
        for rec in rows:
            if rec.lineage.keep_alive and rec.state == VmState.LOST:
                self._lost(rec, members)
            elif rec.lineage.keep_alive and rec.state == VmState.RUNNING:
                self._outlived(rec, members)
        now = time.monotonic()
        self._made = {n: t for n, t in self._made.items() if now - t < GRACE}
        self._replicate_templates(hosts)
        if decide.recoverer(members, me, known):
            for r in decide.to_recover(members, GRACE):
                if r.vm.name not in self._busy and r.vm.name not in self._made:
                    self._spawn(self._recover, r.vm, r.from_host.name, hosts)

    def _lost(self, rec: VmRecord, members: list[decide.Member]) -> None:
        node = self._node
        assert node is not None
        other = decide.runs_elsewhere(members, node.node_id, rec.name)
        if other is not None:
            log.warning("%s runs on %s now: this old copy is deleted", rec.name, other.name)
            self.vms.manager().supersede(rec.vm_id)
            self.vms.publish_now()
            return
        if self.quorum is False or rec.name in self._busy:
            return  # fenced: never start a keep-alive VM without the quorum
        if time.monotonic() - self._settled_at < SETTLE:
            return  # gossip may not yet show where the VM runs now
        if self._restarts.get(rec.vm_id, 0) < MAX_RESTART:
            self._restarts[rec.vm_id] = self._restarts.get(rec.vm_id, 0) + 1
            self._spawn(self._restart, rec)
        else:
            kept = self._kept([rec])[0]
            self._spawn(self._relocate, rec, kept)

    def _replicate_templates(self, hosts: list[HostView]) -> None:
        """Keep-alive VMs' templates on two hosts at least: recovery must not wait for
        a build.  The lowest-id up host that lacks such a template (and is not
        draining) fetches it."""
        node = self._node
        mgr = self.vms.mgr
        assert node is not None and mgr is not None
        if mgr.templates.fetcher is None:
            return
        alive = [h for h in hosts if h.status in decide.ALIVE]
        wanted = {k.template for h in alive for k in h.keepalive if k.template}
        for tid in sorted(wanted - self._fetching):
            holders = [h for h in alive if any(t.template_id == tid for t in h.templates)]
            if not holders or len(holders) >= 2:
                continue
            lacking = sorted(
                h.node_id
                for h in alive
                if h.status == "up"
                and not h.draining
                and h not in holders
                and h.capacity.free_disk_slots > 0
            )
            if lacking and lacking[0] == node.node_id:
                self._fetching.add(tid)
                assert self._nursery is not None
                self._nursery.start_soon(self._fetch_template, tid)

    async def _fetch_template(self, tid: str) -> None:
        mgr = self.vms.manager()
        fetcher = mgr.templates.fetcher
        try:
            if fetcher is not None:
                await fetcher.obtain(tid, frozenset(), float("inf"), FETCH_ALWAYS, _quiet)
                log.info("template %s fetched: a keep-alive VM's template on two hosts", tid[:12])
        except VmmeshError as exc:
            log.warning("template %s of a keep-alive VM not fetched: %s", tid[:12], exc)
        finally:
            self._fetching.discard(tid)
            self.vms.publish_now()

    def _outlived(self, rec: VmRecord, members: list[decide.Member]) -> None:
        """A newer generation of this running VM runs on a live host: this copy stops
        (the last guard against a double run; fencing should have made it needless)."""
        node = self._node
        assert node is not None
        for m in members:
            if m.node_id == node.node_id or m.status not in decide.ALIVE:
                continue
            newer = [
                k
                for k in m.keepalive
                if k.name == rec.name and k.generation > rec.lineage.generation
            ]
            if newer and rec.name not in self._busy:
                log.error(
                    "%s generation %d runs on %s: this copy (generation %d) is stopped",
                    rec.name, newer[0].generation, m.name, rec.lineage.generation,
                )  # fmt: skip
                self._spawn(self._stop_old, rec)
                return

    async def _stop_old(self, rec: VmRecord) -> None:
        await self.vms.manager().shutdown_vm(rec.vm_id)

    def _spawn(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        assert self._nursery is not None
        name = args[0].name
        self._busy.add(name)

        async def run() -> None:
            try:
                await fn(*args)
            except VmmeshError as exc:
                log.warning("keep-alive of %s: %s", name, exc)
            finally:
                self._busy.discard(name)
                self.vms.publish_now()
                self._wake.set()

        self._nursery.start_soon(run)

    # --- the three ways back ---------------------------------------------------------

    async def _restart(self, rec: VmRecord) -> None:
        why = f"restarted here: {rec.stop_reason or 'QEMU ended without an order'}"
        log.warning("%s: %s", rec.name, why)
        seconds = await self.vms.manager().restart(rec.vm_id, why[:1000])
        self.restarted += 1
        log.info("%s runs again here after %.1f s", rec.name, seconds)

    async def _relocate(self, rec: VmRecord, kept: KeptVm) -> None:
        node = self._node
        assert node is not None
        why = f"relocated from {self._name(node.node_id)}: it did not stay up after a restart"
        await self._make_elsewhere(kept, why, node.hosts(), avoid=frozenset({node.node_id}))
        self.vms.manager().supersede(rec.vm_id)

    async def _recover(self, kept: KeptVm, from_host: str, hosts: list[HostView]) -> None:
        why = f"recovered from {from_host}, which went down"
        log.warning("%s: %s (generation %d)", kept.name, why, kept.generation + 1)
        await self._make_elsewhere(kept, why, hosts, avoid=frozenset())
        self.recovered += 1

    async def _make_elsewhere(
        self, kept: KeptVm, why: str, hosts: list[HostView], avoid: frozenset[str]
    ) -> None:
        node = self._node
        assert node is not None
        fit = [
            h
            for h in hosts
            if h.status == "up"
            and not h.draining
            and h.node_id not in avoid
            and h.capacity.free_slots > 0
        ]
        if not fit:
            raise VmmeshError(f"no host can take {kept.name} now")

        def score(h: HostView) -> tuple[bool, int, str]:
            holds = not kept.template or any(t.template_id == kept.template for t in h.templates)
            return (holds, h.capacity.free_slots, h.name)

        target = max(fit, key=score)
        index = kept.name.rpartition("-")[2]
        share = ShareRequest(
            request_id=secrets.token_hex(8),
            name=request_name_of(kept.name),
            count=1,
            packages=kept.packages,
            first_index=int(index) if index.isdigit() and int(index) > 0 else None,
            vcpus=kept.vcpus,
            memory_mb=kept.memory_mb,
            lineage=Lineage(keep_alive=True, generation=kept.generation + 1, origin=why[:1000]),
        )

        async def quiet(item: object) -> None:
            return None

        reply = await node.pool.stream(target.node_id, SHARE, share, quiet)
        if reply.granted < 1 or not reply.vms:
            raise VmmeshError(f"{target.name} did not make {kept.name}: {reply.errors}")
        self._made[kept.name] = time.monotonic()
        log.info("%s runs on %s now (generation %d)", kept.name, target.name, kept.generation + 1)

    def _name(self, node_id: str) -> str:
        assert self._node is not None
        for h in self._node.hosts():
            if h.node_id == node_id:
                return h.name
        return node_id[:12]


def _quiet(phase: str, fraction: float | None) -> None:
    return None
