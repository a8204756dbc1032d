"""The trio driver over an in-memory transport, on trio's autojump clock."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TypeVar

import msgpack
import pytest
import trio

from vmmesh.api.codec import Method, WireType
from vmmesh.api.gossip import ACK2, SYN, Ack
from vmmesh.errors import MalformedMessage, PeerUnavailable, ProtocolError
from vmmesh.gossip.core import GossipCore
from vmmesh.gossip.driver import add_handlers, exchange_with, run_gossip
from vmmesh.net.rpc import Handlers, LocalContext

Req = TypeVar("Req", bound=WireType)
Rep = TypeVar("Rep", bound=WireType)

IDS = [f"{i:02x}" * 8 for i in range(1, 6)]


class Mesh:
    """Routes calls between nodes as the node's RPC layer would, with the
    caller's id as the certificate identity and msgpack on the way."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handlers] = {}
        self.dead: set[str] = set()

    def transport(self, caller: str) -> Transport:
        return Transport(self, caller)


@dataclass
class Transport:
    mesh: Mesh
    caller: str

    async def exchange(self, node_id: str, method: Method[Req, Rep], request: Req) -> Rep:
        if node_id in self.mesh.dead or self.caller in self.mesh.dead:
            raise PeerUnavailable(f"{node_id} does not answer")
        await trio.sleep(0.001)
        # through msgpack and the typed checks, as over a real connection
        wire = msgpack.unpackb(msgpack.packb(request.to_wire()))
        handlers = self.mesh.handlers[node_id]
        answer = await handlers.local(
            method, LocalContext(self.caller), type(request).from_wire(wire)
        )
        return method.reply.from_wire(msgpack.unpackb(msgpack.packb(answer.to_wire())))


async def start_mesh(nursery: trio.Nursery, n: int) -> tuple[Mesh, list[GossipCore]]:
    mesh = Mesh()
    cores = []
    for i, nid in enumerate(IDS[:n]):
        core = GossipCore(nid, 1000 + i)
        core.set_local("name", f"host{i}")
        core.learn(IDS[(i + 1) % n], trio.current_time())  # a ring of seeds
        mesh.handlers[nid] = Handlers()
        add_handlers(mesh.handlers[nid], core)
        cores.append(core)
    for i, core in enumerate(cores):
        await nursery.start(
            lambda core=core, i=i, task_status=trio.TASK_STATUS_IGNORED: run_gossip(
                core,
                mesh.transport(core.node_id),
                interval=0.5,
                fanout=3,
                rng=random.Random(i),
                task_status=task_status,
            )
        )
    return mesh, cores


async def test_nodes_converge_and_see_each_other_up(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        _, cores = await start_mesh(nursery, 5)
        await trio.sleep(5)
        now = trio.current_time()
        for core in cores:
            members = core.members(now)
            assert [m.node_id for m in members] == IDS[:5]
            assert all(m.status == "up" for m in members)
            assert [m.state["name"] for m in members] == [f"host{i}" for i in range(5)]
        cores[2].set_local("vms", ["job"])
        await trio.sleep(2)
        assert all(c.state_of(IDS[2]).get("vms") == ["job"] for c in cores)
        nursery.cancel_scope.cancel()


async def test_dead_host_marked_down_by_all_within_ten_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        mesh, cores = await start_mesh(nursery, 5)
        await trio.sleep(5)
        mesh.dead.add(IDS[4])
        died = trio.current_time()
        down_at: dict[str, float] = {}
        while len(down_at) < 4 and trio.current_time() - died < 30:
            await trio.sleep(0.1)
            for core in cores[:4]:
                if (
                    core.node_id not in down_at
                    and core.status(IDS[4], trio.current_time()) == "down"
                ):
                    down_at[core.node_id] = trio.current_time() - died
        assert len(down_at) == 4
        assert max(down_at.values()) <= 10.0
        for core in cores[:4]:  # the others stay up
            assert all(core.status(n, trio.current_time()) == "up" for n in IDS[:4])
        nursery.cancel_scope.cancel()


async def test_claimed_sender_must_match_certificate() -> None:
    a, b = GossipCore(IDS[0], 1), GossipCore(IDS[1], 1)
    handlers = Handlers()
    add_handlers(handlers, b)
    syn = a.make_syn()
    with pytest.raises(ProtocolError):
        await handlers.local(SYN, LocalContext(IDS[2]), syn)
    assert await handlers.local(SYN, LocalContext(IDS[0]), syn) is not None
    with pytest.raises(MalformedMessage):
        ACK2.request.from_wire({"v": 1, "t": "ack2"})


async def test_ack_from_someone_else_is_refused() -> None:
    a = GossipCore(IDS[0], 1)
    impostor = GossipCore(IDS[3], 1)

    class Wrong:
        async def exchange(self, node_id: str, method: Method[Req, Rep], request: Req) -> Rep:
            return method.reply.from_wire(Ack(impostor.node_id, (), {}, {}).to_wire())

    with pytest.raises(ProtocolError):
        await exchange_with(a, Wrong(), IDS[1])
