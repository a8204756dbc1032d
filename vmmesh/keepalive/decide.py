"""Who may run, who recovers, and what: the keep-alive decisions, pure.

* **Quorum.**  A mesh of three or more hosts votes: a host that can reach
  (up or suspect) more than half of the hosts gossip knows, itself included,
  has the quorum.  A host without it stops feeding its watchdog, which kills
  its keep-alive VMs (self-fencing), and never starts one.  A mesh of one or
  two hosts cannot tell a dead peer from a cut link, so it does not vote
  (``None``): no fencing and no recovery on another host; a keep-alive VM is
  only restarted on its own host.  (Proxmox needs a third vote for the same
  reason.)
* **The recoverer.**  The up host with the lowest node id, on the side that
  has the quorum; every host computes the same answer from the same gossip,
  so no coordinator is needed, and when it dies the next lowest takes over.
* **What to recover.**  A keep-alive VM that a host marked down for at least
  ``grace`` seconds had, unless a host that is up lists a VM of that name
  (someone recovered it, or it moved).  ``grace`` is longer than the fencing
  deadline, so the dead or cut-off host has killed its copy by then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vmmesh.api.host import KeptVm

ALIVE = ("up", "suspect")


@dataclass(frozen=True)
class Member:
    """A host as keep-alive needs it."""

    node_id: str
    name: str
    status: str  # up | suspect | down
    silent_for: float  # seconds since it was last heard
    vms: tuple[str, ...] = ()
    keepalive: tuple[KeptVm, ...] = ()
    draining: bool = False


def has_quorum(members: Sequence[Member], self_id: str, known: int = 0) -> bool | None:
    """True/False for a mesh of 3+; None when the mesh is too small to vote.

    ``known`` is how many hosts the mesh had lately (``Membership``): gossip
    forgets a host down for a minute, and a cut-off host that counted only the
    hosts it still remembers would soon think itself a mesh of one."""
    size = max(len(members), known)
    if size < 3:
        return None
    alive = sum(1 for m in members if m.status in ALIVE or m.node_id == self_id)
    return alive * 2 > size


def recoverer(members: Sequence[Member], self_id: str, known: int = 0) -> bool:
    """Is this host the one that recovers the VMs of dead hosts?"""
    if not has_quorum(members, self_id, known):
        return False
    up = [m.node_id for m in members if m.status == "up" or m.node_id == self_id]
    return bool(up) and min(up) == self_id


class Membership:
    """The hosts seen lately (node id -> when last seen in gossip, wall seconds),
    kept for ``keep`` seconds after a host is gone from gossip: the vote's size."""

    def __init__(self, seen: dict[str, float], keep: float = 86400.0) -> None:
        self.seen = dict(seen)
        self.keep = keep

    def update(self, members: Sequence[Member], now: float) -> int:
        for m in members:
            self.seen[m.node_id] = now
        self.seen = {n: t for n, t in self.seen.items() if now - t < self.keep}
        return len(self.seen)


@dataclass(frozen=True)
class Recovery:
    vm: KeptVm
    from_host: Member


def to_recover(members: Sequence[Member], grace: float) -> list[Recovery]:
    """Keep-alive VMs of hosts down for ``grace`` that no live host runs."""
    running = {name for m in members if m.status in ALIVE for name in m.vms}
    out: list[Recovery] = []
    for m in members:
        if m.status != "down" or m.silent_for < grace:
            continue
        out.extend(Recovery(k, m) for k in m.keepalive if k.name not in running)
    return out


def runs_elsewhere(members: Sequence[Member], self_id: str, name: str) -> Member | None:
    """A live host other than this one that runs a VM called ``name``."""
    for m in members:
        if m.node_id != self_id and m.status in ALIVE and name in m.vms:
            return m
    return None


def pick_target(
    members: Sequence[Member], vm: KeptVm, avoid: frozenset[str], free: dict[str, int]
) -> Member | None:
    """Where a recovered VM goes: an up host that is not draining, has a free slot
    (``free``: node id -> free slots), prefers the template's holders (``holders``
    in ``free`` is not known here, so by most free slots), never one in ``avoid``."""
    fit = [
        m
        for m in members
        if m.status == "up"
        and not m.draining
        and m.node_id not in avoid
        and free.get(m.node_id, 0) > 0
    ]
    if not fit:
        return None
    return max(fit, key=lambda m: (free[m.node_id], m.name))
