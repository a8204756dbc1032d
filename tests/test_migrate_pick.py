"""Which host a migration may go to: hosts whose gossiped guest shape differs
(another QEMU, machine type, accelerator) are left out, and named with the reason."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from vmmesh.api.host import NO_CAPACITY
from vmmesh.api.migrate import MigrateRequest
from vmmesh.errors import StateError
from vmmesh.gossip.hoststate import HostView
from vmmesh.migrate.service import MigrateService

SHAPE = {"qemu": "QEMU emulator version 7.2.15", "machine": "q35", "accel": "tcg"}
FREE = NO_CAPACITY.__class__(cores=2, memory_mb=4096, storage_quota_mb=9000,
                             storage_free_mb=9000, free_vm_slots=2, free_disk_slots=2)  # fmt: skip


def _host(name: str, **shape: str) -> HostView:
    return HostView(node_id=name * 16, name=name, status="up", capacity=FREE,
                    vmshape={**SHAPE, **shape})  # fmt: skip


def _service(hosts: list[HostView]) -> MigrateService:
    svc = MigrateService(SimpleNamespace(vm_shape=SHAPE, image_id="ab" * 8))  # type: ignore[arg-type]
    node: Any = SimpleNamespace(node_id="me" * 16, hosts=lambda: hosts)
    svc._node = node
    return svc


def test_a_host_with_another_qemu_is_never_picked() -> None:
    svc = _service([_host("h2", qemu="QEMU emulator version 8.2.2"), _host("h3")])
    target, _why = svc._pick_target(MigrateRequest(vm="web-1"), None)
    assert target.name == "h3"


def test_asking_for_a_host_with_another_machine_type_is_refused_with_the_reason() -> None:
    svc = _service([_host("h2", machine="pc-i440fx-7.2")])
    with pytest.raises(StateError, match="h2 cannot run this host's guests: machine"):
        svc._pick_target(MigrateRequest(vm="web-1", to="h2"), None)
