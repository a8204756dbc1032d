"""The page's task log: the last things this node saw happen, newest last, bounded.

Fed cheaply by the web extension: gossip's events as ``on_event`` hands
them (a host joined, is suspect, down, up again, forgotten, a value of it
refused), the page's own refusals, and VMs appearing on or leaving a host,
found by comparing each host's gossiped VM names with the last look
(``vm_changes``, pure).  Kept in memory only, like Proxmox's task list of a
node that restarted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from vmmesh.gossip.hoststate import HostView

MAX_EVENTS = 100


@dataclass(frozen=True)
class Event:
    at: float  # unix time
    kind: str  # joined, up, suspect, down, forgotten, refused, vm-started, vm-gone, web-refused
    host: str  # the host it is about ("" for none)
    text: str  # one line for people


class EventLog:
    def __init__(self, size: int = MAX_EVENTS) -> None:
        self._ring: deque[Event] = deque(maxlen=size)
        self.serial = 0  # bumped by every event: the page's streams wake on a change

    def add(self, event: Event) -> None:
        self._ring.append(event)
        self.serial += 1

    def extend(self, events: Iterable[Event]) -> None:
        for e in events:
            self.add(e)

    def rows(self) -> list[dict[str, object]]:
        return [asdict(e) for e in self._ring]


def vm_changes(
    before: Mapping[str, tuple[str, ...]], hosts: Sequence[HostView], now: float
) -> tuple[dict[str, tuple[str, ...]], list[Event]]:
    """Which VMs appeared on or left which host since ``before`` (node id -> VM names).

    Returns the new look and the events; a host seen for the first time adds
    nothing (its VMs were there before this node looked).
    """
    look = {h.node_id: h.vms for h in hosts if h.status != "down"}
    events: list[Event] = []
    for h in hosts:
        if h.node_id not in look or h.node_id not in before:
            continue
        old, new = set(before[h.node_id]), set(h.vms)
        events += [
            Event(now, "vm-started", h.name, f"VM {v} on {h.name}") for v in sorted(new - old)
        ]
        events += [
            Event(now, "vm-gone", h.name, f"VM {v} gone from {h.name}") for v in sorted(old - new)
        ]
    # a down host keeps its last look: its VMs are not reported gone by gossip silence
    return {**{k: v for k, v in before.items() if k not in look}, **look}, events
