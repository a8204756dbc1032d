"""Migration between lab hosts: real nodes (network namespaces, mDNS, mutual TLS),
real QEMU guests (TCG), a guest process that must survive the move.

One lab of two hosts serves the module.  Each VM has no packages, so it
resumes the base image's warm state (no cold boot): the VM's overlay sits on
that warm state's disk, a layer of its host's own, which the migration must
carry too.  The guest runs a counter that writes a number to a file every
100 ms; after a move the same process (same PID, same start time) goes on
counting.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.labutil import lab_context
from tests.meshutil import all_up, base_warm, cli_json, eventually, failed
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
#: How far behind this host's a migrated guest's clock may be (set by a process start
#: in a loaded TCG guest; one left as it was would lag by the whole pause).
CLOCK_SLACK = 3.0
COUNTER = (
    "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /run/count; sleep 0.1; done' "
    "</dev/null >/dev/null 2>&1 & echo $!"
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("miglab")
    with lab_context(base, 2, start_nodes=True, node_args=["--accel=tcg"], image=BASE_DIR) as lab:
        for i in (1, 2):
            eventually(all_up, f"h{i} sees two hosts up", lab, i, 2)
        for i in (1, 2):
            eventually(base_warm, f"h{i} has its base image's warm state", lab, i,
                       patience=PATIENCE)  # fmt: skip
        yield lab


@pytest.fixture(autouse=True)
def node_logs_if_failed(request: pytest.FixtureRequest, lab: Lab) -> Iterator[None]:
    yield
    if failed(request):
        for i in (1, 2):
            log = Path(lab.host(i).data_dir) / "node.log"
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            print(f"--- h{i} node.log (last 60 lines)", *lines[-60:], sep="\n")


def _run(lab: Lab, i: int, cmd: str, *args: str) -> Any:
    argv = [*lab.vmmesh_argv(), cmd, "--data-dir", str(lab.host_data_dir(i)), "--json", *args]
    r = lab.lab_exec(i, argv, check=False, timeout=PATIENCE)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _sh(lab: Lab, i: int, vm: str, script: str) -> str:
    reply = _run(lab, i, "exec", vm, "--", "sh", "-c", script)
    assert reply["exit_code"] == 0, reply
    return str(reply["stdout"])


def _where(lab: Lab, i: int, vm: str) -> list[tuple[str, str]]:
    return [(v["host"], v["state"]) for v in cli_json(lab, i, "vms")["vms"] if v["name"] == vm]


def _process(lab: Lab, i: int, vm: str, pid: int) -> tuple[str, int]:
    """The counter's start time (ticks since boot, from /proc) and its last count."""
    out = _sh(lab, i, vm, f"cut -d' ' -f22 /proc/{pid}/stat; cat /run/count")
    start, count = out.split()
    return start, int(count)


def _counting(lab: Lab, i: int, vm: str, pid: int, after: int) -> tuple[str, int] | None:
    seen = _process(lab, i, vm, pid)
    return seen if seen[1] > after else None


def _spare_ready(lab: Lab, i: int) -> bool:
    return str(cli_json(lab, i, "status")["facts"].get("warm spare", "")).startswith("ready")


@pytest.mark.parametrize("mode", ["live", "offline"])
def test_a_guest_process_goes_on_counting_on_the_other_host(lab: Lab, mode: str) -> None:
    name = f"mig{mode[:3]}"
    spares = False
    if mode == "live":
        # The VM moved is a warm spare taken by the request (its disk's first name
        # is what its QEMU reopens when the migration hands the disk over): a warm
        # request on each host first, so that each has its spare.
        # (one after the other: the second goes to the host with more room)
        hosts = {_run(lab, 1, "request", f"pre{n}", "1")["vms"][0]["host"] for n in (1, 2)}
        for n in (1, 2):
            _run(lab, 1, "shutdown", f"pre{n}")
        for h in hosts:
            eventually(_spare_ready, f"{h}'s warm spare", lab, int(h[1:]), patience=PATIENCE)
        spares = hosts == {"h1", "h2"}
        print("warm spares on", sorted(hosts))
    made = _run(lab, 1, "request", name, "1")
    vm = f"{name}-1"
    assert made["placed"] == 1, made
    if mode == "live" and spares:
        assert "spare" in made["vms"][0]["start_note"], made
    [(src, state)] = _where(lab, 1, vm)  # the planner's pick
    assert state == "running"
    dst = "h2" if src == "h1" else "h1"
    pid = int(_sh(lab, 1, vm, COUNTER).strip())
    start, count = eventually(_counting, "the counter counts", lab, 1, vm, pid, 0)

    args = ["migrate", vm, "--to", dst] + (["--offline"] if mode == "offline" else [])
    report = _run(lab, 1, *args)  # any host may ask, the VM's or another
    print(json.dumps(report, indent=1))
    assert (report["source"], report["target"], report["mode"]) == (src, dst, mode)
    phases = [p["name"] for p in report["phases"]]
    if mode == "live":
        assert phases[:2] == ["prepare", "layer"] and "switchover" in phases
        assert report["downtime_ms"] is not None and report["ram_bytes"] > 0
    else:
        assert "save" in phases and "send" in phases
    assert report["wire_bytes"] > 0

    assert _where(lab, 1, vm) == [(dst, "running")]
    later_start, later = eventually(_counting, "the counter goes on", lab, 1, vm, pid, count)
    assert later_start == start  # the same process, not a new one with the same PID
    assert later > count
    # its clock stood still while it was paused; the target set it from its own
    before = time.time()
    guest_now = float(_sh(lab, 1, vm, "date +%s.%N"))
    after = time.time()
    assert before - CLOCK_SLACK <= guest_now <= after + 1, (before, guest_now, after)
    left = lab.host_data_dir(int(src[1:])) / "vms"
    assert not list(left.glob("*.qcow2"))  # nothing left behind on the source
    _run(lab, 1, "shutdown", name)


def test_migrating_a_vm_no_host_runs_says_so(lab: Lab) -> None:
    argv = [*lab.vmmesh_argv(), "migrate", "nosuch-1", "--data-dir", str(lab.host_data_dir(1))]
    r = lab.lab_exec(1, argv, check=False, timeout=60)
    assert r.returncode != 0
    assert "no host of the mesh runs a VM nosuch-1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, shlex.quote(r.stderr)


def _draining(lab: Lab, viewer: int, host: str) -> bool:
    hosts = {h["name"]: h for h in cli_json(lab, viewer, "peers")["hosts"]}
    return bool(hosts[host]["draining"])


def test_a_drained_host_moves_its_vms_away_and_takes_no_new_one(lab: Lab) -> None:
    _run(lab, 1, "request", "drn", "2")
    for vm in ("drn-1", "drn-2"):  # both on h1, whatever the planner chose
        [(host, _)] = _where(lab, 1, vm)
        if host != "h1":
            _run(lab, 1, "migrate", vm, "--to", "h1")
    assert sorted(_where(lab, 1, vm)[0][0] for vm in ("drn-1", "drn-2")) == ["h1", "h1"]
    pid = int(_sh(lab, 1, "drn-1", COUNTER).strip())
    start, count = eventually(_counting, "the counter counts", lab, 1, "drn-1", pid, 0)

    report = _run(lab, 2, "drain", "h1")  # from another host
    assert report["draining"] is True and report["errors"] == []
    assert sorted(m["vm"] for m in report["moved"]) == ["drn-1", "drn-2"]
    assert {(m["source"], m["target"]) for m in report["moved"]} == {("h1", "h2")}
    assert [_where(lab, 2, vm) for vm in ("drn-1", "drn-2")] == [[("h2", "running")]] * 2
    later_start, _ = eventually(_counting, "the counter goes on", lab, 2, "drn-1", pid, count)
    assert later_start == start
    eventually(_draining, "h2 sees h1 draining", lab, 2, "h1")
    spare = cli_json(lab, 1, "status")["facts"]["warm spare"]
    assert spare == "none", f"a draining host keeps no warm spare: {spare}"

    made = _run(lab, 2, "request", "fresh", "1")  # a new request made on another host
    assert made["placed"] == 1 and _where(lab, 2, "fresh-1")[0][0] == "h2"
    data = str(lab.host_data_dir(2))
    argv = [*lab.vmmesh_argv(), "migrate", "--data-dir", data, "fresh-1", "--to", "h1"]
    refused = lab.lab_exec(2, argv, check=False)
    assert refused.returncode != 0 and "h1 is draining" in refused.stderr

    back = _run(lab, 2, "undrain", "h1", "--bring-back")
    assert back["draining"] is False and back["errors"] == []
    assert sorted(m["vm"] for m in back["moved"]) == ["drn-1", "drn-2"]
    assert [_where(lab, 1, vm) for vm in ("drn-1", "drn-2")] == [[("h1", "running")]] * 2
    eventually(lambda: not _draining(lab, 2, "h1"), "h2 sees h1 take VMs again")
    for name in ("drn", "fresh"):
        _run(lab, 1, "shutdown", name)
