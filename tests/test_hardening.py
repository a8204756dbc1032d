"""One host must not be able to break the mesh (issue 11), through real nodes in one trio
run: real TLS, real gossip, the control socket, a fake hypervisor."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.apistrategies import ANY_VALUE, body
from tests.fakehv import make_base_image
from tests.nodeutil import (
    Host,
    call,
    eventually,
    fake,
    fast_publish,
    free_port_pair,
    identities,
    mesh,
    port,
    request,
    root,
    run_node,
)
from tests.test_images import fake_qcow2
from vmmesh.api import vm as vm_api
from vmmesh.api.codec import Empty
from vmmesh.api.gossip import ACK2, SYN
from vmmesh.api.node import PEERS, STATUS
from vmmesh.api.vm import LIST, TEMPLATES
from vmmesh.config import Config
from vmmesh.errors import InternalError, RemoteError, VmmeshError
from vmmesh.gossip.hoststate import SCHEMA
from vmmesh.host.build import BaseImage
from vmmesh.host.images import ImageStore
from vmmesh.net.refusals import Cause
from vmmesh.net.rpc import RpcConnection
from vmmesh.node import Node
from vmmesh.vmservice.service import VmService

__all__ = ["fast_publish", "port", "root"]  # fixtures

GOOD_TEMPLATE = {
    "template_id": "ab" * 16,
    "base_image_id": "cd" * 32,
    "packages": ["perl"],
    "chain": [],
    "delta_sizes": [],
    "parent_id": None,
}
BAD_VALUES: dict[str, list[Any]] = {
    "templates": [5, [5], [{**GOOD_TEMPLATE, "packages": "perl"}], [GOOD_TEMPLATE] * 1001],
    "capacity": ["plenty", {"cores": "many"}, {"cores": -1}],
    "vms": ["web-1", [1, 2], ["../etc"], ["vm"] * 5000],
    "name": [5, "x" * 64, "bad name"],
    "addr": ["10.0.0.1:7400", [5], ["x" * 100], ["10.0.0.1:7400"] * 9],
    "draining": ["yes", 1],
    "web": ["7402", -1, 70000, True],
    "work": [
        "fetching",
        [{"kind": "fetch"}],  # no name
        [{"kind": "mining", "name": "x"}],
        [{"kind": "fetch", "name": "x" * 129}],
        [{"kind": "fetch", "name": "x", "fraction": 1.5}],
        [{"kind": "fetch", "name": "x", "done": -1}],
        [{"kind": "fetch", "name": "x", "rate": float("nan")}],
        [{"kind": "migration", "name": "x", "peer": 7}],
        [{"kind": "job", "name": "x"}] * 33,
    ],
    "crl": ["not bytes", b"x" * (300 << 10)],
    "something-new": [b"x" * 5000],
}


def _peers_work(hosts: list[Host]) -> list[Any]:
    return [h.node.view.hosts(trio.current_time()) for h in hosts]


def _held(h: Host, author: Host) -> Any:
    """The version of ``author``'s keys ``h`` holds (either protocol's form)."""
    return h.node.core.version_of(author.node.node_id)


@pytest.mark.parametrize("gossip", ["scuttlebutt", "swim"])
@pytest.mark.parametrize("key", sorted(BAD_VALUES))
async def test_a_bad_gossip_value_is_refused_not_relayed_and_reads_keep_working(
    root: Path, port: int, key: str, gossip: str
) -> None:
    """h2 holds a valid certificate and gossips garbage for its own key: every other
    host refuses the value (not stored, so never relayed), counts it, logs it, and
    ``vmmesh peers`` keeps answering everywhere, whichever protocol carries it."""
    async with mesh(root, port, gossip=gossip) as hosts:
        h1, h2, h3 = hosts
        core = h2.node.core
        good = core.state_of(h2.node.node_id).get(key)
        for bad in BAD_VALUES[key]:
            core.set_local(key, bad)
            version: Any = core.local_version

            def arrived(h: Host, version: Any = version) -> bool:
                held = _held(h, h2)
                return held is not None and held >= version

            await eventually(lambda: arrived(h1) and arrived(h3), f"h2's {key} reaches all")
            for h in (h1, h3):
                assert key not in h.node.core.state_of(h2.node.node_id), (key, bad)
                await call(h, PEERS, Empty())
                await call(h, LIST, Empty())
                await call(h, TEMPLATES, Empty())
                await eventually(partial(_counted, h), "the refusal is counted")
                status = await call(h, STATUS, Empty())
                assert status.refusals["gossip"] >= 1
            if good is not None:
                h2.node.core.set_local(key, good)  # the real value wins again
        if key == "capacity":
            await eventually(
                lambda: {v.name: v for v in h1.node.hosts()}["h2"].capacity.free_slots == 2,
                "h2's real capacity wins again",
            )


def _counted(h: Host) -> bool:
    return h.node.refusals.counts[Cause.GOSSIP] >= 1


async def test_a_refused_gossip_value_is_logged_with_its_reason(
    root: Path, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    async with mesh(root, port) as hosts:
        h2 = hosts[1]
        h2.node.core.set_local("templates", 5)
        await eventually(
            lambda: any("refused gossip" in r.getMessage() for r in caplog.records),
            "the refusal is logged",
        )
        line = next(r.getMessage() for r in caplog.records if "refused gossip" in r.getMessage())
        assert "host h2" in line and "gossip 'templates': 5 is not a list" in line


@contextlib.asynccontextmanager
async def one_node(root: Path, port: int) -> AsyncIterator[Node]:
    identities(root)
    cfg = Config(
        data_dir=root / "h1",
        name="h1",
        listen="127.0.0.1",
        advertise=("127.0.0.1",),
        port=port,
        mdns=False,
        gossip_interval=0.1,
    )
    image_dir = root / "h1" / "base"
    image_dir.mkdir(parents=True)
    svc = VmService(hypervisor=fake(), base=BaseImage(image_dir, make_base_image(image_dir)))
    node = Node(cfg, extensions=[svc])
    async with trio.open_nursery() as nursery:
        await nursery.start(run_node, node)
        yield node
        nursery.cancel_scope.cancel()


PEER_ID = "fe" * 16
PEER_METHODS = {
    SYN.name: SYN.request,
    ACK2.name: ACK2.request,
    **{
        m.name: m.request
        for m in (
            vm_api.SHARE,
            vm_api.SHUTDOWN_LOCAL,
            vm_api.LIST_LOCAL,
            vm_api.TEMPLATES_LOCAL,
            vm_api.EXEC_LOCAL,
            vm_api.SSH_LOCAL,
        )
    },
}


@st.composite
def peer_call(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A call a verified but hostile peer might make: a method of ours (or not) with a
    body that is valid, mutated, or anything at all."""
    method = draw(st.sampled_from([*sorted(PEER_METHODS), "vm.nope", "gossip.syn"]))
    kind = draw(st.sampled_from(["valid", "mutated", "garbage", "gossip"]))
    if kind == "gossip" or (kind == "valid" and method.startswith("gossip")):
        deltas = draw(
            st.lists(
                st.tuples(
                    st.sampled_from([PEER_ID, "ab" * 16]),
                    st.sampled_from([*SCHEMA, "other"]),
                    st.integers(0, 5),
                    st.integers(0, 1 << 32),
                    ANY_VALUE,
                ).map(list),
                max_size=8,
            )
        )
        return ACK2.name, {"v": 1, "t": "ack2", "from": PEER_ID, "deltas": deltas}
    cls = PEER_METHODS.get(method)
    if kind == "garbage" or cls is None or method.startswith("gossip"):
        return method, draw(st.dictionaries(st.text(max_size=10), ANY_VALUE, max_size=6))
    wire = draw(body(cls)).to_wire()
    if kind == "mutated":
        key = draw(st.sampled_from(sorted(wire)))
        wire[key] = draw(ANY_VALUE)
    return method, wire


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(calls=st.lists(peer_call(), min_size=1, max_size=12))
def test_fuzzed_peer_calls_break_nothing(
    tmp_path_factory: pytest.TempPathFactory, calls: list[tuple[str, dict[str, Any]]]
) -> None:
    """Random and mutated bodies from a verified peer: every answer is a reply or an
    error of a known class (never an internal error), and the node's read paths
    (peers, status, vms, templates) keep answering."""
    root = tmp_path_factory.mktemp("fuzz", numbered=True)
    port = free_port_pair()  # a random one was sometimes taken (its join port, in CI)

    async def main() -> None:
        async with one_node(root, port) as node:
            a, b = trio.testing.memory_stream_pair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node.pool.connection(b, PEER_ID).run)
                client = RpcConnection(a, node.node_id)
                await nursery.start(client.run)
                for method, raw in calls:
                    with trio.fail_after(30):
                        try:
                            await client.call(method, raw)
                        except (InternalError, RemoteError) as exc:
                            raise AssertionError(f"{method} {raw!r:.300}: {exc}") from exc
                        except VmmeshError:
                            pass  # refused, or a fair answer (NotFound, CapacityError)
                await node.control_handlers.local(PEERS, _Ctx(), Empty())
                await node.control_handlers.local(STATUS, _Ctx(), Empty())
                await node.control_handlers.local(LIST, _Ctx(), Empty())
                await node.control_handlers.local(TEMPLATES, _Ctx(), Empty())
                nursery.cancel_scope.cancel()

    trio.run(main)


class _Ctx:
    peer_id = "local"

    async def send_item(self, item: object) -> None:
        return None


async def test_a_base_image_added_while_the_node_runs_is_taken_up(root: Path, port: int) -> None:
    """The README's order: start the node, then build or import the base image."""
    identities(root)
    cfg = Config(
        data_dir=root / "h1",
        name="h1",
        listen="127.0.0.1",
        advertise=("127.0.0.1",),
        port=port,
        mdns=False,
        gossip_interval=0.1,
    )
    svc = VmService(hypervisor=fake())
    node = Node(cfg, extensions=[svc])
    async with trio.open_nursery() as nursery:
        await nursery.start(run_node, node)
        status = await node.control_handlers.local(STATUS, _Ctx(), Empty())
        assert status.capacity.free_slots == 0
        assert "no base image" in status.capacity.blocked
        assert status.facts["VMs"].startswith("off: no base image")
        host = Host("h1", cfg, node, svc, fake(), nursery.cancel_scope)
        report = await request(host, "web", 1)
        assert "h1: no base image" in report.unplaced[0].reason, report
        # an image appears (vmmesh image build / import / fetch, from another process)
        src = root / "src"
        src.mkdir()
        (src / "disk.qcow2").write_bytes(fake_qcow2())
        (src / "vmlinuz").write_bytes(b"k" * 100)
        (src / "initrd.img").write_bytes(b"i" * 100)
        ImageStore(cfg.data_dir).add(
            src / "disk.qcow2",
            src / "vmlinuz",
            src / "initrd.img",
            cmdline="root=/dev/vda",
            packages=[],
            created=1.0,
        )
        await eventually(lambda: svc.mgr is not None, "the node takes up the image")
        status = await node.control_handlers.local(STATUS, _Ctx(), Empty())
        assert status.capacity.blocked == "" and status.capacity.free_slots > 0
        assert status.facts["VMs"] == "on"
        nursery.cancel_scope.cancel()
