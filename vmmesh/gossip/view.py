"""The mesh as this node's gossip holds it: typed ``HostView``s for placement and the CLI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from vmmesh.errors import NotFound
from vmmesh.gossip.core import Member
from vmmesh.gossip.hoststate import HostState, HostView, parse

JOINING = "joining"  # a host's status while its state has not arrived here


class GossipState(Protocol):
    """What a view reads of a gossip core (``GossipCore``, or SWIM's ``SwimGossip``)."""

    def version_of(self, node_id: str) -> object: ...

    def state_of(self, node_id: str) -> dict[str, Any]: ...

    def members(self, now: float) -> list[Member]: ...


class MeshView:
    """Reads hosts out of a ``GossipCore``; each host's keys are parsed once per version."""

    def __init__(self, core: GossipState, wall: Callable[[float], float]) -> None:
        self._core = core
        self._wall = wall
        self._parsed: dict[str, tuple[object, HostState]] = {}

    def state(self, node_id: str) -> HostState:
        version = self._core.version_of(node_id)
        cached = self._parsed.get(node_id)
        if cached is not None and cached[0] == version and version is not None:
            return cached[1]
        try:
            state = parse(self._core.state_of(node_id))
        except NotFound:
            state = HostState()
        self._parsed[node_id] = (version, state)
        return state

    def hosts(self, now: float) -> list[HostView]:
        """Every host gossip holds, this one included, in node id order.

        A host found (by discovery, a seed, a link) whose state has not arrived
        yet is ``joining``, not ``up``: nothing can be placed on it or fetched
        from it until its name, capacity and inventory are known here.
        """
        out = []
        for m in self._core.members(now):
            st = self.state(m.node_id)
            status = JOINING if m.status == "up" and not m.state else str(m.status)
            out.append(
                HostView(
                    node_id=m.node_id,
                    name=st.name or m.node_id[:12],
                    status=status,
                    capacity=st.capacity,
                    templates=st.templates,
                    vms=st.vms,
                    draining=st.draining,
                    address=st.addresses[0] if st.addresses else "",
                    last_heard=self._wall(m.last_heard),
                    images=st.images,
                    building=st.building,
                    keepalive=st.keepalive,
                    vmshape=st.vmshape,
                    web_port=st.web_port,
                    work=st.work,
                )
            )
        if len(self._parsed) > 2 * len(out) + 16:
            live = {h.node_id for h in out}
            self._parsed = {k: v for k, v in self._parsed.items() if k in live}
        return out

    def name_of(self, node_id: str) -> str:
        name = self.state(node_id).name
        return f"{name} ({node_id[:12]})" if name else node_id

    def resolve(self, name_or_id: str, now: float) -> HostView:
        """The one host called ``name_or_id`` (name, id, or id prefix)."""
        hosts = self.hosts(now)
        matches = [h for h in hosts if name_or_id in (h.node_id, h.name)]
        if not matches:
            matches = [h for h in hosts if h.node_id.startswith(name_or_id)]
        if len(matches) != 1:
            what = "no host" if not matches else "more than one host"
            raise NotFound(f"{what} called {name_or_id!r:.80} in this mesh")
        return matches[0]
