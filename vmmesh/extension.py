"""How a feature plugs into the node: the ``NodeExtension`` hooks and what the node offers.

The node (``vmmesh.node``) is wiring; features (VMs, transfers, jobs, later
migration) are extensions.  Each registers its typed handlers and starts its
tasks in ``start``, puts its share of this host's state into gossip in
``publish``, reacts to gossip events in ``on_event``, and adds facts to
``vmmesh status``.  It sees the node only through ``NodeContext``, so an
extension never imports the node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import trio

from vmmesh.api.figures import Figure
from vmmesh.api.host import Capacity
from vmmesh.config import Config
from vmmesh.gossip.core import EventKind
from vmmesh.gossip.hoststate import HostState, HostView
from vmmesh.host.store import Store
from vmmesh.mesh.pki import Identity
from vmmesh.net.peers import PeerPool
from vmmesh.net.rpc import Handlers


class NodeContext(Protocol):
    """What an extension may use of the node."""

    cfg: Config
    identity: Identity
    node_id: str

    @property
    def store(self) -> Store: ...

    @property
    def pool(self) -> PeerPool: ...

    @property
    def data_dir(self) -> Path: ...

    def hosts(self) -> list[HostView]:
        """The mesh as gossip knows it, this host included."""
        ...

    @property
    def published(self) -> HostState:
        """What this host last published of its own state."""
        ...

    def publish(self, state: HostState) -> None:
        """Gossip ``state`` as this host's (the keys whose values changed); usually
        ``node.publish(replace(node.published, field=value))``."""
        ...

    def publish_capacity(self) -> None:
        """Gossip this host's capacity now (after it changed)."""
        ...


class NodeExtension:
    """A feature of the node; every hook has a do-nothing default."""

    async def start(
        self,
        node: NodeContext,
        nursery: trio.Nursery,
        peer_handlers: Handlers,
        control_handlers: Handlers,
    ) -> None:
        return None

    def capacity(self) -> Capacity | None:
        """This host's capacity, if this extension decides it (the VM service does)."""
        return None

    def publish(self, node: NodeContext) -> None:
        return None

    def on_event(self, node: NodeContext, kind: EventKind, node_id: str) -> None:
        return None

    def facts(self) -> Mapping[str, str]:
        """Lines for ``vmmesh status`` (accelerator, base image, ...)."""
        return {}

    def figures(self) -> Sequence[Figure]:
        """What this extension counts, typed (``api.figures``): ``vmmesh status``, the web
        page and ``/metrics`` all read these, from the status reply."""
        return ()

    def reconfigure(self, node: NodeContext) -> None:
        """``node.cfg`` changed (SIGHUP)."""
        return None
