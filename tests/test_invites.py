import logging
import time
from pathlib import Path

import pytest

from vmmesh.api.host import Capacity
from vmmesh.api.node import InviteRequest
from vmmesh.config import Config
from vmmesh.errors import TokenError
from vmmesh.gossip.core import GossipCore
from vmmesh.gossip.view import MeshView
from vmmesh.host.store import Store
from vmmesh.mesh import pki
from vmmesh.mesh.invites import InviteBook
from vmmesh.mesh.revocation import Revocations
from vmmesh.mesh.service import MeshService
from vmmesh.net.refusals import Refusals
from vmmesh.net.rpc import LocalContext

WEEK = 7 * 86400.0


def _book(tmp_path: Path) -> InviteBook:
    return InviteBook(Store.open(tmp_path / "state.db"))


def test_invite_works_once(tmp_path: Path) -> None:
    book = _book(tmp_path)
    book.add("aa" * 16, now=100.0, expires=200.0)
    book.consume("aa" * 16, now=150.0)
    with pytest.raises(TokenError, match="already used"):
        book.consume("aa" * 16, now=151.0)


def test_invite_expires(tmp_path: Path) -> None:
    book = _book(tmp_path)
    book.add("bb" * 16, now=100.0, expires=200.0)
    with pytest.raises(TokenError, match="expired"):
        book.consume("bb" * 16, now=201.0)


def test_unknown_invite(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="unknown"):
        _book(tmp_path).consume("cc" * 16, now=1.0)


def test_used_invite_survives_reopen(tmp_path: Path) -> None:
    book = _book(tmp_path)
    book.add("dd" * 16, now=100.0, expires=200.0)
    book.consume("dd" * 16, now=110.0)
    with pytest.raises(TokenError, match="already used"):
        _book(tmp_path).consume("dd" * 16, now=120.0)


def _mesh_service(tmp_path: Path, store: Store) -> MeshService:
    """The admin host's control methods over ``store``, nothing else running."""
    cfg = Config(data_dir=tmp_path)
    identity = pki.init_mesh(cfg.pki_dir, "alpha")
    return MeshService(
        cfg=cfg,
        identity=identity,
        addresses=["127.0.0.1"],
        generation=1,
        view=MeshView(GossipCore(identity.node_id, 1), wall=lambda t: t),
        revocations=Revocations(cfg.pki_dir, store, identity.node_id, lambda _: None),
        refusals=Refusals(logging.getLogger("test")),
        invites=InviteBook(store),
        capacity=Capacity,
        facts=dict,
        publish_crl=lambda _: None,
    )


async def test_issuing_an_invite_forgets_the_long_expired(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "state.db")
    svc = _mesh_service(tmp_path, store)
    book = InviteBook(store)
    now = time.time()
    book.add("aa" * 16, now=now - 2 * WEEK, expires=now - WEEK - 60)  # never used
    book.add("bb" * 16, now=now - 2 * WEEK, expires=now - WEEK - 60)
    book.consume("bb" * 16, now=now - 2 * WEEK + 1)  # used, then expired
    book.add("cc" * 16, now=now - 3600, expires=now - 60)  # expired a minute ago
    reply = await svc.invite(LocalContext(peer_id=svc.identity.node_id), InviteRequest())
    with store.transaction() as conn:
        rows = {r["secret_hash"] for r in conn.execute("SELECT secret_hash FROM invites")}
    new = pki.decode_token(reply.token).secret_hash
    assert rows == {"cc" * 16, new}
    with pytest.raises(TokenError, match="unknown"):
        book.consume("bb" * 16, now=now)
    with pytest.raises(TokenError, match="expired"):
        book.consume("cc" * 16, now=now)
    book.consume(new, now=now)
