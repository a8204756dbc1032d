"""VMs across the mesh through real nodes: lab hosts (network namespaces,
mDNS, mutual TLS between node processes) running real QEMU guests (TCG)
that install packages from a local apt repository served on the lab bridge.

Each host offers two VM slots (a memory reserve that leaves room for two guests of
512 MB), so the placement across hosts is visible with a handful of small guests.
Slots are limited by memory, not by a tight storage quota: a quota would also drop
the hosts' warm states, and their guests would boot cold.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.aptrepo import AptRepo
from tests.labutil import lab_context
from tests.meshutil import all_up, base_warm, cli_json, eventually, failed, field_is, peers
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

PATIENCE = 900.0  # a template build under TCG on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("vmlab")
    port = _free_port()
    holder: dict[str, Any] = {}
    node_args = [
        "--accel=tcg",
        # The bridge address is known only once the lab exists; the repo is
        # started right after, before any request is made.
        f"--apt-source=deb [trusted=yes] http://BRIDGE:{port}/ ./",
    ]
    with lab_context(base, 3, start_nodes=False, node_args=node_args, image=BASE_DIR) as lab:
        for i in (1, 2, 3):
            _write_slots(lab, i, SLOTS_EACH)
        fixed = [a.replace("BRIDGE", lab.bridge_address) for a in node_args]
        running = lab.with_node_args(fixed).start_all()
        repo = AptRepo(base / "aptrepo", host=running.bridge_address, port=port)
        repo.start()
        holder["repo"] = repo
        try:
            for i in (1, 2, 3):
                eventually(all_up, f"h{i} sees three hosts up", running, i)
            # Builds resume the base image's warm state: have it before the tests.
            for i in (1, 2, 3):
                eventually(base_warm, f"h{i} has its base image's warm state", running, i,
                           patience=PATIENCE)  # fmt: skip
            yield running
        finally:
            repo.stop()


@pytest.fixture(autouse=True)
def node_logs_if_failed(request: pytest.FixtureRequest, mesh: Lab) -> Iterator[None]:
    """A failed test shows what the nodes logged (the lab is gone after the module)."""
    yield
    if failed(request):
        for i in (1, 2, 3):
            log = Path(mesh.host(i).data_dir) / "node.log"
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            print(f"--- h{i} node.log (last 40 lines)", *lines[-40:], sep="\n")


def _request(lab: Lab, i: int, *args: str) -> dict[str, Any]:
    argv = [*lab.vmmesh_argv(), "request", "--data-dir", str(lab.host_data_dir(i)), *args]
    r = lab.lab_exec(i, [*argv, "--json"], check=False, timeout=PATIENCE)
    assert r.stdout, r.stderr
    reply: dict[str, Any] = json.loads(r.stdout)
    return reply


def _vms(lab: Lab, i: int, name: str) -> list[dict[str, Any]]:
    return [v for v in cli_json(lab, i, "vms")["vms"] if v["request"] == name]


def _overlays(lab: Lab) -> list[Path]:
    return [p for i in (1, 2, 3) for p in (lab.host_data_dir(i) / "vms").glob("*.qcow2")]


SLOTS_EACH = 2
VM_MEMORY_MB = 512  # the default guest


def _mem_total_mb() -> int:
    """MemTotal, as the nodes (on this machine) read it."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("/proc/meminfo has no MemTotal")


def _write_slots(lab: Lab, i: int, slots: int) -> None:
    """Room for ``slots`` guests, by memory, in the host's config file (a flag would
    win over it)."""
    reserve = _mem_total_mb() - slots * VM_MEMORY_MB
    text = f"memory_reserve_mb = {reserve}\nvm_memory_mb = {VM_MEMORY_MB}\n"
    (lab.host_data_dir(i) / "config.toml").write_text(text)


def _set_slots(lab: Lab, i: int, slots: int = SLOTS_EACH) -> None:
    _write_slots(lab, i, slots)
    lab.kill_host(i, signal.SIGHUP)


SLOTS = ("capacity", "free_slots")


def _has_template(lab: Lab, viewer: int, host: str, packages: list[str]) -> bool:
    return any(t["packages"] == packages for t in peers(lab, viewer)[host]["templates"])


def _working(data_dir: Path) -> bool:
    """The host has begun a template build or a VM disk."""
    building = any(p.name.startswith(".building") for p in (data_dir / "templates").glob("*"))
    return building or any((data_dir / "vms").glob("*.qcow2"))


def test_request_prefers_the_host_with_the_template(mesh: Lab, tmp_path: Path) -> None:
    lab = mesh
    # Make the template {vmm-test-a} exist on h2 only: h1 and h3 take no VMs.
    for i in (1, 3):
        _set_slots(lab, i, 0)
    for i in (1, 3):
        eventually(field_is, f"h2 sees h{i} full", lab, 2, f"h{i}", SLOTS, 0)
    seed = _request(lab, 2, "seed", "1", "vmm-test-a")
    assert [v["host"] for v in seed["vms"]] == ["h2"], seed
    assert lab.cli(2, "shutdown", "seed").returncode == 0
    for i in (1, 3):
        _set_slots(lab, i)
    for host in ("h1", "h2", "h3"):
        eventually(field_is, f"h1 sees {host} with two free slots", lab, 1, host, SLOTS, 2)
    eventually(_has_template, "h1 learns h2's template", lab, 1, "h2", ["vmm-test-a"])

    # From h1: 3 VMs with vmm-test-a. h2 (exact match) first, up to its two
    # slots, the third spills to the next host by affinity.
    reply = _request(lab, 1, "web", "3", "vmm-test-a")
    hosts = sorted(v["host"] for v in reply["vms"])
    assert len(hosts) == 3 and hosts.count("h2") == 2, reply
    assert reply["plan"][0]["host"] == "h2", reply["plan"]
    on_h2 = [v for v in reply["vms"] if v["host"] == "h2"]
    assert not any(v["built"] for v in on_h2), "h2 reused its template"
    listed = _vms(lab, 3, "web")
    assert sorted(v["host"] for v in listed) == hosts
    assert all(v["packages"] == ["vmm-test-a"] for v in listed)
    # exec reaches a VM wherever it runs.
    out = lab.cli(3, "exec", on_h2[0]["name"], "--", "cat", "/usr/share/vmm-test-a/marker")
    assert "vmm-test-a" in out.stdout

    # So does ssh, from h3 across the lab bridge, the guest's own host key pinned.
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    target = on_h2[0]["name"]
    access = cli_json(lab, 3, "ssh", target, "-i", str(key))
    assert (access["host"], access["vm"], access["user"]) == ("h2", target, "root"), access
    assert access["address"] == lab.host(2).address and access["port"] > 0
    out = lab.lab_exec(
        3,
        [
            *lab.vmmesh_argv(),
            "ssh",
            "--data-dir",
            lab.host(3).data_dir,
            target,
            "-i",
            str(key),
            "--",
            "cat /usr/share/vmm-test-a/marker; id -un; hostname",
        ],
        check=False,
        timeout=PATIENCE,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["vmm-test-a", "root", target], out.stdout


def test_shutdown_by_name_from_a_third_host(mesh: Lab) -> None:
    lab = mesh
    before = _overlays(lab)
    assert len(before) >= 3
    r = cli_json(lab, 3, "shutdown", "web")
    assert len(r["removed"]) == 3, r
    assert _vms(lab, 1, "web") == []
    assert _overlays(lab) == [], "overlays deleted"
    # The templates stay.
    assert any(t["packages"] == ["vmm-test-a"] for t in cli_json(lab, 1, "templates")["templates"])


def test_concurrent_requests_never_overcommit(mesh: Lab) -> None:
    lab = mesh
    results: dict[int, dict[str, Any]] = {}

    def go(i: int) -> None:
        results[i] = _request(lab, i, f"c{i}", "4", "vmm-test-a")

    threads = [threading.Thread(target=go, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        print(json.dumps(results, indent=1))  # in full if an assertion below fails
        per_host: dict[str, int] = {}
        for v in cli_json(lab, 3, "vms")["vms"]:
            per_host[v["host"]] = per_host.get(v["host"], 0) + 1
        assert all(n <= 2 for n in per_host.values()), per_host
        placed = sum(len(r["vms"]) for r in results.values())
        assert placed == sum(per_host.values()) == 6, (results, per_host)
        unplaced = sum(u["count"] for r in results.values() for u in r["unplaced"])
        assert unplaced == 2
    finally:  # the next tests count free slots: never leave these VMs behind
        for i in (1, 2):
            lab.cli(3, "shutdown", f"c{i}", check=False)
    assert _overlays(lab) == []


def test_host_killed_during_a_request_has_its_share_replaced(mesh: Lab) -> None:
    lab = mesh
    # Make h3 the first choice (most free slots: it takes all three), then
    # kill its node while it works on its share.
    _set_slots(lab, 3, 4)
    eventually(field_is, "h1 sees h3 with four free slots", lab, 1, "h3", SLOTS, 4)
    for host in ("h1", "h2"):
        eventually(field_is, f"h1 sees {host} with two free slots", lab, 1, host, SLOTS, 2)
    done: dict[str, Any] = {}

    def go() -> None:
        done["reply"] = _request(lab, 1, "kill", "3", "vmm-test-b")

    t = threading.Thread(target=go)
    t.start()
    eventually(_working, "h3 starts working on its share", lab.host_data_dir(3), patience=PATIENCE)
    lab.kill_host(3, signal.SIGKILL)
    t.join()
    reply = done["reply"]
    print(json.dumps(reply, indent=1))  # in full if an assertion below fails
    assert all(v["host"] != "h3" for v in reply["vms"]), reply
    assert any("h3" in n and "re-placed" in n for n in reply["notes"]), reply
    assert len(reply["vms"]) + sum(u["count"] for u in reply["unplaced"]) == 3
    assert len(reply["vms"]) == 3, "h1 and h2 have four slots between them"
    # h3 restarts, reconciles: no half template, no orphan disk.
    _write_slots(lab, 3, SLOTS_EACH)
    lab = lab.start_host(3)
    eventually(all_up, "h3 back up", lab, 1)
    building = [
        p for p in (lab.host_data_dir(3) / "templates").iterdir() if p.name.startswith(".building")
    ]
    assert building == []
    lab.cli(1, "shutdown", "kill")


def test_the_second_request_for_the_same_packages_gets_warm_vms(mesh: Lab) -> None:
    """Once a host holds a template, it saves a booted guest of it in the background;
    the next VMs of that template resume from it instead of booting."""
    lab = mesh
    first = _request(lab, 1, "wa", "1", "vmm-test-a")
    [vm] = first["vms"]
    host = vm["host"]

    def all_warm() -> bool:
        """Every host that holds the template has saved a warm boot of it."""
        rows = cli_json(lab, 1, "templates")["templates"]
        mine = [t for t in rows if t["template_id"] == vm["template"]]
        return bool(mine) and all(t["warm_size"] > 0 for t in mine)

    eventually(all_warm, f"{host} saves a warm boot of the template", patience=PATIENCE)
    lab.cli(1, "shutdown", "wa")
    eventually(field_is, f"h1 sees {host} with two free slots", lab, 1, host, SLOTS, 2)
    second = _request(lab, 1, "wb", "1", "vmm-test-a")
    [vm2] = second["vms"]
    assert vm2["start"] == "warm", second
    assert "vm_resume" in vm2["phases"] and "vm_boot" not in vm2["phases"]
    rows = [v for v in cli_json(lab, 1, "vms")["vms"] if v["request"] == "wb"]
    assert [(r["start"], r["state"]) for r in rows] == [("warm", "running")]
    print(f"warm start: {vm2['phases']['vm_resume']:.2f} s to the guest agent")
    lab.cli(1, "shutdown", "wb")
