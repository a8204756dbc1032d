"""The node's own control methods: ``status``, ``peers``, ``invite``, ``remove``, and
``cert.revoke`` (a client certificate on the CRL)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

from vmmesh.api.codec import Empty
from vmmesh.api.figures import Figure
from vmmesh.api.host import Capacity
from vmmesh.api.names import HEX_ID
from vmmesh.api.node import (
    INVITE,
    PEERS,
    REMOVE,
    STATUS,
    InviteReply,
    InviteRequest,
    PeerRow,
    PeersReply,
    RemoveReply,
    RemoveRequest,
    StatusReply,
)
from vmmesh.api.web import REVOKE_CERT, RevokeCertReply, RevokeCertRequest
from vmmesh.config import Config
from vmmesh.errors import NotFound, UsageError
from vmmesh.gossip.view import MeshView
from vmmesh.mesh import pki
from vmmesh.mesh.invites import InviteBook
from vmmesh.mesh.revocation import Revocations
from vmmesh.net.refusals import Refusals
from vmmesh.net.rpc import Context, Handlers

log = logging.getLogger(__name__)


@dataclass
class MeshService:
    """Serves the node's control methods from what the node holds."""

    cfg: Config
    identity: pki.Identity
    addresses: list[str]
    generation: int
    view: MeshView
    revocations: Revocations
    refusals: Refusals
    invites: InviteBook
    capacity: Callable[[], Capacity]
    facts: Callable[[], Mapping[str, str]]
    publish_crl: Callable[[bytes], None]
    started: float = 0.0
    figures: Callable[[], Sequence[Figure]] = tuple  # gossip's and the extensions'

    def register(self, control: Handlers) -> None:
        control.add(STATUS, self.status)
        control.add(PEERS, self.peers)
        control.add(INVITE, self.invite)
        control.add(REMOVE, self.remove)
        control.add(REVOKE_CERT, self.revoke_cert)

    async def status(self, ctx: Context, body: Empty) -> StatusReply:
        hosts = self.view.hosts(trio.current_time())
        me = self.identity.node_id
        others = [h for h in hosts if h.node_id != me]
        mine = next((h for h in hosts if h.node_id == me), None)
        return StatusReply(
            node_id=me,
            name=self.identity.name,
            mesh_id=self.identity.mesh_id,
            admin=self.identity.holds_ca_key,
            address=self.addresses[0],
            addresses=tuple(self.addresses),
            port=self.cfg.port,
            uptime=max(0.0, time.time() - self.started),
            generation=self.generation,
            peers_total=len(others),
            peers_up=sum(1 for h in others if h.status == "up"),
            capacity=self.capacity(),
            templates=len(mine.templates) if mine else 0,
            vms=mine.vms if mine else (),
            crl_number=self.revocations.number,
            data_dir=str(self.cfg.data_dir),
            facts=dict(self.facts()),
            refusals=self.refusals.snapshot(),
            figures=tuple(self.figures()),
        )

    async def peers(self, ctx: Context, body: Empty) -> PeersReply:
        me = self.identity.node_id
        rows = tuple(
            PeerRow(
                node_id=h.node_id,
                name=h.name,
                this_host=h.node_id == me,
                status=h.status,
                address=h.address,
                last_heard=time.time() if h.node_id == me else h.last_heard,
                capacity=h.capacity,
                templates=h.templates,
                vms=h.vms,
                draining=h.draining,
                work=h.work,
            )
            for h in self.view.hosts(trio.current_time())
        )
        return PeersReply(mesh_id=self.identity.mesh_id, node_id=me, hosts=rows)

    async def invite(self, ctx: Context, req: InviteRequest) -> InviteReply:
        if not self.identity.holds_ca_key:
            raise UsageError(
                "this host does not hold the mesh CA key: run `vmmesh invite` on the host "
                "that ran `vmmesh init`"
            )
        addresses = [f"{a}:{self.cfg.join_port}" for a in self.addresses]
        now = time.time()
        token, secret_hash = pki.generate_invite(
            self.identity, addresses, ttl=int(req.ttl), now=now
        )
        self.invites.prune(now)
        self.invites.add(secret_hash, now, float(token.expires))
        return InviteReply(
            token=pki.encode_token(token), expires=token.expires, addresses=tuple(addresses)
        )

    async def remove(self, ctx: Context, req: RemoveRequest) -> RemoveReply:
        if not self.identity.holds_ca_key:
            raise UsageError("only an admin host (one holding the mesh CA key) can remove hosts")
        try:
            host = self.view.resolve(req.host, trio.current_time())
            node_id, name = host.node_id, host.name
        except NotFound:
            # A host that is gone from gossip can still be revoked by its full id.
            if not HEX_ID.match(req.host) or len(req.host) != 32:
                raise
            node_id, name = req.host, req.host
        if node_id == self.identity.node_id:
            raise UsageError("a host cannot remove itself")
        pem = self.revocations.revoke(node_id)
        self.publish_crl(pem)
        return RemoveReply(node_id=node_id, name=name, crl_number=self.revocations.number)

    async def revoke_cert(self, ctx: Context, req: RevokeCertRequest) -> RevokeCertReply:
        """A client certificate (``vmmesh cert issue``) on the CRL, spread by gossip."""
        if not self.identity.holds_ca_key:
            raise UsageError(
                "only an admin host (one holding the mesh CA key) can revoke certificates"
            )
        pem = self.revocations.revoke_client(int(req.serial, 16))
        self.publish_crl(pem)
        log.info("revoked client certificate %s (CRL #%d)", req.serial, self.revocations.number)
        return RevokeCertReply(serial=req.serial, crl_number=self.revocations.number)
