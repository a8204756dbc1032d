"""Jobs through real nodes: `vmmesh run`, the HTCondor wrapper and bags of tasks on two
lab hosts (network namespaces, mDNS, mutual TLS between node processes) with
real QEMU guests (TCG) that install packages from the lab's apt repository.

Each host offers one VM slot, so a job of two VMs uses both hosts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.aptrepo import AptRepo
from tests.labutil import lab_context
from tests.meshutil import all_up, base_warm, cli_json, eventually, failed
from vmmesh.jobs.condor import parse_arguments
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
# One vCPU of budget on a 2-core host: one VM slot per host.
CONFIG = "cpu_overcommit = 0.5\nstorage_quota_mb = 4000\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("joblab")
    port = _free_port()
    node_args = ["--accel=tcg", f"--apt-source=deb [trusted=yes] http://BRIDGE:{port}/ ./"]
    with lab_context(base, 2, start_nodes=False, node_args=node_args, image=BASE_DIR) as made:
        for i in (1, 2):
            (made.host_data_dir(i) / "config.toml").write_text(CONFIG)
        fixed = [a.replace("BRIDGE", made.bridge_address) for a in node_args]
        running = made.with_node_args(fixed).start_all()
        repo = AptRepo(base / "aptrepo", host=running.bridge_address, port=port)
        repo.start()
        try:
            for i in (1, 2):
                eventually(all_up, f"h{i} sees two hosts up", running, i, 2)
            # Each host's one slot is free once its base image's warm state is made
            # (a warm boot gives its slot to a job, and is cut short and made again).
            for i in (1, 2):
                eventually(base_warm, f"h{i} has its base image's warm state", running, i,
                           patience=PATIENCE)  # fmt: skip
            yield running
        finally:
            repo.stop()


@pytest.fixture(autouse=True)
def node_logs_if_failed(request: pytest.FixtureRequest, lab: Lab) -> Iterator[None]:
    yield
    if failed(request):
        for i in (1, 2):
            log = Path(lab.host(i).data_dir) / "node.log"
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            print(f"--- h{i} node.log (last 60 lines)", *lines[-60:], sep="\n")


def _argv(lab: Lab, i: int, *args: str) -> list[str]:
    data = lab.host(i).data_dir
    return ["ip", "netns", "exec", lab.host_netns(i), *lab.vmmesh_argv(), "run", "--data-dir",
            data, *args]  # fmt: skip


def _run(lab: Lab, i: int, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``vmmesh run ARGS`` on host ``i``, in ``cwd``."""
    return subprocess.run(
        _argv(lab, i, *args), check=False, cwd=cwd, capture_output=True, text=True, timeout=PATIENCE
    )


def _no_job_vms(lab: Lab) -> bool:
    """No job VM listed anywhere and no VM disk left on any host."""
    listed = [v for v in cli_json(lab, 1, "vms")["vms"] if v["request"].startswith("job-")]
    disks = [p for i in (1, 2) for p in (lab.host_data_dir(i) / "vms").glob("*.qcow2")]
    return not listed and not disks


def test_a_job_with_two_inputs_and_one_output(lab: Lab, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.txt").write_text("beta\n")
    script = "cat a.txt b.txt /usr/share/vmm-test-a/marker > out.txt; echo made it"
    r = _run(lab, 1, "--pkg", "vmm-test-a", "--input", "a.txt", "--input", "b.txt",
             "--output", "out.txt", "--", "sh", "-c", script, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.txt").read_text() == "alpha\nbeta\nvmm-test-a\n"
    assert "made it" in r.stdout
    eventually(_no_job_vms, "the job's VM is gone", lab, patience=PATIENCE)


def test_exit_status_stderr_and_signals_come_through(lab: Lab, tmp_path: Path) -> None:
    r = _run(lab, 2, "--", "sh", "-c", "echo to-stderr >&2; echo to-stdout; exit 3", cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert "to-stderr" in r.stderr and "to-stderr" not in r.stdout
    assert "to-stdout" in r.stdout
    killed = _run(lab, 1, "--", "sh", "-c", "kill -KILL $$", cwd=tmp_path)
    assert killed.returncode == 137, killed.stderr
    assert "SIGKILL" in killed.stderr
    # An output the command did not make: one line and its own status.
    missing = _run(lab, 1, "--output", "nothing.txt", "--", "true", cwd=tmp_path)
    assert missing.returncode == 73, missing.stderr
    assert "nothing.txt" in missing.stderr
    eventually(_no_job_vms, "the jobs' VMs are gone", lab, patience=PATIENCE)


def test_bad_input_is_one_line_and_its_own_status(lab: Lab, tmp_path: Path) -> None:
    r = _run(lab, 1, "--input", "absent.txt", "--", "true", cwd=tmp_path)
    assert r.returncode == 66 and "absent.txt" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _run(lab, 1, "--pkg", "vmm-no-such-package", "--", "true", cwd=tmp_path)
    assert r.returncode == 65 and "vmm-no-such-package" in r.stderr, r.stderr
    r = _run(lab, 1, "--", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert _no_job_vms(lab)


def test_sigterm_during_a_job_leaves_no_vm_behind(lab: Lab, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        _argv(lab, 2, "--", "sh", "-c", "echo started; sleep 600"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the command runs: its VM exists
        assert line.strip() == "started", proc.stderr.read() if proc.stderr else ""
        assert not _no_job_vms(lab)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=PATIENCE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err
    eventually(_no_job_vms, "no VM and no overlay after SIGTERM", lab, patience=PATIENCE)


# --- the HTCondor wrapper ----------------------------------------------------------------

ARGS_SH = 'for a in "$@"; do printf "%s\\n" "$a"; done > args.txt; ls -A > seen.txt\n'
JOB_SH = 'tr a-z A-Z < "$1" > upper.txt; echo "job ran on $(hostname)"; echo note >&2\n'


def _condor(lab: Lab, i: int, scratch: Path, arguments: str) -> subprocess.CompletedProcess[str]:
    """The wrapper as an execute node's starter runs it: argv split from ``arguments``,
    the job's scratch directory in the environment, Condor's own files beside the inputs."""
    (scratch / "_condor_stdout").write_text("")
    (scratch / "_condor_stderr").write_text("")
    (scratch / ".job.ad").write_text('Cmd = "/usr/bin/vmmesh-condor"\n')
    env = {**os.environ, "_CONDOR_SCRATCH_DIR": str(scratch),
           "VMMESH_DATA_DIR": lab.host(i).data_dir}  # fmt: skip
    argv = ["ip", "netns", "exec", lab.host_netns(i), *_wrapper(lab),
            *parse_arguments(arguments)]  # fmt: skip
    return subprocess.run(
        argv, check=False, env=env, capture_output=True, text=True, timeout=PATIENCE, cwd="/"
    )


def _wrapper(lab: Lab) -> Sequence[str]:
    cli = lab.vmmesh_argv()
    return [*cli[:-1], "vmmesh_cli.condor"] if cli[-1] == "vmmesh_cli" else ["vmmesh-condor"]


def test_the_condor_wrapper_runs_the_thesis_form(lab: Lab, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "job.sh").write_text(JOB_SH)
    (scratch / "in.txt").write_text("hello condor\n")
    r = _condor(lab, 1, scratch, '"vmm-test-a # sh job.sh in.txt"')
    assert r.returncode == 0, r.stderr
    assert "job ran on job-" in r.stdout and "note" in r.stderr
    assert (scratch / "upper.txt").read_text() == "HELLO CONDOR\n", "output beside the inputs"
    assert (scratch / "in.txt").read_text() == "hello condor\n"


def test_the_condor_wrapper_keeps_condor_quoting(lab: Lab, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "args.sh").write_text(ARGS_SH)
    line = """"vmm-test-a # sh args.sh one 'two with spaces' 3 ""quoted"" 'it''s'" """
    r = _condor(lab, 2, scratch, line.strip())
    assert r.returncode == 0, r.stderr
    args = (scratch / "args.txt").read_text().splitlines()
    assert args == ["one", "two with spaces", "3", '"quoted"', "it's"]
    seen = (scratch / "seen.txt").read_text().split()
    assert "args.sh" in seen and not {"_condor_stdout", ".job.ad"} & set(seen), seen
    # The command exits non-zero: so does the wrapper (Condor records it).
    (scratch / "fail.sh").write_text("exit 7\n")
    r = _condor(lab, 2, scratch, '"vmm-test-a # sh fail.sh"')
    assert r.returncode == 7, r.stderr
    bad = _condor(lab, 2, scratch, '"sh fail.sh"')
    assert bad.returncode == 2 and "'#'" in bad.stderr, bad.stderr
    eventually(_no_job_vms, "the wrapper's VMs are gone", lab, patience=PATIENCE)


# --- bags of tasks ---------------------------------------------------------------------------


def _qemu_pids(lab: Lab, i: int) -> list[int]:
    """The QEMU processes of host ``i``'s job VMs."""
    pids = []
    for pidfile in (lab.host_data_dir(i) / "run").glob("*/qemu.pid"):
        if pidfile.parent.name.startswith(("tpl-", "warm-")):
            continue
        try:
            pids.append(int(pidfile.read_text().strip()))
        except (OSError, ValueError):
            continue
    return pids


def test_a_bag_of_ten_tasks_over_two_hosts_survives_a_lost_vm(lab: Lab, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for n in range(10):
        (tasks / f"t{n:02d}").write_text("x" * (n + 1))
    results = tmp_path / "results"
    script = "sleep 3; wc -c < {} > {}.count; echo task {}"
    proc = subprocess.Popen(
        _argv(lab, 1, "--tasks", str(tasks), "--vms", "2", "--results", str(results),
              "--json", "--", "sh", "-c", script),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def two_done() -> bool:
            return len(list(results.glob("*/*.count"))) >= 2

        eventually(two_done, "two tasks done", patience=PATIENCE)
        pids = _qemu_pids(lab, 2)
        assert pids, "h2 runs one of the bag's VMs"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=PATIENCE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    report: dict[str, Any] = json.loads(out)
    rows = report["tasks"]
    assert sorted(r["task"] for r in rows) == [f"t{n:02d}" for n in range(10)]
    assert all(r["exit_code"] == 0 for r in rows), rows
    assert {r["host"] for r in rows} == {"h1", "h2"}, "both hosts ran tasks"
    rerun = [r for r in rows if "was lost" in r["note"]]
    assert len(rerun) == 1 and rerun[0]["host"] == "h1", rows
    for n in range(10):
        folder = results / f"t{n:02d}"
        assert (folder / f"t{n:02d}.count").read_text().strip() == str(n + 1)
        assert (folder / "stdout").read_text() == f"task t{n:02d}\n"
    eventually(_no_job_vms, "the bag's VMs are gone", lab, patience=PATIENCE)
