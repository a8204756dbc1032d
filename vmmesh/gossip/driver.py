"""Thin trio glue: run a GossipCore over the node's authenticated RPC calls.

The core decides everything; this module only keeps time, opens one
exchange per chosen target each interval (Syn out, Ack back, Ack2 out) and
answers the peers' exchanges.  Who a peer *is* comes from its TLS
certificate (``ctx.peer_id``); the sender id inside a gossip message must
match it, or the call is refused with ``ProtocolError``.  That is the only
place where a certificate identity meets a gossip claim.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from random import Random
from typing import Any, Protocol

import trio

from vmmesh.errors import PeerUnavailable, ProtocolError, RemoteError, Revoked
from vmmesh.gossip.core import Ack, Ack2, GossipCore, Syn

log = logging.getLogger(__name__)

SYN_METHOD = "gossip.syn"
ACK2_METHOD = "gossip.ack2"


class GossipTransport(Protocol):
    async def exchange(self, node_id: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        """Call ``method`` on the peer; raise PeerUnavailable if it cannot be reached."""
        ...


class PeerContext(Protocol):
    @property
    def peer_id(self) -> str:
        """The node id from the peer's verified certificate."""
        ...


Handler = Callable[[PeerContext, dict[str, Any]], Awaitable[dict[str, Any] | None]]


class _LogOnce:
    """Log a peer's repeated fault once at WARNING, then at DEBUG."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, type[BaseException]]] = set()

    def __call__(self, peer: str, exc: BaseException) -> None:
        key = (peer, type(exc))
        level = logging.DEBUG if key in self._seen else logging.WARNING
        self._seen.add(key)
        log.log(level, "gossip with %s failed: %s", peer, exc)


def _check_claim(claimed: str, peer_id: str) -> None:
    if claimed != peer_id:
        raise ProtocolError(f"gossip sender {claimed} does not match certificate {peer_id}")


def make_handlers(
    core: GossipCore, *, clock: Callable[[], float] = trio.current_time
) -> dict[str, Handler]:
    """Handlers for the node's RPC server: ``gossip.syn`` and ``gossip.ack2``."""

    async def on_syn(ctx: PeerContext, body: dict[str, Any]) -> dict[str, Any] | None:
        syn = Syn.from_wire(body)
        _check_claim(syn.sender, ctx.peer_id)
        return core.on_syn(syn, ctx.peer_id, clock()).to_wire()

    async def on_ack2(ctx: PeerContext, body: dict[str, Any]) -> dict[str, Any] | None:
        ack2 = Ack2.from_wire(body)
        _check_claim(ack2.sender, ctx.peer_id)
        core.on_ack2(ack2, ctx.peer_id, clock())
        return None

    return {SYN_METHOD: on_syn, ACK2_METHOD: on_ack2}


async def exchange_with(
    core: GossipCore,
    transport: GossipTransport,
    target: str,
    clock: Callable[[], float] = trio.current_time,
) -> None:
    """One Syn/Ack/Ack2 exchange with ``target``."""
    answer = await transport.exchange(target, SYN_METHOD, core.make_syn().to_wire())
    ack = Ack.from_wire(answer)
    _check_claim(ack.sender, target)
    ack2 = core.on_ack(ack, target, clock())
    await transport.exchange(target, ACK2_METHOD, ack2.to_wire())


async def run_gossip(
    core: GossipCore,
    transport: GossipTransport,
    *,
    interval: float,
    fanout: int,
    rng: Random,
    exchange_timeout: float | None = None,
    clock: Callable[[], float] = trio.current_time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Gossip forever: every ``interval`` tick the core and start exchanges
    with ``fanout`` targets.

    The rounds keep time whatever the peers do: exchanges run in the
    background, each bounded by ``exchange_timeout`` (default: one
    interval), and a target whose previous exchange is still under way is
    not asked again.  A first exchange may include a TLS handshake, which
    on a loaded host takes longer than one interval.
    """
    report = _LogOnce()
    limit = interval if exchange_timeout is None else exchange_timeout
    busy: set[str] = set()

    async def one(target: str) -> None:
        try:
            with trio.move_on_after(limit):
                await exchange_with(core, transport, target, clock)
        except (PeerUnavailable, ProtocolError, RemoteError, Revoked) as exc:
            report(target, exc)
        finally:
            busy.discard(target)

    async with trio.open_nursery() as nursery:
        task_status.started()
        deadline = trio.current_time()
        while True:
            core.tick(clock())
            for target in core.pick_targets(rng, fanout):
                if target not in busy:
                    busy.add(target)
                    nursery.start_soon(one, target)
            deadline += interval
            await trio.sleep_until(max(deadline, trio.current_time()))
