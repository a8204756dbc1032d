"""``VmManager``: the one object the node, its services and the tests hold.

A thin facade: it builds the parts (rows, admission, lifecycle, warm
scheduling, creation) over one store and one hypervisor, hosts their tasks in
``run`` and passes each call to the part that owns it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import trio

from vmmesh.api.common import Emit
from vmmesh.api.customzip import CheckedZip
from vmmesh.api.host import Capacity
from vmmesh.api.vm import FETCH_AUTO, PLAIN, Lineage, ShareReply
from vmmesh.host.capacity import CapacityPolicy, HostProbe
from vmmesh.host.store import Store
from vmmesh.host.templates import TemplateManager, TemplateRecord
from vmmesh.host.warm import WarmStore
from vmmesh.hypervisor.base import ExecResult, Guest, Hypervisor
from vmmesh.vm.admission import Admission
from vmmesh.vm.creation import Creator, no_progress
from vmmesh.vm.lifecycle import Lifecycle, SshAccess, VmStopped
from vmmesh.vm.reconcile import reconcile
from vmmesh.vm.restart import restart
from vmmesh.vm.rows import VmRecord, VmRows
from vmmesh.vm.spare import Spares
from vmmesh.vm.state import VmEvent
from vmmesh.vm.warmsched import WARM_RETRY, WarmScheduler


class VmManager:
    """VMs, templates and capacity of this host: the library the node calls.

    Start ``run`` in the node's nursery (``await nursery.start(mgr.run)``)
    before anything else: it hosts the watchers.  Then call ``reconcile``.
    ``host`` and ``node_id`` are this host's name and node id, which the
    ``api.vm.VmMade`` records of ``request_local`` carry.
    """

    def __init__(
        self,
        *,
        store: Store,
        hypervisor: Hypervisor,
        templates: TemplateManager,
        data_dir: Path,
        policy: CapacityPolicy,
        probe: Callable[[], HostProbe],
        host: str,
        node_id: str,
        on_unexpected_stop: Callable[[VmStopped], None] | None = None,
        agent_timeout: float = 300.0,
        now: Callable[[], float] = time.time,
        ssh_ports: range = range(0),
        ssh_bind: str = "127.0.0.1",
        warm: WarmStore | None = None,
    ) -> None:
        self.store = store
        self.hv = hypervisor
        self.templates = templates
        self.data_dir = data_dir
        self.vm_dir = data_dir / "vms"
        self.run_root = data_dir / "run"
        self.warm = warm
        self.rows = VmRows(
            store, self.vm_dir, self.run_root, now=now, ssh_ports=ssh_ports, ssh_bind=ssh_bind
        )
        self.admission = Admission(self.rows, data_dir, policy, probe)
        self.lifecycle = Lifecycle(self.rows, now=now, on_unexpected_stop=on_unexpected_stop)
        self.warm_sched = WarmScheduler(self.admission, self.rows, templates, policy, warm)
        self.spares = Spares(
            admission=self.admission,
            rows=self.rows,
            hypervisor=hypervisor,
            base=templates.base,
            warm_state=lambda key: warm.get(key) if warm is not None else None,
        )
        templates.on_remove.append(lambda tid: self.spares.forget(tid, "its template went"))
        self.warm_sched.spare_room = self.spares.yield_room
        self.creator = Creator(
            rows=self.rows,
            admission=self.admission,
            warm=self.warm_sched,
            lifecycle=self.lifecycle,
            spares=self.spares,
            hypervisor=hypervisor,
            templates=templates,
            policy=policy,
            probe=probe,
            agent_timeout=agent_timeout,
            host=host,
            node_id=node_id,
        )
        self.vm_dir.mkdir(parents=True, exist_ok=True)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the watcher tasks and warm boots until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self.lifecycle.nursery = self.warm_sched.nursery = nursery
                self.spares.nursery = nursery
                task_status.started()
                while True:
                    await trio.sleep(WARM_RETRY)
                    self.warm_sched.trim()  # templates fetched or built since take their room
                    self.warm_sched.retry()
                    self.spares.check(self.warm_sched.enabled)
        finally:
            self.spares.nursery = None
            await self.spares.close()

    @property
    def policy(self) -> CapacityPolicy:
        return self.admission.policy

    @policy.setter
    def policy(self, policy: CapacityPolicy) -> None:
        """A new policy (the node re-read its config) for every part that reads one."""
        self.admission.policy = self.warm_sched.policy = self.creator.policy = policy

    @property
    def guests(self) -> dict[str, Guest]:
        return self.lifecycle.guests

    @property
    def warm_enabled(self) -> bool:
        return self.warm_sched.enabled

    @warm_enabled.setter
    def warm_enabled(self, on: bool) -> None:
        self.warm_sched.enabled = on

    # --- reading ------------------------------------------------------

    def list_vms(self) -> list[VmRecord]:
        return self.rows.list()

    def list_templates(self) -> list[TemplateRecord]:
        return self.templates.records()

    def get(self, name_or_id: str) -> VmRecord:
        return self.rows.get(name_or_id)

    # --- admission ----------------------------------------------------

    def capacity(self) -> Capacity:
        return self.admission.capacity()

    def offered(self) -> Capacity:
        return self.admission.offered()

    def reserve(self, count: int) -> int:
        return self.admission.reserve(count)

    def release(self, count: int) -> None:
        self.admission.release(count)

    # --- creating and warm states -------------------------------------

    async def request_local(
        self,
        name: str,
        count: int,
        packages: Iterable[str] = (),
        custom_zip: CheckedZip | None = None,
        progress: Emit = no_progress,
        *,
        first_index: int | None = None,
        vcpus: int | None = None,
        memory_mb: int | None = None,
        request_id: str = "",
        fetch: str = FETCH_AUTO,
        lineage: Lineage = PLAIN,
    ) -> ShareReply:
        return await self.creator.request_local(
            name,
            count,
            packages,
            custom_zip,
            progress,
            first_index=first_index,
            vcpus=vcpus,
            memory_mb=memory_mb,
            request_id=request_id,
            fetch=fetch,
            lineage=lineage,
        )

    def warm_held(self) -> set[str]:
        return self.warm_sched.held()

    def schedule_warm(self, rec: TemplateRecord | None) -> None:
        self.warm_sched.schedule(rec)

    def trim_warm(self, need_mb: int = 0, keep: str | None = None) -> bool:
        return self.warm_sched.trim(need_mb, keep)

    # --- using and stopping -------------------------------------------

    async def exec(
        self, name_or_id: str, argv: list[str], *, input_data: bytes | None = None
    ) -> ExecResult:
        return await self.lifecycle.exec(name_or_id, argv, input_data=input_data)

    def running(self, name_or_id: str) -> tuple[VmRecord, Guest]:
        return self.lifecycle.running(name_or_id)

    async def ssh_access(self, name_or_id: str, public_keys: Sequence[str]) -> SshAccess:
        return await self.lifecycle.ssh_access(name_or_id, public_keys)

    async def shutdown(self, name: str) -> list[VmRecord]:
        return await self.lifecycle.shutdown(name)

    async def shutdown_vm(self, vm_id: str) -> None:
        await self.lifecycle.shutdown_vm(vm_id)

    async def restart(self, vm_id: str, why: str) -> float:
        """Boot a lost VM again from its own disk (keep-alive); seconds it took."""
        return await restart(
            rows=self.rows,
            admission=self.admission,
            lifecycle=self.lifecycle,
            hv=self.hv,
            base=self.templates.base,
            vm_id=vm_id,
            why=why,
            agent_timeout=self.creator.agent_timeout,
        )

    def supersede(self, vm_id: str) -> None:
        """A lost VM's next generation runs on another host: delete this copy."""
        self.rows.apply(vm_id, VmEvent.SUPERSEDED)

    async def reconcile(self) -> list[str]:
        changes = self.spares.reconcile()
        return changes + await reconcile(
            self.rows, self.lifecycle, self.hv, self.templates, self.warm
        )
