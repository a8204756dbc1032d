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
from collections.abc import Callable
from random import Random
from typing import Protocol, TypeVar

import trio

from vmmesh.api.codec import Empty, Method, WireType
from vmmesh.api.gossip import ACK2, SYN, Ack, Ack2, Syn
from vmmesh.errors import ProtocolError, VmmeshError
from vmmesh.gossip.core import GossipCore
from vmmesh.net.refusals import LogOnce, describe
from vmmesh.net.rpc import Context, Handlers

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=WireType)
Rep = TypeVar("Rep", bound=WireType)


class GossipTransport(Protocol):
    async def exchange(self, node_id: str, method: Method[Req, Rep], request: Req) -> Rep:
        """Call ``method`` on the peer; raise PeerUnavailable if it cannot be reached."""
        ...


def _check_claim(claimed: str, peer_id: str) -> None:
    if claimed != peer_id:
        raise ProtocolError(f"gossip sender {claimed} does not match certificate {peer_id}")


def add_handlers(
    handlers: Handlers, core: GossipCore, *, clock: Callable[[], float] = trio.current_time
) -> None:
    """Serve ``gossip.syn`` and ``gossip.ack2`` for ``core``."""

    async def on_syn(ctx: Context, syn: Syn) -> Ack:
        _check_claim(syn.sender, ctx.peer_id)
        return core.on_syn(syn, ctx.peer_id, clock())

    async def on_ack2(ctx: Context, ack2: Ack2) -> Empty:
        _check_claim(ack2.sender, ctx.peer_id)
        core.on_ack2(ack2, ctx.peer_id, clock())
        return Empty()

    handlers.add(SYN, on_syn)
    handlers.add(ACK2, on_ack2)


async def exchange_with(
    core: GossipCore,
    transport: GossipTransport,
    target: str,
    clock: Callable[[], float] = trio.current_time,
) -> None:
    """One Syn/Ack/Ack2 exchange with ``target``."""
    ack = await transport.exchange(target, SYN, core.make_syn())
    _check_claim(ack.sender, target)
    ack2 = core.on_ack(ack, target, clock())
    await transport.exchange(target, ACK2, ack2)


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
    report = LogOnce(log)
    limit = interval if exchange_timeout is None else exchange_timeout
    busy: set[str] = set()

    async def one(target: str) -> None:
        try:
            with trio.move_on_after(limit):
                await exchange_with(core, transport, target, clock)
        except VmmeshError as exc:  # unreachable, refused, revoked: try again next round
            report((target, type(exc).__name__), "gossip with %s failed: %s", target, describe(exc))
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
