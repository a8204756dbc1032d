"""Settling a migration that did not end: what the source concludes from the target's
answers (``Source._ask``), and the note a migration leaves in the VM's run directory.
The whole of it, with real nodes cut at each step, is ``test_migrate_cuts``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest

from vmmesh.api.codec import Empty
from vmmesh.api.migrate import ABORT
from vmmesh.api.vm import LIST_LOCAL, VmList, VmRow
from vmmesh.errors import NotFound, PeerUnavailable, StateError
from vmmesh.migrate.source import Note, Source, Where, _drop_note, _read_note
from vmmesh.net.peers import PeerPool
from vmmesh.vm.manager import VmManager

VM_ID = "ab" * 8
TARGET = "cd" * 16
NOTE = Note(session="ef" * 16, target_id=TARGET, target="h2")


def _row(vm_id: str, state: str) -> VmRow:
    return VmRow(name="v-1", vm_id=vm_id, request="v", host="h2", node_id=TARGET, state=state)


class FakePool:
    """The target's answers: to the abort (None: it aborted) and to the list of its VMs."""

    def __init__(self, abort: Exception | None, listed: VmList | Exception) -> None:
        self.abort = abort
        self.listed = listed
        self.asked: list[str] = []

    async def call(self, node_id: str, method: Any, request: Any, timeout: float = 30.0) -> Any:
        assert node_id == TARGET
        self.asked.append(method.name)
        if method is ABORT:
            assert request.session == NOTE.session
            if self.abort is not None:
                raise self.abort
            return Empty()
        assert method is LIST_LOCAL
        if isinstance(self.listed, Exception):
            raise self.listed
        return self.listed


NO_LIST = PeerUnavailable("not asked")


@pytest.mark.parametrize(
    ("abort", "listed", "where", "asked"),
    [
        # it held the session uncommitted and has dropped it now
        (None, NO_LIST, Where.NOT_THERE, ["migrate.abort"]),
        # it has committed: it runs the VM
        (StateError("v-1 runs here already"), NO_LIST, Where.THERE, ["migrate.abort"]),
        # it cannot be reached: nothing is concluded
        (PeerUnavailable("no route"), NO_LIST, Where.UNKNOWN, ["migrate.abort"]),
        # no session (restarted, or it aborted by itself): its rows say the rest
        (NotFound("no migration"), VmList(vms=(_row(VM_ID, "running"),)), Where.THERE,
         ["migrate.abort", "vm.list_local"]),
        (NotFound("no migration"), VmList(vms=(_row(VM_ID, "lost"),)), Where.THERE,
         ["migrate.abort", "vm.list_local"]),
        (NotFound("no migration"), VmList(vms=(_row("12" * 8, "running"),)), Where.NOT_THERE,
         ["migrate.abort", "vm.list_local"]),
        (NotFound("no migration"), VmList(), Where.NOT_THERE, ["migrate.abort", "vm.list_local"]),
        # an incoming row without a session: about to be dropped, ask again later
        (NotFound("no migration"), VmList(vms=(_row(VM_ID, "incoming"),)), Where.UNKNOWN,
         ["migrate.abort", "vm.list_local"]),
        (NotFound("no migration"), PeerUnavailable("gone"), Where.UNKNOWN,
         ["migrate.abort", "vm.list_local"]),
    ],
)  # fmt: skip
async def test_what_the_target_says_about_a_migration_that_did_not_end(
    abort: Exception | None, listed: VmList | Exception, where: Where, asked: list[str]
) -> None:
    pool = FakePool(abort, listed)
    source = Source(cast(VmManager, None), cast(PeerPool, pool), "h1")
    assert await source._ask(NOTE, VM_ID) is where
    assert pool.asked == asked


def test_a_note_is_dropped_only_by_its_own_migration(tmp_path: Path) -> None:
    path = tmp_path / "outgoing.json"
    note = {"session": NOTE.session, "target_id": TARGET, "target": "h2"}
    path.write_text(json.dumps(note))
    assert _read_note(path) == NOTE
    _drop_note(path, "00" * 16)  # a later migration's end does not drop it
    assert _read_note(path) == NOTE
    _drop_note(path, NOTE.session)
    assert not path.exists()
    path.write_text("{garbled")
    assert _read_note(path) is None
