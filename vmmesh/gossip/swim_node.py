"""SWIM as the node's gossip: the face the node and ``MeshView`` already know.

The node was written against ``GossipCore`` (Scuttlebutt): it calls
``set_local``, ``learn``, ``remove`` and ``drain_events``, and ``MeshView``
reads ``members``, ``state_of`` and ``version_of``.  ``SwimGossip`` offers
the same calls over a ``SwimCore`` run by a ``SwimDriver``, so that the
node picks one protocol or the other by configuration (``gossip = "swim"``)
and nothing above it changes.  What differs underneath: liveness comes from
probes (a member the core has not heard from is not "down" for silence
alone, as Scuttlebutt's phi detector would have it, but when its probes and
the indirect ones fail and nobody refutes the suspicion), and messages are
datagrams: ``deliver`` takes one from an authenticated peer, ``run`` needs a
transport whose ``send`` may lose it.  On the mesh that transport is the
peer links themselves (``gossip.swim`` calls over mutual TLS, see
``node``), so SWIM adds no port and no unauthenticated socket.

``last_heard`` of a member is when a datagram from it last arrived here, or
for one never heard from directly, when the core's record of it entered its
state (``MeshView`` shows it on the page and in ``vmmesh peers``; keep-alive
counts a down host's grace from it); this host's own is now.
"""

from __future__ import annotations

from random import Random
from typing import Any

import trio

from vmmesh.errors import NotFound
from vmmesh.gossip.core import GossipEvent, Member
from vmmesh.gossip.swim import SwimConfig, SwimCore, ValueCheck
from vmmesh.gossip.swim_driver import SwimDriver, SwimTransport

MAX_EVENTS = 10_000  # events not yet drained by the node (it drains every 0.25 s)


class SwimGossip:
    """A ``SwimCore`` and its driver behind the calls the node makes of its gossip."""

    def __init__(
        self,
        node_id: str,
        generation: int,
        *,
        check: ValueCheck | None = None,
        config: SwimConfig | None = None,
        rng: Random | None = None,
    ) -> None:
        self.node_id = node_id
        self.core = SwimCore(
            node_id,
            generation,
            now=trio.current_time() if _in_trio() else 0.0,
            rng=rng or Random(),
            config=config,
            check=check,
        )
        self._events: list[GossipEvent] = []
        self._heard: dict[str, float] = {}
        self.driver: SwimDriver | None = None

    # --- what the node calls ----------------------------------------------------

    def set_local(self, key: str, value: Any) -> None:
        if self.driver is not None:
            self.driver.set_local(key, value)
        else:
            self.core.set_local(key, value)

    def learn(self, node_id: str, now: float) -> None:
        """A host found by discovery, a seed or an inbound link: probe and sync with it
        (the core does nothing for a host it holds already)."""
        if node_id == self.node_id:
            return
        if self.driver is not None:
            self.driver.join(node_id)
        else:
            self.core.join(node_id, now)

    def remove(self, node_id: str) -> None:
        if self.driver is not None:
            self.driver.remove(node_id)
        else:
            self.core.remove(node_id)

    def drain_events(self) -> list[GossipEvent]:
        events, self._events = self._events, []
        return events

    def deliver(self, peer_id: str, data: bytes) -> None:
        """A datagram from ``peer_id`` (its TLS certificate's node id)."""
        self._heard[peer_id] = trio.current_time()
        if self.driver is not None:
            self.driver.deliver(peer_id, data)

    async def run(
        self,
        transport: SwimTransport,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self.driver = SwimDriver(self.core, transport, on_event=self._on_event)
        try:
            await self.driver.run(task_status=task_status)
        finally:
            self.driver = None

    @property
    def local_version(self) -> int:
        """This host's highest key version (packed)."""
        return self.core.local_version

    # --- what MeshView reads ------------------------------------------------------

    def version_of(self, node_id: str) -> int | None:
        return self.core.version_of(node_id)

    def state_of(self, node_id: str) -> dict[str, Any]:
        return self.core.state_of(node_id)

    def members(self, now: float) -> list[Member]:
        out = []
        for nid in self.core.members():
            try:
                state = self.core.state_of(nid)
                status = self.core.status(nid)
            except NotFound:
                continue
            if nid == self.node_id:
                heard = now
            else:  # a host never heard from directly: since its state began here
                heard = self._heard.get(nid) or self.core.since(nid) or now
            out.append(Member(nid, status, heard, state))
        return out

    # --- helpers -------------------------------------------------------------------

    def _on_event(self, ev: GossipEvent) -> None:
        if len(self._events) < MAX_EVENTS:
            self._events.append(ev)


def _in_trio() -> bool:
    try:
        trio.current_time()
    except RuntimeError:
        return False
    return True
