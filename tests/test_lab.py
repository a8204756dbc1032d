"""The lab: namespaces on a bridge made and removed without leftovers."""

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

from tests.labutil import lab_context, skip_unless_lab, unique_tag
from vmmesh.errors import StateError, UsageError
from vmmesh.lab import (
    LAB_FILE,
    Lab,
    default_subnet,
    lab_down,
    lab_status,
    lab_up,
    load_lab,
    names,
)


def leftovers(tag: str) -> list[str]:
    """Namespaces and links named after ``tag`` that still exist."""
    bridge, ns_prefix, veth_prefix = names(tag)
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    found = [ln.split()[0] for ln in ns.splitlines() if ln.startswith(ns_prefix)]
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name == bridge or name.startswith(veth_prefix):
            found.append(name)
    return found


# --- pure -----------------------------------------------------------------


def test_names_fit_interface_limit() -> None:
    bridge, ns_prefix, veth_prefix = names("abcdefgh")
    assert len(bridge) <= 15
    assert len(f"{veth_prefix}253") <= 15
    assert ns_prefix == "vmmesh-abcdefgh-"


@pytest.mark.parametrize("tag", ["", "ABC", "a-b", "abcdefghi", "x y"])
def test_bad_tag_is_usage_error(tag: str) -> None:
    with pytest.raises(UsageError, match="lab tag"):
        names(tag)


def test_default_subnet_is_stable_and_in_range() -> None:
    assert default_subnet("lab") == default_subnet("lab")
    assert all(1 <= default_subnet(f"t{i}") <= 250 for i in range(200))


def test_load_lab_missing_is_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError):
        load_lab(tmp_path)
    assert lab_down(tmp_path) == []


# --- root: real namespaces --------------------------------------------------


@pytest.fixture
def lab3(tmp_path: Path) -> Iterator[Lab]:
    with lab_context(tmp_path, 3) as lab:
        yield lab


def test_lab_up_makes_hosts_on_a_bridge(lab3: Lab) -> None:
    assert [h.index for h in lab3.hosts] == [1, 2, 3]
    assert load_lab(lab3.lab_dir) == lab3
    assert sorted(leftovers(lab3.tag)) == sorted(
        [lab3.bridge, *(h.netns for h in lab3.hosts), *(h.veth for h in lab3.hosts)]
    )
    out = lab3.lab_exec(2, ["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
    assert f"{lab3.host_address(2)}/24" in out
    lo = lab3.lab_exec(2, ["ip", "-o", "link", "show", "dev", "lo"]).stdout
    assert "UP" in lo
    assert lab3.host_data_dir(3).is_dir()
    status = lab_status(lab3.lab_dir)
    assert [s["netns_present"] for s in status] == [True] * 3
    assert [s["node_running"] for s in status] == [False] * 3


def test_lab_hosts_reach_each_other_and_the_bridge(lab3: Lab) -> None:
    """UDP from h1 to h3 and to the bridge address (what the host serves from)."""
    recv = textwrap.dedent(
        """
        import socket, sys
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((sys.argv[1], 9999))
        print("bound", flush=True)
        print(s.recvfrom(100)[0].decode(), flush=True)
        """
    )
    send = "import socket,sys; socket.socket(2,2).sendto(b'hi', (sys.argv[1], 9999))"
    for target, prefix in ((lab3.host_address(3), ["ip", "netns", "exec", lab3.hosts[2].netns]),
                           (lab3.bridge_address, [])):  # fmt: skip
        with subprocess.Popen(
            [*prefix, sys.executable, "-c", recv, target], stdout=subprocess.PIPE, text=True
        ) as p:
            try:
                assert p.stdout is not None
                assert p.stdout.readline().strip() == "bound"
                lab3.lab_exec(1, [sys.executable, "-c", send, target])
                assert p.stdout.readline().strip() == "hi"
            finally:
                p.kill()


@pytest.mark.lab
def test_lab_down_removes_everything(tmp_path: Path) -> None:
    with lab_context(tmp_path, 2) as lab:
        tag, lab_dir = lab.tag, Path(lab.lab_dir)
        assert leftovers(tag)
        removed = lab_down(lab_dir)
        assert leftovers(tag) == []
        assert not (lab_dir / LAB_FILE).exists()
        assert any(r.startswith("netns") for r in removed)
        assert lab_down(lab_dir, tag=tag) == []  # idempotent


@pytest.mark.lab
def test_lab_down_by_tag_without_lab_json(tmp_path: Path) -> None:
    with lab_context(tmp_path, 2) as lab:
        (Path(lab.lab_dir) / LAB_FILE).unlink()
        lab_down(lab.lab_dir, tag=lab.tag)
        assert leftovers(lab.tag) == []


@pytest.mark.lab
def test_lab_down_after_lab_process_was_killed(tmp_path: Path) -> None:
    """lab_up's process dies with a process running in a namespace; lab_down cleans up."""
    skip_unless_lab()
    tag = unique_tag()
    lab_dir = tmp_path / "lab"
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        from pathlib import Path
        from vmmesh.lab import lab_up
        lab = lab_up(2, Path(sys.argv[1]), tag=sys.argv[2], start_nodes=False)
        p = subprocess.Popen(["ip", "netns", "exec", lab.hosts[1].netns, "sleep", "1000"],
                             start_new_session=True)
        print(p.pid, flush=True)
        time.sleep(1000)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(lab_dir), tag],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert proc.stdout is not None
        sleeper = int(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert leftovers(tag)
        assert json.loads((lab_dir / LAB_FILE).read_text())["tag"] == tag
        lab_down(lab_dir)
        assert leftovers(tag) == []
        for _ in range(100):  # the sleeper was reparented to init, which reaps it
            if not os.path.exists(f"/proc/{sleeper}"):
                break
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{sleeper}")
    finally:
        proc.kill()
        proc.wait()
        lab_down(lab_dir, tag=tag)


def test_lab_up_refuses_a_second_lab_in_the_same_dir(lab3: Lab) -> None:
    with pytest.raises(UsageError, match="exists"):
        lab_up(1, lab3.lab_dir, tag=lab3.tag)


# --- nodes, with a stand-in for the CLI -------------------------------------

# Implements the part of the `vmmesh` contract the lab uses: init, invite, join,
# node (serves DATA/node.sock until SIGTERM) and status (0 once node.sock answers).
FAKE_CLI = textwrap.dedent(
    """
    import json, os, signal, socket, sys, time
    cmd, _, data, *rest = sys.argv[1:]
    os.makedirs(data, exist_ok=True)
    def note(line):
        with open(os.path.join(data, "calls"), "a") as f:
            f.write(line + "\\n")
    note(" ".join([cmd, *rest]))
    if cmd == "invite":
        print(json.dumps({"token": "tok-" + str(time.monotonic_ns())}))
    elif cmd == "status":
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(os.path.join(data, "node.sock"))
        except OSError:
            sys.exit(1)
    elif cmd == "node":
        path = os.path.join(data, "node.sock")
        if os.path.exists(path):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.listen()
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        while True:
            s.accept()[0].close()
    """
)


@pytest.fixture
def fake_lab(tmp_path: Path) -> Iterator[Lab]:
    cli = tmp_path / "fake_vmmesh.py"
    cli.write_text(FAKE_CLI)
    with lab_context(tmp_path, 3, start_nodes=True, node_args=["--x", "1"],
                     cli_argv=[sys.executable, str(cli)]) as lab:  # fmt: skip
        yield lab


def calls(lab: Lab, i: int) -> list[str]:
    return (lab.host_data_dir(i) / "calls").read_text().splitlines()


def test_lab_joins_hosts_through_the_cli(fake_lab: Lab) -> None:
    lab = fake_lab
    # `status` polls run beside the starting node and may be noted before it.
    c1 = [c for c in calls(lab, 1) if not c.startswith("status")]
    assert c1[0] == "init --name h1"
    assert c1[1] == f"node --listen {lab.host_address(1)} --port 7400 --x 1"
    assert c1.count("invite --json") == 2
    c2 = [c for c in calls(lab, 2) if not c.startswith("status")]
    assert c2[0].startswith("join tok-") and c2[0].endswith(" --name h2")
    assert c2[1] == f"node --listen {lab.host_address(2)} --port 7400 --x 1"
    assert all(s["node_running"] for s in lab_status(lab.lab_dir))


def test_kill_and_restart_host(fake_lab: Lab) -> None:
    lab = fake_lab
    old = lab.host(2)
    lab.kill_host(2, signal.SIGKILL)
    for _ in range(200):  # SIGKILL is asynchronous; a zombie already counts as stopped
        if not lab_status(lab.lab_dir)[1]["node_running"]:
            break
        time.sleep(0.02)
    assert [s["node_running"] for s in lab_status(lab.lab_dir)] == [True, False, True]
    lab = lab.restart_host(2)
    assert lab.host(2).pid != old.pid
    assert load_lab(lab.lab_dir).host(2).pid == lab.host(2).pid
    assert all(s["node_running"] for s in lab_status(lab.lab_dir))
    assert (lab.host_data_dir(2) / "node.log").exists()


def test_lab_down_stops_nodes(fake_lab: Lab) -> None:
    pids = [h.pid for h in fake_lab.hosts]
    lab_down(fake_lab.lab_dir)
    assert leftovers(fake_lab.tag) == []
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)


# --- a full lab with nodes (needs `vmmesh node`) ----------------------------


def _node_available() -> bool:
    root = Path(__file__).parent.parent
    return (root / "vmmesh" / "node.py").exists() and (root / "cli" / "__main__.py").exists()


@pytest.mark.lab
@pytest.mark.skipif(not _node_available(), reason="`vmmesh node` is not written yet")
def test_full_lab_of_three_forms_a_mesh(tmp_path: Path) -> None:
    """init/invite/join through the real CLI; every host sees the others up,
    a killed host is marked down, and comes back after a restart."""

    def statuses(lab: Lab, i: int) -> dict[str, str]:
        out = lab.cli(i, "peers", "--json", check=False).stdout
        try:
            hosts = json.loads(out)["hosts"]
        except (ValueError, KeyError, TypeError):
            return {}
        return {str(h.get("name")): str(h.get("status")) for h in hosts if isinstance(h, dict)}

    def wait_until(lab: Lab, i: int, want: dict[str, str]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for _ in range(150):  # each try is one CLI run; bounded so that a broken mesh fails
            seen = statuses(lab, i)
            if want.items() <= seen.items():
                break
            time.sleep(0.2)
        return seen

    with lab_context(tmp_path, 3, start_nodes=True) as lab0:
        lab = lab0
        assert all(s["node_running"] for s in lab_status(lab.lab_dir))
        everyone = {"h1": "up", "h2": "up", "h3": "up"}
        for i in (1, 2, 3):
            assert everyone.items() <= wait_until(lab, i, everyone).items()
        lab.kill_host(2, signal.SIGKILL)
        assert wait_until(lab, 1, {"h2": "down"}).get("h2") == "down"
        lab = lab.restart_host(2)
        assert wait_until(lab, 3, {"h2": "up"}).get("h2") == "up"


@pytest.mark.lab
def test_lab_up_refuses_stale_host_state(tmp_path: Path) -> None:
    skip_unless_lab()
    (tmp_path / "hosts" / "h1").mkdir(parents=True)
    (tmp_path / "hosts" / "h1" / "node.key").write_text("old")
    tag = unique_tag()
    try:
        with pytest.raises(UsageError, match="previous host"):
            lab_up(1, tmp_path, tag=tag)
        assert leftovers(tag) == []
    finally:
        lab_down(tmp_path, tag=tag)
