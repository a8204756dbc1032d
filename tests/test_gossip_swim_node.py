"""SWIM as the node's gossip (``gossip = "swim"``): three real nodes over real TLS on
loopback (fake hypervisors), the datagrams carried by ``gossip.swim`` calls on the
peer links.  The same mesh behaviour as with Scuttlebutt: every host sees every
other up with its state, a request spreads over them by what they gossip, and a
host whose node stops is marked down by the others; what a quiet mesh costs is
counted on each node's gossip figures."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.nodeutil import Host, eventually, fast_publish, mesh, port, request, root
from vmmesh.gossip.swim_node import SwimGossip
from vmmesh.gossip.view import JOINING, MeshView

__all__ = ["fast_publish", "port", "root"]  # fixtures


def _status(h: Host, name: str) -> str:
    v = h.view().get(name)
    return v.status if v is not None else "absent"


async def test_a_mesh_on_swim_shares_state_places_vms_and_marks_a_stopped_node_down(
    root: Path, port: int
) -> None:
    async with mesh(root, port, gossip="swim") as hosts:
        h1, h2, h3 = hosts
        assert all(isinstance(h.node.core, SwimGossip) for h in hosts)
        # state travels: a request on h1 fills its own slots, then the others' it learned
        reply = await request(h1, "web", 4)
        assert reply.placed == 4, reply
        assert len({vm.host for vm in reply.vms}) >= 2, reply
        await eventually(
            lambda: (
                sorted(h2.view()["h1"].vms) == sorted(v.name for v in reply.vms if v.host == "h1")
            ),
            "h2 learns h1's VMs",
        )
        # a quiet mesh: what each node sent over five seconds, in bytes per second
        before = [h.node.gossip_traffic.bytes_out for h in hosts]
        await trio.sleep(5)
        sent = [h.node.gossip_traffic.bytes_out - b for h, b in zip(hosts, before, strict=True)]
        rates = [s / 5 for s in sent]
        print("SWIM bytes/s per node, quiet mesh of 3:", [round(r) for r in rates])
        assert all(r > 0 for r in rates)  # probes go on
        # h3's node stops: the others mark it down
        h3.scope.cancel()
        await eventually(
            lambda: _status(h1, "h3") == "down" and _status(h2, "h3") == "down",
            "h3 is down on h1 and h2",
        )
        assert _status(h1, "h2") == "up" and _status(h2, "h1") == "up"


def test_a_host_found_before_its_state_arrives_is_joining_not_up() -> None:
    """Discovery makes a SWIM member at once; until its state arrives, the view calls it
    joining, so no placement, fetch or test's "all up" counts on what it does not know."""
    me, other = "a" * 32, "b" * 32
    gossip = SwimGossip(me, 1)
    gossip.set_local("name", "h1")
    gossip.learn(other, 0.0)
    view = MeshView(gossip, wall=lambda t: t)
    hosts = {h.node_id: h for h in view.hosts(0.0)}
    assert hosts[me].status == "up"
    assert hosts[other].status == JOINING and hosts[other].name == other[:12]
