"""Keep-alive VMs between lab hosts: real nodes (namespaces, mDNS, mutual TLS), real
QEMU guests (TCG), real kills and a real cut link.

One lab of three hosts (a mesh of three votes: the side of two has the quorum)
serves the module.  The VMs have no packages: recovered ones resume the base
image's warm state on their new host.  Only the restart on the same host boots
cold (from the VM's own disk, as it must).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.labutil import lab_context
from tests.meshutil import all_up, base_warm, cli_json, eventually, failed, peers
from vmmesh.lab import Lab

BASE_DIR = Path(os.environ.get("VMMESH_BASE_IMAGE_DIR", "/var/cache/vmmesh-dev/base"))

pytestmark = [
    pytest.mark.lab,
    pytest.mark.qemu,
    pytest.mark.skipif(
        not (BASE_DIR / "manifest.json").is_file(),
        reason=f"needs a base image in {BASE_DIR}",
    ),
]

PATIENCE = 600.0
HOSTS = (1, 2, 3)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("kalab")
    with lab_context(base, 3, start_nodes=True, node_args=["--accel=tcg"], image=BASE_DIR) as lab:
        for i in HOSTS:
            eventually(all_up, f"h{i} sees three hosts up", lab, i, 3)
        for i in HOSTS:
            eventually(base_warm, f"h{i} has its base image's warm state", lab, i,
                       patience=PATIENCE)  # fmt: skip
        yield lab


@pytest.fixture(autouse=True)
def node_logs_if_failed(request: pytest.FixtureRequest, lab: Lab) -> Iterator[None]:
    yield
    if failed(request):
        for i in HOSTS:
            log = Path(lab.host(i).data_dir) / "node.log"
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            print(f"--- h{i} node.log (last 60 lines)", *lines[-60:], sep="\n")


def _run(lab: Lab, i: int, cmd: str, *args: str) -> Any:
    argv = [*lab.vmmesh_argv(), cmd, "--data-dir", str(lab.host_data_dir(i)), "--json", *args]
    r = lab.lab_exec(i, argv, check=False, timeout=PATIENCE)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _rows(lab: Lab, viewer: int, vm: str) -> list[dict[str, Any]]:
    return [v for v in cli_json(lab, viewer, "vms")["vms"] if v["name"] == vm]


def _host_of(lab: Lab, viewer: int, vm: str) -> int:
    [row] = _rows(lab, viewer, vm)
    assert row["state"] == "running", row
    return int(row["host"][1:])


def _qemu_pid(lab: Lab, i: int, vm_id: str) -> int:
    return int((lab.host_data_dir(i) / "run" / vm_id / "qemu.pid").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _gossiped(lab: Lab, viewer: int, host: int, vm: str) -> bool:
    """``viewer`` has heard through gossip that ``host`` runs ``vm`` (and so its list of
    keep-alive VMs, published before it): a host that dies sooner takes the VM with it."""
    return vm in peers(lab, viewer)[f"h{host}"]["vms"]


def _running_once_elsewhere(lab: Lab, viewer: int, vm: str, not_on: int) -> dict[str, Any] | None:
    rows = _rows(lab, viewer, vm)
    running = [r for r in rows if r["state"] == "running"]
    if len(running) == 1 and running[0]["host"] != f"h{not_on}":
        return running[0]
    return None


def test_a_keep_alive_vm_whose_qemu_is_killed_runs_again_on_its_host(lab: Lab) -> None:
    _run(lab, 1, "request", "karestart", "1", "--keep-alive")
    host = _host_of(lab, 1, "karestart-1")
    [row] = _rows(lab, 1, "karestart-1")
    assert row["lineage"]["keep_alive"] is True and row["lineage"]["generation"] == 1
    os.kill(_qemu_pid(lab, host, row["vm_id"]), signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        rows = _rows(lab, 1, "karestart-1")
        return rows[0] if rows and rows[0]["start"] == "restart" else None

    again = eventually(restarted, "the VM runs again", patience=PATIENCE)
    assert (again["host"], again["state"]) == (f"h{host}", "running")
    assert again["lineage"]["generation"] == 1  # the same VM, from its own disk
    assert again["lineage"]["origin"].startswith("restarted here: QEMU was killed by signal 9")
    _run(lab, 1, "shutdown", "karestart")


def test_a_dead_hosts_keep_alive_vm_comes_back_elsewhere_and_never_twice(lab: Lab) -> None:
    _run(lab, 1, "request", "kadead", "1", "--keep-alive")
    dead = _host_of(lab, 1, "kadead-1")
    [row] = _rows(lab, 1, "kadead-1")
    pid = _qemu_pid(lab, dead, row["vm_id"])
    viewer = 1 if dead != 1 else 2
    for i in HOSTS:
        if i != dead:
            eventually(_gossiped, f"h{i} heard of kadead-1", lab, i, dead, "kadead-1")
    killed = time.monotonic()
    lab.kill_host(dead)  # the node ...
    os.kill(pid, signal.SIGKILL)  # ... and its QEMU
    try:
        back = eventually(_running_once_elsewhere, "the VM runs on another host", lab, viewer,
                          "kadead-1", dead, patience=PATIENCE)  # fmt: skip
        print(f"host death to the VM running elsewhere: {time.monotonic() - killed:.1f} s")
        assert back["lineage"]["generation"] == 2
        assert back["lineage"]["origin"] == f"recovered from h{dead}, which went down"
    finally:
        lab.start_host(dead)  # restarted, it must not run its old copy (nor leave the lab short)
    eventually(all_up, f"h{dead} is back", lab, viewer, 3)

    def old_copy_gone() -> bool:
        rows = _rows(lab, dead, "kadead-1")
        return len(rows) == 1 and rows[0]["host"] == back["host"]

    eventually(old_copy_gone, f"h{dead} deleted its old copy", patience=PATIENCE)
    assert not list((lab.host_data_dir(dead) / "vms").glob(f"{row['vm_id']}*"))
    _run(lab, 1, "shutdown", "kadead")


def test_a_cut_off_host_fences_and_the_majority_brings_the_vm_back_once(lab: Lab) -> None:
    _run(lab, 1, "request", "kacut", "1", "--keep-alive")
    cut = _host_of(lab, 1, "kacut-1")
    [row] = _rows(lab, 1, "kacut-1")
    pid = _qemu_pid(lab, cut, row["vm_id"])
    viewer = 1 if cut != 1 else 2
    for i in HOSTS:
        if i != cut:
            eventually(_gossiped, f"h{i} heard of kacut-1", lab, i, cut, "kacut-1")
    veth = lab.host(cut).veth
    subprocess.run(["ip", "link", "set", veth, "down"], check=True)
    try:
        eventually(lambda: not _alive(pid), f"h{cut} fenced its copy", patience=PATIENCE)
        back = eventually(_running_once_elsewhere, "the VM runs on the majority side", lab,
                          viewer, "kacut-1", cut, patience=PATIENCE)  # fmt: skip
        assert back["lineage"]["generation"] == 2
    finally:
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
    eventually(all_up, f"h{cut} is back", lab, viewer, 3, patience=PATIENCE)

    def once() -> bool:
        everywhere = [_rows(lab, i, "kacut-1") for i in HOSTS]
        return all(len(rows) == 1 and rows[0]["host"] == back["host"] for rows in everywhere)

    eventually(once, "every host sees exactly one copy", patience=PATIENCE)
    _run(lab, 1, "shutdown", "kacut")
