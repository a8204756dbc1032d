"""The request path as the user waits for it: `vmmesh request`, `run -- true` and
`shutdown`, each timed from the CLI's process start to its exit, phase by phase.

Brings up a 1-host lab (``vmmesh node`` in a network namespace, the base image,
the test apt repository on the bridge), makes the template of ``vmm-test-a``
and its warm state, then ``--runs`` rounds, each of:

* ``vmmesh request w 1 vmm-test-a --json`` (warm), then ``vmmesh shutdown w``;
* ``vmmesh run --pkg vmm-test-a --json -- true`` (warm), and whether its VM is
  still listed by ``vmmesh vms`` when ``run`` has returned;
* ``python -c 'import vmmesh_cli ...'``: the CLI's own start and imports;

each of the two warm commands twice, alternating: ``spare``, with the host's
warm spare (``vmmesh.vm.spare``) waited for first (``vmmesh status``: "warm
spare: ready"), as a user who is not firing requests back to back finds it,
and ``warm``, with spares off (``warm_spare = false``, SIGHUP): the clone
resumed on the request's path; and in the first ``--cold-rounds`` rounds the
same request, shutdown and run with warm starts off (``warm_start = false``),
alternating with the warm ones so that drift cancels.  Cold rounds boot a guest each (60-75
CPU-seconds under TCG), so there are few of them.

With ``--other TREE`` (another checkout, e.g. ``git worktree add /tmp/old
HEAD~3``, with ``TREE/vmmesh_cli`` a link to ``cli``) every round runs twice,
once with this tree's code and once with TREE's (``PYTHONPATH``; the node is
restarted between, keeping its template and warm state): a before/after on
one lab, alternating, so a busy machine weighs on both alike.

Each row prints the total beside its phases.  For a request: ``cli`` (the
CLI's start, imports, control call and printing: total less the
coordinator's figure), ``coord`` (the coordinator's own figure, plan to
report), and from the first VM's report the host's phases (``admit``,
``template``, ``vm_clone``, ``vm_resume`` or ``vm_boot``, ``identity``) and
``hop`` (the coordinator's end to end less the host's phases: the RPC hop,
progress and the share's reply).  For ``run``: the job's parts (``vm``,
``inputs``, ``run``, ``outputs``, ``end``) and ``cli`` (the rest).  Medians
end the table.  ``--json`` prints one object per row, then the medians.

    python benchmarks/request_path.py [--runs 5] [--cold-rounds 1] [--other TREE] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.jobs import BASE_DIR, CONFIG, _free_port, _warm_ready  # noqa: E402
from tests.aptrepo import AptRepo  # noqa: E402
from tests.labutil import lab_context  # noqa: E402
from tests.meshutil import all_up, cli_json, eventually  # noqa: E402
from vmmesh.lab import Lab  # noqa: E402

PATIENCE = 1800.0
PACKAGE = "vmm-test-a"
TARGETS = {"request": 1.0, "run": 1.5, "shutdown": 1.0}
SPARE_CONFIG = "warm_spare = {spare}\n"


def _set_mode(lab: Lab, mode: str) -> None:
    """Warm starts and spares for ``mode`` (cold: neither; warm: no spare; spare: both)."""
    text = CONFIG.format(warm="false" if mode == "cold" else "true")
    text += SPARE_CONFIG.format(spare="true" if mode == "spare" else "false")
    (lab.host_data_dir(1) / "config.toml").write_text(text)
    lab.kill_host(1, signal.SIGHUP)
    time.sleep(1.0)  # the node reloads


def _spare_ready(lab: Lab) -> bool:
    return str(cli_json(lab, 1, "status")["facts"].get("warm spare", "")).startswith("ready")


def _wait_spare(lab: Lab, mode: str) -> None:
    if mode == "spare":
        eventually(_spare_ready, "h1's warm spare", lab, patience=PATIENCE)


IMPORTS = "import vmmesh_cli.main, vmmesh_cli.cmd_vm, vmmesh_cli.cmd_run"
HOST_PHASES = ("admit", "template", "vm_clone", "vm_resume", "vm_boot", "identity")


def _timed(lab: Lab, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    """``vmmesh <args>`` in host 1's namespace: seconds from process start to exit."""
    cmd, *rest = args
    argv = [*lab.vmmesh_argv(), cmd, "--data-dir", lab.host(1).data_dir, *rest]
    started = time.monotonic()
    r = lab.lab_exec(1, argv, check=False, timeout=PATIENCE)
    return time.monotonic() - started, r


def _listed(lab: Lab, prefix: str) -> list[str]:
    return [v["name"] for v in cli_json(lab, 1, "vms")["vms"] if v["name"].startswith(prefix)]


def _request_row(lab: Lab, mode: str, name: str) -> dict[str, Any]:
    total, r = _timed(lab, "request", name, "1", PACKAGE, "--json")
    if r.returncode != 0 or not r.stdout:
        raise SystemExit(f"vmmesh request failed ({r.returncode}): {r.stderr.strip()}")
    report = json.loads(r.stdout)
    vm = report["vms"][0]
    phases = {k: v for k, v in vm["phases"].items() if k in HOST_PHASES}
    row: dict[str, Any] = {"command": "request", "mode": mode, "start": vm["start"]}
    row["total"] = round(total, 3)
    row["cli"] = round(total - report["seconds"], 3)
    row["coord"] = report["seconds"]
    row["hop"] = round(vm["seconds_end_to_end"] - sum(phases.values()), 3)
    return row | phases


def _shutdown_row(lab: Lab, mode: str, name: str) -> dict[str, Any]:
    total, r = _timed(lab, "shutdown", name, "--json")
    if r.returncode != 0:
        raise SystemExit(f"vmmesh shutdown failed ({r.returncode}): {r.stderr.strip()}")
    left = _listed(lab, f"{name}-")
    eventually(lambda: not _listed(lab, f"{name}-"), f"{name} is gone", patience=PATIENCE)
    return {"command": "shutdown", "mode": mode, "total": round(total, 3), "listed_after": left}


def _run_row(lab: Lab, mode: str, cwd: Path) -> dict[str, Any]:
    argv = ["ip", "netns", "exec", lab.host_netns(1), *lab.vmmesh_argv(), "run", "--data-dir",
            lab.host(1).data_dir, "--json", "--pkg", PACKAGE, "--", "true"]  # fmt: skip
    started = time.monotonic()
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=PATIENCE, check=False)
    total = time.monotonic() - started
    if r.returncode != 0 or not r.stdout:
        raise SystemExit(f"vmmesh run failed ({r.returncode}): {r.stderr.strip()}")
    left = _listed(lab, "job-")
    gone = time.monotonic()
    eventually(lambda: not _listed(lab, "job-"), "the job's VM is gone", patience=PATIENCE)
    reply = json.loads(r.stdout)
    parts = reply["parts"]
    row: dict[str, Any] = {"command": "run", "mode": mode, "start": reply["start"]}
    row["total"] = round(total, 3)
    row["cli"] = round(total - sum(parts.values()), 3)
    row |= parts
    row["vm_phases"] = {k: v for k, v in reply["vm_phases"].items() if k in HOST_PHASES}
    row["listed_after"] = left
    row["gone_after"] = round(time.monotonic() - gone, 2) if left else 0.0
    return row


def _import_row(lab: Lab) -> dict[str, Any]:
    python = lab.vmmesh_argv()[0]
    started = time.monotonic()
    lab.lab_exec(1, [python, "-c", IMPORTS], timeout=60)
    return {"command": "cli-import", "mode": "-", "total": round(time.monotonic() - started, 3)}


@contextmanager
def _lab(accel: str) -> Iterator[Lab]:
    """A 1-host lab serving the test apt repository, its node up."""
    port = _free_port()
    source = f"--apt-source=deb [trusted=yes] http://BRIDGE:{port}/ ./"
    with (
        tempfile.TemporaryDirectory(dir="/tmp", prefix="vmrp-") as tmp,
        lab_context(Path(tmp), 1, image=BASE_DIR) as lab,
    ):
        (lab.host_data_dir(1) / "config.toml").write_text(CONFIG.format(warm="true"))
        running = lab.with_node_args(
            [f"--accel={accel}", source.replace("BRIDGE", lab.bridge_address)]
        )
        running = running.start_all()
        with AptRepo(Path(tmp) / "repo", host=running.bridge_address, port=port):
            eventually(all_up, "h1 is up", running, 1, 1)
            yield running


THIS_PATH = os.environ.get("PYTHONPATH")  # this tree's code, as the benchmark was started


def _use_tree(lab: Lab, tree: str | None) -> Lab:
    """Run the node and the CLI from ``tree`` (None: this one); the node restarts (with
    warm starts on: a node started without them cannot be told to use them)."""
    _set_mode(lab, "spare")
    path = THIS_PATH if tree is None else tree
    if path is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = path
    lab = lab.restart_host(1)
    eventually(all_up, "h1 is up", lab, 1, 1)
    return lab


def bench(args: argparse.Namespace, emit: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    trees: tuple[str | None, ...] = (None, args.other) if args.other else (None,)
    label = {None: "this", args.other: "other"}

    def add(row: dict[str, Any]) -> None:
        if args.other:
            row = {"tree": label[tree]} | row
        rows.append(row)
        emit(row)

    with _lab(args.accel) as started, tempfile.TemporaryDirectory(prefix="vmrp-cwd-") as cwd:
        os.chdir(cwd)  # `python -m vmmesh_cli` would import this tree from the cwd first
        lab = started
        first, r = _timed(lab, "request", "prep", "1", PACKAGE, "--json")
        if r.returncode != 0:
            raise SystemExit(f"the first request failed: {r.stderr.strip()}")
        emit({"command": "request", "mode": "template built", "total": round(first, 2)})
        _timed(lab, "shutdown", "prep")
        eventually(_warm_ready, "a warm state of the template", lab, PACKAGE, patience=PATIENCE)
        for n in range(args.runs):
            modes = ("spare", "warm", "cold") if n < args.cold_rounds else ("spare", "warm")
            for tree in trees if n % 2 == 0 else trees[::-1]:
                if len(trees) > 1:
                    lab = _use_tree(lab, tree)
                for mode in modes if n % 2 == 0 else modes[::-1]:
                    _set_mode(lab, mode)
                    _wait_spare(lab, mode)
                    add(_request_row(lab, mode, f"rq{n}{mode[0]}"))
                    add(_shutdown_row(lab, mode, f"rq{n}{mode[0]}"))
                    _wait_spare(lab, mode)
                    add(_run_row(lab, mode, Path(cwd)))
                add(_import_row(lab))
        _set_mode(lab, "spare")
    return rows


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    keys = sorted({(r.get("tree", ""), r["command"], r["mode"]) for r in rows})
    for tree, command, mode in keys:
        group = [
            r for r in rows if (r.get("tree", ""), r["command"], r["mode"]) == (tree, command, mode)
        ]
        row: dict[str, Any] = {"command": command, "mode": mode, "median_of": len(group)}
        if tree:
            row = {"tree": tree} | row
        for k, v in group[0].items():
            if isinstance(v, float | int) and not isinstance(v, bool):
                row[k] = round(statistics.median(g.get(k, 0.0) for g in group), 3)
        if "listed_after" in group[0]:
            row["still_listed"] = sum(1 for g in group if g["listed_after"])
        out.append(row)
    return out


def _line(row: dict[str, Any]) -> str:
    head = f"{row.get('tree', ''):<6}{row['command']:<11}{row['mode']:<15}{row['total']:>7.2f} s"
    skip = {"tree", "command", "mode", "total", "start", "listed_after", "vm_phases", "median_of"}
    parts = [f"{k} {v:.2f}" for k, v in row.items() if k not in skip and isinstance(v, float)]
    if row.get("vm_phases"):
        parts.append("VM: " + ", ".join(f"{k} {v:.2f}" for k, v in row["vm_phases"].items()))
    if "listed_after" in row:
        parts.append(f"listed after exit: {row['listed_after'] or 'none'}")
    if "still_listed" in row:
        parts.append(f"listed after exit in {row['still_listed']} of {row['median_of']}")
    target = TARGETS.get(row["command"]) if row["mode"] in ("warm", "spare") else None
    if target is not None and "median_of" in row:
        parts.append(f"target <= {target:g} s")
    return f"  {head}  ({'; '.join(parts)})" if parts else f"  {head}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cold-rounds", type=int, default=1)
    ap.add_argument("--accel", default="tcg", choices=["tcg", "kvm"])
    ap.add_argument("--other", metavar="TREE", help="another checkout to alternate with")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    def emit(row: dict[str, Any]) -> None:
        print(json.dumps(row) if args.json else _line(row), flush=True)

    rows = bench(args, emit)
    if not args.json:
        print("medians")
    for row in medians(rows):
        emit(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
