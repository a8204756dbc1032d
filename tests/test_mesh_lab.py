"""The mesh through real node processes: lab hosts in network namespaces,
real mDNS, mutual TLS between nodes, the CLI over the control socket.

Every test runs twice, once per gossip protocol (``gossip = "scuttlebutt"``, the
default, and ``"swim"``): discovery, state spreading, refusals, a killed host
marked down and back, revocation must not depend on which one carries them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.labutil import lab_context
from tests.meshutil import all_up, cli_json, eventually, field_is, peers
from vmmesh.lab import Lab

pytestmark = pytest.mark.lab


WINDOW = 20.0  # seconds of a quiet mesh whose bytes on the wire are counted


@pytest.fixture(scope="module", params=["scuttlebutt", "swim"])
def lab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Lab]:
    env = {"VMMESH_GOSSIP": request.param}
    with lab_context(tmp_path_factory.mktemp("mesh"), 3, start_nodes=True, env=env) as made:
        yield made


def _tx_bytes(lab: Lab, i: int) -> int:
    """Bytes host ``i`` has sent on its link (its end of the lab veth)."""
    out = subprocess.run(
        ["ip", "-n", lab.host(i).netns, "-j", "-s", "link", "show", "dev", "eth0"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


def test_hosts_find_each_other_by_mdns(lab: Lab) -> None:
    for i in (1, 2, 3):
        eventually(all_up, f"h{i} sees all three hosts up", lab, i)
    view = peers(lab, 1)
    assert view["h2"]["address"].startswith(lab.host_address(2))
    # Discovery was by mDNS: no --peer seeds were given to any node.
    assert not any("--peer" in a for a in lab.node_args)
    status = cli_json(lab, 2, "status")
    assert status["peers_up"] == 2 and status["mesh_id"] == cli_json(lab, 1, "status")["mesh_id"]


def test_a_quiet_mesh_costs_so_many_bytes_per_second_on_the_wire(lab: Lab) -> None:
    """What each host sends while nothing happens, counted on its real link (TLS,
    framing, RPC and mDNS included), beside what its node counts as gossip."""
    for i in (1, 2, 3):
        eventually(all_up, f"h{i} sees all three hosts up", lab, i)
    proto = lab.env.get("VMMESH_GOSSIP", "scuttlebutt")
    before = [_tx_bytes(lab, i) for i in (1, 2, 3)]
    started = time.monotonic()
    time.sleep(WINDOW)
    seconds = time.monotonic() - started
    rates = [(_tx_bytes(lab, i) - b) / seconds for i, b in zip((1, 2, 3), before, strict=True)]
    print(f"{proto}, quiet mesh of 3: bytes/s sent per host on the wire:",
          [round(r) for r in rates])  # fmt: skip
    assert all(r > 0 for r in rates)


def test_capacity_change_spreads_by_gossip(lab: Lab) -> None:
    cfg = lab.host_data_dir(2) / "config.toml"
    cfg.write_text("storage_quota_mb = 1234\n")
    try:
        lab.kill_host(2, signal.SIGHUP)
        for i in (1, 3):
            eventually(
                field_is,
                f"h{i} learns h2's new storage quota",
                lab,
                i,
                "h2",
                ("capacity", "storage_quota_mb"),
                1234,
            )
    finally:
        cfg.unlink()
        lab.kill_host(2, signal.SIGHUP)


def test_garbage_from_a_peer_is_refused_and_logged_once(lab: Lab) -> None:
    """A host speaking garbage on a verified TLS link loses that link only."""
    script = textwrap.dedent(
        f"""
        import trio
        from pathlib import Path
        from vmmesh.mesh.pki import load_identity
        from vmmesh.net.tls import open_peer

        async def main():
            ident = load_identity(Path({str(lab.host_data_dir(2) / "pki")!r}))
            for payload in (
                b"\\xff" * 64, b"\\x7f\\xff\\xff\\xff", b"\\x00\\x00\\x00\\x01\\xc1", b"\\xff" * 8
            ):
                stream = await open_peer({lab.host_address(1)!r}, {lab.port}, ident)
                await stream.send_all(payload)
                with trio.move_on_after(5):
                    try:
                        while await stream.receive_some(65536):
                            pass
                    except trio.BrokenResourceError:
                        pass
                print("closed")

        trio.run(main)
        """
    )
    out = lab.lab_exec(2, [sys.executable, "-c", script]).stdout
    assert out.count("closed") == 4
    # h1 keeps serving: its CLI answers and it still sees everyone up.
    eventually(all_up, "h1 still sees all hosts up after garbage", lab, 1)
    # Each kind of fault is logged once at WARNING for that peer, with its reason
    # (three oversized frames are one kind, bad msgpack another), and counted.
    log = (lab.host_data_dir(1) / "node.log").read_text().splitlines()
    warned = [line for line in log if "WARNING" in line and "refused framing from" in line]
    assert len(warned) == 2, warned
    assert any("is over" in line for line in warned) and any("msgpack" in line for line in warned)
    assert cli_json(lab, 1, "status")["refusals"]["framing"] == 4


def test_killed_host_is_marked_down_then_comes_back(lab: Lab) -> None:
    node_id = cli_json(lab, 3, "status")["node_id"]
    lab.kill_host(3, signal.SIGKILL)
    killed = time.monotonic()
    for i in (1, 2):
        eventually(field_is, f"h{i} marks h3 down", lab, i, "h3", ("status",), "down")
    print(f"h3 marked down by all peers after {time.monotonic() - killed:.1f} s")
    lab2 = lab.start_host(3)
    assert cli_json(lab2, 3, "status")["node_id"] == node_id
    for i in (1, 2):
        eventually(field_is, f"h{i} sees h3 back up", lab2, i, "h3", ("status",), "up")


def test_join_token_works_once_and_expires(lab: Lab, tmp_path: Path) -> None:
    token = cli_json(lab, 1, "invite")["token"]
    first = lab.cli(2, "join", token, "--data-dir", str(tmp_path / "a"), "--name", "extra1")
    assert first.returncode == 0
    again = lab.cli(
        2, "join", token, "--data-dir", str(tmp_path / "b"), "--name", "extra2", check=False
    )
    assert again.returncode == 1
    assert again.stderr.strip() == "vmmesh: error: join token already used"
    assert not (tmp_path / "b" / "pki").exists()
    short = cli_json(lab, 1, "invite", "--ttl", "1")["token"]
    time.sleep(1.5)
    late = lab.cli(
        2, "join", short, "--data-dir", str(tmp_path / "c"), "--name", "extra3", check=False
    )
    assert late.returncode == 1 and "join token expired" in late.stderr
    bad = lab.cli(2, "join", "vmm1-garbage", "--data-dir", str(tmp_path / "d"), check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("vmmesh: error:")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_removed_host_is_refused_by_every_peer(lab: Lab) -> None:
    removed = lab.cli(1, "remove", "h3", "--json")
    h3_id = json.loads(removed.stdout)["node_id"]
    # The CRL travels by gossip to h2.
    crl = cli_json(lab, 1, "status")["crl_number"]
    eventually(lambda: cli_json(lab, 2, "status")["crl_number"] >= crl, "h2 installs the new CRL")
    eventually(lambda: "h3" not in peers(lab, 2), "h2 drops h3 from its view")
    # h3's certificate is now refused in the TLS handshake.
    script = textwrap.dedent(
        f"""
        import trio, sys
        from pathlib import Path
        from vmmesh.errors import AuthError, PeerUnavailable
        from vmmesh.mesh.pki import load_identity
        from vmmesh.net.tls import open_peer

        async def main():
            ident = load_identity(Path({str(lab.host_data_dir(3) / "pki")!r}))
            try:
                s = await open_peer({lab.host_address(2)!r}, {lab.port}, ident)
                await s.send_all(b"\\x00\\x00\\x00\\x01\\x90")
                await s.receive_some(10)
                print("accepted")
            except (AuthError, PeerUnavailable, trio.BrokenResourceError) as exc:
                print("refused", exc)

        trio.run(main)
        """
    )
    out = lab.lab_exec(3, [sys.executable, "-c", script]).stdout
    assert out.startswith("refused"), out
    assert h3_id not in {h["node_id"] for h in cli_json(lab, 1, "peers")["hosts"]}


def test_bad_input_gets_one_line_errors(lab: Lab) -> None:
    env = {**os.environ}
    for args, code in (
        (["request", "x", "0"], 2),
        (["request", "bad name!", "1"], 2),
        (["request", "x", "1", "Bad_Pkg"], 2),
        (["remove", "nosuchhost"], 1),
        (["frobnicate"], 2),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "vmmesh_cli", "--data-dir", str(lab.host_data_dir(1)), *args],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        assert r.returncode == code, (args, r.stderr)
        assert r.stderr.startswith("vmmesh: error:"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert "Traceback" not in r.stderr
