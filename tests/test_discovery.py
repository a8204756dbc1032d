"""mDNS discovery: TXT parsing, seed parsing, the core's decisions, and real
zeroconf between network namespaces on a bridge."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.labutil import lab_context
from vmmesh.errors import MalformedMessage, UsageError
from vmmesh.lab import Lab
from vmmesh.mesh.discovery import (
    TXT_VERSION,
    DiscoveryCore,
    PeerGone,
    PeerSeen,
    gossiped_endpoint,
    instance_label,
    parse_seed,
    parse_txt,
    txt_properties,
)

ME = "aa" * 8
PEER = "bb" * 8
MESH = "cc" * 8
OTHER_MESH = "dd" * 8


def txt(node_id: str = PEER, mesh_id: str = MESH, **over: Any) -> dict[bytes, bytes | None]:
    """A TXT record as zeroconf hands it over: bytes keys and values."""
    props: dict[str, Any] = {
        **txt_properties(node_id=node_id, mesh_id=mesh_id, name="h2", port=7400),
        **over,
    }
    return {
        k.encode(): (v if isinstance(v, bytes) or v is None else str(v).encode())
        for k, v in props.items()
    }


def inst(node_id: str) -> str:
    return f"{instance_label(node_id)}._vmmesh._tcp.local."


# --- TXT ------------------------------------------------------------------


def test_txt_round_trip() -> None:
    a = parse_txt(txt())
    assert (a.version, a.node_id, a.mesh_id, a.name, a.port) == (
        TXT_VERSION,
        PEER,
        MESH,
        "h2",
        7400,
    )


@pytest.mark.parametrize(
    "over",
    [
        {"v": b"2"},
        {"v": b"x"},
        {"v": None},
        {"id": b"NOT-HEX"},
        {"id": b"../../etc"},
        {"mesh": b""},
        {"port": b"0"},
        {"port": b"65536"},
        {"port": b"-1"},
        {"port": b"7e3"},
        {"name": b""},
        {"name": b"x" * 64},
        {"name": b"a\nb"},
        {"name": b"\xff\xfe"},
    ],
)
def test_bad_txt_is_malformed(over: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessage):
        parse_txt(txt(**over))


def test_txt_missing_fields_and_bad_keys() -> None:
    with pytest.raises(MalformedMessage):
        parse_txt({})
    with pytest.raises(MalformedMessage):
        parse_txt({b"\xff": b"1", **txt()})
    with pytest.raises(MalformedMessage):
        parse_txt({**txt(), b"port": 7400})  # not bytes


def test_txt_properties_refuses_what_we_would_reject() -> None:
    with pytest.raises(MalformedMessage):
        txt_properties(node_id="XYZ", mesh_id=MESH, name="h", port=1)
    with pytest.raises(UsageError):
        txt_properties(node_id=ME, mesh_id=MESH, name="", port=1)
    with pytest.raises(UsageError):
        txt_properties(node_id=ME, mesh_id=MESH, name="h", port=70000)


def test_instance_label_fits_a_dns_label() -> None:
    assert len(instance_label("ab" * 32)) == 63
    assert instance_label(ME) == ME


# --- seeds ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "expected"),
    [
        ("10.0.0.1:7400", ("10.0.0.1", 7400)),
        ("host.lan:1", ("host.lan", 1)),
        (" 10.0.0.1:65535 ", ("10.0.0.1", 65535)),
        ("[::1]:7400", ("::1", 7400)),
        ("[fe80::1%eth0]:7400", ("fe80::1%eth0", 7400)),
    ],
)
def test_parse_seed(seed: str, expected: tuple[str, int]) -> None:
    assert parse_seed(seed) == expected


@pytest.mark.parametrize(
    ("addrs", "held", "expected"),
    [
        (("10.0.0.2:7400", "10.0.0.3:7400"), None, ("10.0.0.2", 7400)),  # the first, best
        (("10.0.0.2:7400",), "gossip", ("10.0.0.2", 7400)),  # gossip replaces gossip
        (("10.0.0.2:7400",), "mdns", None),  # never what was seen on the network
        (("10.0.0.2:7400",), "seed", None),
        (("10.0.0.2:7400",), "inbound", None),
        ((), None, None),
        (("no port",), None, None),  # a bad address is ignored, not an error
    ],
)
def test_gossiped_address_fills_in_only_what_gossip_may(
    addrs: tuple[str, ...], held: str | None, expected: tuple[str, int] | None
) -> None:
    assert gossiped_endpoint("ab" * 16, addrs, held) == expected


@pytest.mark.parametrize(
    ("seed", "message"),
    [
        ("10.0.0.1", "expected ADDR:PORT"),
        (":7400", "expected ADDR:PORT"),
        ("10.0.0.1:", "not a number"),
        ("10.0.0.1:http", "not a number"),
        ("10.0.0.1:0", "out of range"),
        ("10.0.0.1:70000", "out of range"),
        ("::1:7400", r"\[ADDR\]:PORT"),
        ("[::1]7400", "expected ADDR:PORT"),
        ("[::1", "expected ADDR:PORT"),
        ("[nothex]:7400", "not an IPv6 address"),
    ],
)
def test_bad_seed_is_usage_error(seed: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_seed(seed)


# --- the core ---------------------------------------------------------------


def test_core_reports_peer_of_our_mesh_and_its_goodbye() -> None:
    core = DiscoveryCore(node_id=ME, mesh_id=MESH)
    ev = core.service_added(inst(PEER), txt(), ["10.0.0.2", "fe80::1%eth0"], 7400)
    assert ev == PeerSeen(PEER, MESH, "h2", ("10.0.0.2", "fe80::1%eth0"), 7400)
    assert core.service_removed(inst(PEER)) == PeerGone(PEER)
    assert core.service_removed(inst(PEER)) is None


def test_core_ignores_itself_other_meshes_and_unknown_removals() -> None:
    core = DiscoveryCore(node_id=ME, mesh_id=MESH)
    assert core.service_added(inst(ME), txt(node_id=ME), ["10.0.0.1"], 7400) is None
    assert core.service_added(inst(PEER), txt(mesh_id=OTHER_MESH), ["10.0.0.2"], 7400) is None
    assert core.service_removed(inst(PEER)) is None
    assert core.service_removed("whatever._vmmesh._tcp.local.") is None


def test_core_peer_that_moves_to_another_mesh_is_gone() -> None:
    core = DiscoveryCore(node_id=ME, mesh_id=MESH)
    assert isinstance(core.service_added(inst(PEER), txt(), ["10.0.0.2"], 7400), PeerSeen)
    ev = core.service_added(inst(PEER), txt(mesh_id=OTHER_MESH), ["10.0.0.2"], 7400)
    assert ev == PeerGone(PEER)


@pytest.mark.parametrize(
    ("instance", "props", "addresses", "port"),
    [
        (inst(PEER), None, ["10.0.0.2"], 7400),  # no TXT
        (inst(ME), txt(), ["10.0.0.2"], 7400),  # label does not match TXT id
        (inst(PEER), txt(), ["10.0.0.2"], 7401),  # SRV port differs
        (inst(PEER), txt(), [], 7400),  # no address
        (inst(PEER), txt(), ["not-an-ip"], 7400),
        (inst(PEER), {b"v": b"1", b"id": b"\x00" * 300}, ["10.0.0.2"], 7400),
    ],
)
def test_core_ignores_garbage(
    instance: str, props: dict[bytes, bytes | None] | None, addresses: list[str], port: int
) -> None:
    core = DiscoveryCore(node_id=ME, mesh_id=MESH)
    assert core.service_added(instance, props, addresses, port) is None


def test_core_logs_a_bad_record_once(caplog: pytest.LogCaptureFixture) -> None:
    core = DiscoveryCore(node_id=ME, mesh_id=MESH)
    with caplog.at_level(logging.DEBUG, logger="vmmesh.mesh.discovery"):
        for _ in range(5):
            core.service_added(inst(PEER), txt(v=b"9"), ["10.0.0.2"], 7400)
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING] + [logging.DEBUG] * 4


# --- real zeroconf between namespaces --------------------------------------

# Runs in a lab namespace: advertises, browses, prints each event as a JSON
# line; stops (with a goodbye) when its stdin closes.
AGENT = textwrap.dedent(
    """
    import dataclasses, json, sys, time, trio
    from vmmesh.mesh.discovery import run_discovery

    async def main(node_id, mesh_id, name, address):
        send, recv = trio.open_memory_channel(1000)
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_discovery(
                node_id=node_id, mesh_id=mesh_id, name=name, port=7400,
                addresses=[address], events=send, task_status=task_status))
            print(json.dumps({"started": True, "t": time.monotonic()}), flush=True)

            async def forward():
                async for ev in recv:
                    d = {type(ev).__name__: dataclasses.asdict(ev), "t": time.monotonic()}
                    print(json.dumps(d), flush=True)

            nursery.start_soon(forward)
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()

    trio.run(main, *sys.argv[1:])
    """
)

# Advertises a broken `_vmmesh._tcp` record, as a confused device on the LAN might.
GARBAGE = textwrap.dedent(
    """
    import socket, sys
    from zeroconf import ServiceInfo, Zeroconf
    zc = Zeroconf(interfaces=[sys.argv[2]])
    zc.register_service(ServiceInfo(
        "_vmmesh._tcp.local.", "junk._vmmesh._tcp.local.", port=7400,
        properties={"v": "1", "id": "../../etc/passwd", "mesh": sys.argv[1]},
        addresses=[socket.inet_aton(sys.argv[2])], server="junk.local."))
    print('{"started": true}', flush=True)
    sys.stdin.read()
    zc.close()
    """
)


class Agent:
    """One discovery process in a lab host, with its event lines."""

    def __init__(self, proc: trio.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.events: list[dict[str, Any]] = []
        self._buf = b""

    async def next_line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while b"\n" not in self._buf:
            chunk = await self.proc.stdout.receive_some()
            if not chunk:
                raise EOFError(f"agent {self.name} exited: {await self.stderr()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        d: dict[str, Any] = json.loads(line)
        self.events.append(d)
        return d

    async def wait_for(self, kind: str, node_id: str) -> float:
        """Wait for an event about ``node_id``; returns when the agent saw it (monotonic)."""
        while True:
            for e in self.events:
                if e.get(kind, {}).get("node_id") == node_id:
                    return float(e["t"])
            await self.next_line()

    async def stderr(self) -> str:
        """What the agent wrote to stderr, once it has exited."""
        assert self.proc.stderr is not None
        chunks = []
        while chunk := await self.proc.stderr.receive_some():
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def seen_ids(self) -> set[str]:
        return {e["PeerSeen"]["node_id"] for e in self.events if "PeerSeen" in e}


@pytest.fixture
def lab3(tmp_path: Path) -> Any:
    with lab_context(tmp_path, 3) as lab:
        yield lab


async def start_agent(
    nursery: trio.Nursery, lab: Lab, i: int, node_id: str, mesh_id: str, *, script: str = AGENT
) -> Agent:
    """Start ``script`` in host ``i``; returns once it has registered its record."""
    if script is GARBAGE:
        args = [mesh_id, lab.host_address(i)]
    else:
        args = [node_id, mesh_id, f"h{i}", lab.host_address(i)]
    argv = ["ip", "netns", "exec", lab.host_netns(i), sys.executable, "-c", script, *args]
    proc: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            check=False,
            cwd=Path(__file__).parent.parent,
        )
    )
    agent = Agent(proc, f"h{i}")
    assert (await agent.next_line())["started"] is True
    return agent


@pytest.fixture
async def agents_nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        try:
            yield nursery
        finally:
            nursery.cancel_scope.cancel()  # run_process kills its process on cancel


async def test_discovery_between_namespaces(lab3: Lab, agents_nursery: trio.Nursery) -> None:
    a_id, b_id, c_id = "a1" * 8, "b2" * 8, "c3" * 8
    with trio.fail_after(60):  # a hang guard, not a performance assertion
        c = await start_agent(agents_nursery, lab3, 3, c_id, OTHER_MESH)
        await start_agent(agents_nursery, lab3, 3, "", MESH, script=GARBAGE)
        a = await start_agent(agents_nursery, lab3, 1, a_id, MESH)
        b = await start_agent(agents_nursery, lab3, 2, b_id, MESH)
        b_registered = float(b.events[0]["t"])
        a_saw_b = await a.wait_for("PeerSeen", b_id) - b_registered
        b_saw_a = await b.wait_for("PeerSeen", a_id) - b_registered
        print(f"\nrelative to b's registration: a saw b {a_saw_b:+.3f} s, b saw a {b_saw_a:+.3f} s")
        seen_b = next(e["PeerSeen"] for e in b.events if "PeerSeen" in e)
        assert seen_b == {
            "node_id": a_id,
            "mesh_id": MESH,
            "name": "h1",
            "addresses": [lab3.host_address(1)],
            "port": 7400,
        }
        # b withdraws with a goodbye: a hears it without waiting for a TTL.
        assert b.proc.stdin is not None
        await b.proc.stdin.aclose()
        t0 = time.monotonic()
        gone = await a.wait_for("PeerGone", b_id) - t0
        print(f"goodbye from b reached a {gone:.3f} s after b's stdin closed")
        assert await b.proc.wait() == 0  # unregistered and closed zeroconf cleanly
        assert c_id not in a.seen_ids() | b.seen_ids()
        assert c.seen_ids() == set()
        # The junk record reached a several times (announcements, answers): one warning.
        assert a.proc.stdin is not None
        await a.proc.stdin.aclose()
        assert await a.proc.wait() == 0
        assert (await a.stderr()).count("refused discovery from mDNS record 'junk") == 1


async def test_duplicate_node_id_is_refused(lab3: Lab, agents_nursery: trio.Nursery) -> None:
    with trio.fail_after(60):  # a hang guard, not a performance assertion
        await start_agent(agents_nursery, lab3, 1, "a1" * 8, MESH)
        with pytest.raises(EOFError, match="UsageError: another host on the LAN advertises"):
            await start_agent(agents_nursery, lab3, 2, "a1" * 8, MESH)
