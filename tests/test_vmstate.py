"""The VM lifecycle's one table of transitions, walked pair by pair."""

from __future__ import annotations

import itertools

import pytest

from vmmesh.errors import InternalError
from vmmesh.vm.state import GONE, TRANSITIONS, Outcome, VmEvent, VmState, ends, transition

S, E = VmState, VmEvent

#: Written out again here, so a change to the table is a change to this test too.
EXPECTED: dict[tuple[VmState, VmEvent], Outcome] = {
    (S.CREATING, E.STARTED): S.RUNNING,
    (S.CREATING, E.FAILED): GONE,
    (S.CREATING, E.STOP_ORDERED): S.STOPPING,
    (S.RUNNING, E.STOP_ORDERED): S.STOPPING,
    (S.RUNNING, E.EXITED): S.LOST,
    (S.RUNNING, E.FOUND_GONE): S.LOST,
    (S.STOPPING, E.STOP_ORDERED): S.STOPPING,
    (S.STOPPING, E.STOPPED): GONE,
    (S.STOPPING, E.FAILED): GONE,
    (S.LOST, E.STOP_ORDERED): S.STOPPING,
    (S.LOST, E.DISK_MISSING): GONE,
    (S.STOPPED, E.STOP_ORDERED): S.STOPPING,
    (S.STOPPED, E.DISK_MISSING): GONE,
    # migration: the source's row
    (S.RUNNING, E.MIGRATE_BEGUN): S.MIGRATING,
    (S.MIGRATING, E.MIGRATE_FAILED): S.RUNNING,
    (S.MIGRATING, E.MIGRATED_AWAY): GONE,
    (S.MIGRATING, E.STOP_ORDERED): S.STOPPING,
    (S.MIGRATING, E.EXITED): S.LOST,
    (S.MIGRATING, E.FOUND_GONE): S.LOST,
    # migration: the target's row
    (S.INCOMING, E.STARTED): S.RUNNING,
    (S.INCOMING, E.FAILED): GONE,
    (S.INCOMING, E.STOP_ORDERED): S.STOPPING,
    # keep-alive
    (S.LOST, E.RESTART_BEGUN): S.RESTARTING,
    (S.RESTARTING, E.STARTED): S.RUNNING,
    (S.RESTARTING, E.RESTART_FAILED): S.LOST,
    (S.RESTARTING, E.STOP_ORDERED): S.STOPPING,
    (S.LOST, E.SUPERSEDED): GONE,
}


@pytest.mark.parametrize(("state", "event"), list(itertools.product(VmState, VmEvent)))
def test_every_state_and_event(state: VmState, event: VmEvent) -> None:
    if (state, event) in EXPECTED:
        assert transition(state, event) == EXPECTED[(state, event)]
    else:
        with pytest.raises(InternalError, match=f"{state}.*{event}"):
            transition(state, event)


def test_the_table_is_the_expected_one() -> None:
    assert dict(TRANSITIONS) == EXPECTED


def test_state_values_are_the_stored_words() -> None:
    """The sqlite column and the wire keep today's strings."""
    assert [s.value for s in VmState] == [
        "creating",
        "running",
        "stopping",
        "lost",
        "stopped",
        "migrating",
        "incoming",
        "restarting",
    ]
    assert str(VmState.RUNNING) == "running"
    assert isinstance(VmState.RUNNING, str)


def test_events_that_always_delete() -> None:
    assert {e for e in VmEvent if ends(e)} == {
        E.FAILED,
        E.STOPPED,
        E.DISK_MISSING,
        E.MIGRATED_AWAY,
        E.SUPERSEDED,
    }
