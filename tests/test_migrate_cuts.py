"""A migration cut at each of its steps ends with exactly one copy of the VM.

Lab hosts (real nodes, mutual TLS) and real QEMU guests (TCG) running a
counter.  The source's node (for ``committed``, the target's) is held at a
named step (``migrate.faults``: the whole node stands still there) and the
test cuts the migration there: it kills the source's node, kills the
target's node, takes the source's link down (the carrier lost: connections
fail at once) or, where bytes stream or an answer is awaited, cuts it
silently (the source's veth leaves the bridge: bytes go unanswered, the
source notices by its beat); then it restarts the killed node (its QEMUs
were not killed: they run in sessions of their own) or brings the link
back.  After the dust settles exactly one host lists the VM, running; the
counter process goes on there (same PID, same start time: the same
process, not a new one); the other host holds no overlay, layer, run
directory or QEMU of it; and the source holds no note of a migration that
did not end.

Which copy survives, by step (the source resumes when the target never ran
the guest or has dropped it; the target keeps it once it has committed):

* ``prepare``, ``mirror``, ``ram``, ``paused``: the source's, whatever the cut
  (a source killed while paused before the switchover is found paused at its
  restart and settled with the target, which drops its copy).
* ``switchover`` (the RAM stream completed, no commit yet): the source's, the
  target's uncommitted copy dropped when the source settles; with the link
  cut the source stays paused until the link is back, and then either copy
  may be the one (a commit sent on the cut link may still arrive).
* ``resumed`` (committed, the source not yet deleted): the target's; a source
  killed there finds its paused copy at its restart and deletes it.
* ``committed`` (the target held this time: its guest runs and its row says
  so, the commit not answered yet): the target's; the source's copy stays
  paused until the target can tell (after its restart it has no session but
  lists the VM running).
* Offline (``--offline``): the same steps where they exist (``prepare``,
  ``switchover``: state and overlay sent, no commit yet; ``resumed``), with
  the guest paused and saved from the start of the send.

One lab of two hosts serves the module; VMs have no packages (they resume the
base image's warm state, no boot).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.labutil import lab_context
from tests.meshutil import all_up, base_warm, cli_json, eventually, failed
from vmmesh.lab import Lab, lab_status
from vmmesh.migrate import faults

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
COUNTER = (
    "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /run/count; sleep 0.1; done' "
    "</dev/null >/dev/null 2>&1 & echo $!"
)
CUTS = ("source", "target", "link")
#: A link cut without losing carrier: the host's veth leaves the bridge, so established
#: connections go silent (no error, only unanswered bytes) instead of failing at once.
SILENT_STEPS = ("ram", "paused", "switchover")
#: Offline: the guest is paused and saved before anything is sent, so from the switchover
#: on (the files sent, no commit yet) the cut leaves it paused until the target answers.
OFFLINE = (("switchover", "source"), ("switchover", "target"), ("switchover", "link"),
           ("resumed", "source"))  # fmt: skip
CASES = [
    *[(step, cut, "live") for step in (*faults.STEPS, *faults.TARGET_STEPS) for cut in CUTS],
    *[(step, "silent", "live") for step in SILENT_STEPS],
    *[(step, cut, "offline") for step, cut in OFFLINE],
]


@dataclass
class CutLab:
    """The lab (replaced when a node restarts) and the directory of its failpoints."""

    lab: Lab
    faults: Path


@pytest.fixture(scope="module")
def cut_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CutLab]:
    base = tmp_path_factory.mktemp("cutlab")
    held = base / "faults"
    held.mkdir()
    env = {faults.ENV: str(held)}
    with lab_context(
        base, 2, start_nodes=True, node_args=["--accel=tcg"], env=env, image=BASE_DIR
    ) as lab:
        for i in (1, 2):
            eventually(all_up, f"h{i} sees two hosts up", lab, i, 2)
        for i in (1, 2):
            eventually(base_warm, f"h{i} has its base image's warm state", lab, i,
                       patience=PATIENCE)  # fmt: skip
        box = CutLab(lab, held)
        try:
            yield box
        finally:
            for i in (1, 2):  # lab_down tears them down; whole links are tidier
                _link(box.lab, i, "up")
                _bridge(box.lab, i, True)


@pytest.fixture(autouse=True)
def node_logs_if_failed(request: pytest.FixtureRequest, cut_lab: CutLab) -> Iterator[None]:
    yield
    for armed in cut_lab.faults.iterdir():  # nothing armed or held for the next case
        armed.unlink(missing_ok=True)
    if failed(request):
        for i in (1, 2):
            log = Path(cut_lab.lab.host(i).data_dir) / "node.log"
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            print(f"--- h{i} node.log (last 80 lines)", *lines[-80:], sep="\n")


def _run(lab: Lab, i: int, cmd: str, *args: str) -> Any:
    argv = [*lab.vmmesh_argv(), cmd, "--data-dir", str(lab.host_data_dir(i)), "--json", *args]
    r = lab.lab_exec(i, argv, check=False, timeout=PATIENCE)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _sh(lab: Lab, i: int, vm: str, script: str) -> str:
    reply = _run(lab, i, "exec", vm, "--", "sh", "-c", script)
    assert reply["exit_code"] == 0, reply
    return str(reply["stdout"])


def _rows(lab: Lab, vm: str) -> list[dict[str, Any]] | None:
    """The VM's rows on every host (None unless both hosts answered)."""
    reply = cli_json(lab, 1, "vms")
    if reply.get("errors"):
        return None
    return [v for v in reply["vms"] if v["name"] == vm]


def _counting(lab: Lab, vm: str, pid: int, after: int) -> tuple[str, int] | None:
    """The counter's start time (ticks since boot) and count, once it is past ``after``."""
    out = _sh(lab, 1, vm, f"cut -d' ' -f22 /proc/{pid}/stat; cat /run/count")
    start, count = out.split()
    return (start, int(count)) if int(count) > after else None


def _link(lab: Lab, i: int, state: str) -> None:
    subprocess.run(["ip", "link", "set", lab.host(i).veth, state], check=True)


def _bridge(lab: Lab, i: int, on: bool) -> None:
    master = ["master", lab.bridge] if on else ["nomaster"]
    subprocess.run(["ip", "link", "set", lab.host(i).veth, *master], check=True)


def _qemus_of(lab: Lab, i: int, vm_id: str) -> list[int]:
    """Processes of host ``i`` whose command line names the VM's run directory."""
    run_dir = str(lab.host_data_dir(i) / "run" / vm_id)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if run_dir.encode() in cmdline:
            found.append(int(proc.name))
    return found


def _leftovers(lab: Lab, i: int, vm_id: str) -> list[str]:
    """What host ``i`` still holds of a VM it does not run."""
    data = lab.host_data_dir(i)
    left = [str(p) for p in (data / "vms").glob(f"{vm_id}*")]
    left += [str(p) for p in [data / "run" / vm_id] if p.exists()]
    return left + [f"pid {pid}" for pid in _qemus_of(lab, i, vm_id)]


def _one_copy(lab: Lab, vm: str, vm_id: str) -> int:
    """The host that runs the VM, once it is the only one that holds anything of it
    (AssertionError saying what is not so yet: ``eventually`` reports the last)."""
    rows = _rows(lab, vm)
    assert rows is not None, "not every host answered `vmmesh vms`"
    assert [r["state"] for r in rows] == ["running"], f"rows: {rows}"
    host = int(rows[0]["host"][1:])
    left = _leftovers(lab, 3 - host, vm_id)
    assert not left, f"h{3 - host} still holds {left}"
    note = lab.host_data_dir(host) / "run" / vm_id / "outgoing.json"
    assert not note.exists(), f"h{host} has not settled: {note.read_text()}"
    return host


def _qmp(sock: Path, *commands: tuple[str, dict[str, Any]]) -> list[Any]:
    """A few QMP commands on a guest's monitor socket, straight from the test (a Unix
    socket needs no namespace): the answers, or the error text in their place."""
    out: list[Any] = []
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        f = s.makefile("rw")
        f.readline()  # greeting
        for name, args in (("qmp_capabilities", {}), *commands):
            f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
            f.flush()
            while "return" not in (reply := json.loads(f.readline())) and "error" not in reply:
                pass  # an event
            out.append(reply.get("return", reply.get("error")))
    return out[1:]


def _guest_state(lab: Lab, host: int, vm_id: str) -> str:
    """What the guest's own QEMU says: run state, and the console's last lines."""
    sock = lab.host_data_dir(host) / "run" / vm_id / "qmp.sock"
    try:
        status, console = _qmp(
            sock,
            ("query-status", {}),
            # the whole ring: ringbuf-read gives its oldest bytes first
            ("ringbuf-read", {"device": "console", "size": 1 << 20}),
        )
    except (OSError, ValueError) as exc:
        return f"h{host}'s QEMU for {vm_id} does not answer at {sock}: {exc}"
    lines = str(console).splitlines()
    shown = lines if len(lines) <= 80 else [*lines[:40], "[…]", *lines[-40:]]
    text = "\n".join(shown)
    return f"h{host}'s QEMU for {vm_id}: {status}\nconsole since it arrived:\n{text}"


def _node_gone(lab: Lab, i: int) -> bool:
    return not lab_status(lab.lab_dir)[i - 1]["node_running"]


@pytest.mark.parametrize(("step", "cut", "mode"), CASES)
def test_a_migration_cut_at_a_step_ends_with_one_copy(
    cut_lab: CutLab, step: str, cut: str, mode: str
) -> None:
    lab = cut_lab.lab
    name = f"{step[:5]}{cut[:2]}{mode[:2]}"
    made = _run(lab, 1, "request", name, "1")
    assert made["placed"] == 1, made
    vm = f"{name}-1"
    [row] = _rows(lab, vm) or []
    src = int(row["host"][1:])
    dst = 3 - src
    vm_id = row["vm_id"]
    pid = int(_sh(lab, 1, vm, COUNTER).strip())
    start, count = eventually(_counting, "the counter counts", lab, vm, pid, 0)

    side = "target" if step in faults.TARGET_STEPS else "source"
    (cut_lab.faults / f"{side}-{step}").write_text("")
    held = cut_lab.faults / f"{side}-{step}.held"
    argv = [*lab.vmmesh_argv(), "migrate", "--data-dir", str(lab.host_data_dir(src)),
            "--json", vm, "--to", f"h{dst}"]  # fmt: skip
    if mode == "offline":
        argv.append("--offline")
    answer: dict[str, subprocess.CompletedProcess[str]] = {}

    def migrate() -> None:
        answer["cli"] = lab.lab_exec(src, argv, check=False, timeout=PATIENCE)

    cli = threading.Thread(target=migrate)
    cli.start()
    try:
        eventually(lambda: held.exists() or not cli.is_alive(), f"the {side} is held at {step}")
        assert held.exists(), f"the migration ended before {step}"
        if cut == "link":
            _link(lab, src, "down")
        elif cut == "silent":
            _bridge(lab, src, False)
        else:
            killed = src if cut == "source" else dst
            lab.kill_host(killed)
            eventually(_node_gone, f"h{killed}'s node is gone", lab, killed)
    finally:
        held.unlink(missing_ok=True)
        cli.join()
    r = answer["cli"]
    print(
        f"{mode} migration cut at {step} ({cut}): exit {r.returncode}", r.stdout, r.stderr, sep="\n"
    )
    if cut == "link":
        _link(lab, src, "up")
    elif cut == "silent":
        _bridge(lab, src, True)
    else:
        lab = cut_lab.lab = lab.start_host(killed)
    for i in (1, 2):
        eventually(all_up, f"h{i} sees two hosts up", lab, i, 2)

    host = eventually(_one_copy, f"one copy of {vm}, cut at {step} ({cut})", lab, vm, vm_id)
    print(f"{vm} runs on h{host}")
    if step in ("resumed", "committed"):
        assert host == dst  # committed: the target's
    elif step != "switchover" or cut not in ("link", "silent"):
        assert host == src  # the target never ran it, or dropped its uncommitted copy
    # (switchover, a link cut): a commit sent on the cut link may arrive when it is back
    try:
        later_start, _ = eventually(_counting, "the counter goes on", lab, vm, pid, count)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_guest_state(lab, host, vm_id)}") from None
    assert later_start == start  # the same process, not a new one with the same PID
    _run(lab, 1, "shutdown", name)
