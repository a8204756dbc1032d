"""Jobs without real guests: HTCondor's argument syntax, the wrapper's argv, the bag
scheduler, what changed in a job directory, exit statuses - and job sessions
through three real nodes (TLS, gossip, control socket) on the fake hypervisor:
files in, command, output out, VMs gone when the session ends, kept with
``keep``, shut down by their host when the owner stops renewing the lease."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tests.fakehv import FakeGuest, files_on
from tests.nodeutil import call, eventually, fake, fast_publish, mesh, port, request, root
from vmmesh.api.jobs import Changed, JobOpen
from vmmesh.api.vm import REQUEST, SHUTDOWN, RequestVms, ShutdownRequest
from vmmesh.errors import (
    CapacityError,
    InternalError,
    JobInputError,
    JobLost,
    JobOutputMissing,
    NoJobVm,
    PackageInstallError,
    UsageError,
    VmmeshError,
)
from vmmesh.jobs import client as jobs
from vmmesh.jobs import service as jobservice
from vmmesh.jobs.bag import Bag
from vmmesh.jobs.condor import parse_arguments, split_packages
from vmmesh.jobs.guestjob import changed, parse_listing
from vmmesh.net.control import connect_control
from vmmesh.net.rpc import LocalContext

__all__ = ["fast_publish", "port", "root"]  # fixtures


# --- HTCondor's argument syntax ----------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "argv"),
    [
        # The examples of the condor_submit manual, new syntax.
        ('"3 simple arguments"', ["3", "simple", "arguments"]),
        ("\"one 'two with spaces' 3\"", ["one", "two with spaces", "3"]),
        ("\"one \"\"two\"\" 'spacey ''quoted'' argument'\"",
         ["one", '"two"', "spacey 'quoted' argument"]),
        # The thesis's form.
        ('"python3 # python3 job.py in.txt"', ["python3", "#", "python3", "job.py", "in.txt"]),
        # An empty argument, runs of blanks, a literal double quote alone.
        ("\"a '' b\"", ["a", "", "b"]),
        ('"  a    b  "', ["a", "b"]),
        ('""""', ['"']),
        ('""', []),
        # The old syntax: no enclosing double quotes, \" a literal double quote.
        ('one \\"two\\" three', ["one", '"two"', "three"]),
    ],
)  # fmt: skip
def test_condor_arguments_split_as_condor_does(line: str, argv: list[str]) -> None:
    assert parse_arguments(line) == argv


@pytest.mark.parametrize("line", ['"a "b"', '"a \'b"', '"\'unterminated"'])
def test_malformed_condor_arguments_are_a_usage_error(line: str) -> None:
    with pytest.raises(UsageError):
        parse_arguments(line)


def _quote(argv: list[str]) -> str:
    """argv in HTCondor's new syntax, every argument single-quoted."""
    parts = ["'" + a.replace("'", "''").replace('"', '""') + "'" for a in argv]
    return '"' + " ".join(parts) + '"'


@given(st.lists(st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")))))
def test_any_argv_survives_condor_quoting(argv: list[str]) -> None:
    assert parse_arguments(_quote(argv)) == argv


def test_the_wrapper_splits_packages_from_the_command() -> None:
    assert split_packages(["python3", "povray", "#", "povray", "+Iscene.pov"]) == (
        ["python3", "povray"],
        ["povray", "+Iscene.pov"],
    )
    # A '#' inside the command is the command's.
    assert (
        split_packages(["#", "sh", "-c", "echo # not a comment"])[1][-1] == "echo # not a comment"
    )
    with pytest.raises(UsageError, match="no '#'"):
        split_packages(["python3", "job.py"])
    with pytest.raises(UsageError, match="nothing after"):
        split_packages(["python3", "#"])
    with pytest.raises(UsageError, match="not a package name"):
        split_packages(["Python 3", "#", "true"])


# --- the bag scheduler ----------------------------------------------------------------------


def test_each_vm_takes_the_next_task_when_it_is_free() -> None:
    bag = Bag(["a", "b", "c"])
    one, two = bag.next("vm1"), bag.next("vm2")
    assert one is not None and two is not None
    assert (one.task, two.task) == ("a", "b")
    assert bag.next("vm1") is None, "one task at a time per VM"
    bag.finished("vm2", 0, 1.0, "h2")
    three = bag.next("vm2")
    assert three is not None and three.task == "c"
    bag.finished("vm1", 0, 2.0, "h1")
    bag.finished("vm2", 0, 1.0, "h2")
    assert bag.done
    assert [(o.task, o.vm, o.attempts) for o in bag.outcomes.values()] == [
        ("b", "vm2", 1),
        ("a", "vm1", 1),
        ("c", "vm2", 1),
    ]


def test_a_failed_task_is_retried_once() -> None:
    bag = Bag(["a"])
    assert bag.next("vm1") is not None
    bag.finished("vm1", 2, 1.0, "h1")
    assert not bag.done
    again = bag.next("vm2")
    assert again is not None and again.attempt == 2
    bag.finished("vm2", 2, 1.0, "h2")
    [outcome] = bag.outcomes.values()
    assert (outcome.exit_code, outcome.attempts) == (2, 2)
    assert "exit 2 on vm1: tried again" in outcome.note


def test_a_task_of_a_lost_vm_runs_elsewhere_without_counting() -> None:
    bag = Bag(["a", "b"])
    assert bag.next("vm1") is not None and bag.next("vm2") is not None
    bag.lost("vm1", "its host went away")
    assert bag.is_lost("vm1") and bag.next("vm1") is None, "a lost VM gets no more"
    bag.finished("vm2", 0, 1.0, "h2")
    rerun = bag.next("vm2")
    assert rerun is not None and (rerun.task, rerun.attempt) == ("a", 1)
    bag.finished("vm2", 0, 1.0, "h2")
    outcome = bag.outcomes[0]
    assert outcome.vm == "vm2" and "vm1 was lost (its host went away)" in outcome.note
    assert not bag.stuck({"vm1", "vm2"})


def test_a_bag_with_every_vm_lost_is_stuck() -> None:
    bag = Bag(["a", "b"])
    assert bag.next("vm1") is not None
    bag.lost("vm1", "gone")
    assert bag.stuck({"vm1"}) and bag.left == 2


# --- what the command changed ----------------------------------------------------------------


def test_changed_names_created_and_modified_entries_only() -> None:
    before = parse_listing("in.txt\tf\t100.0\t5\nold\td\t90.0\t4096\n")
    after = parse_listing(
        "in.txt\tf\t100.0\t5\nold\td\t90.0\t4096\nout.txt\tf\t101.0\t7\n"
        "res\td\t101.0\t4096\nlink\tl\t101.0\t3\nbad line\n"
    )
    assert changed(before, after) == (
        Changed(path="out.txt", kind="file"),
        Changed(path="res", kind="dir"),
    )
    touched = parse_listing("in.txt\tf\t102.0\t9\n")
    assert changed(before, touched) == (Changed(path="in.txt", kind="file"),)


def test_each_failure_has_its_own_exit_status() -> None:
    cases: list[tuple[VmmeshError, int]] = [
        (PackageInstallError("no package x"), 65),
        (JobInputError("no such input file: a"), 66),
        (NoJobVm("no VM for the job"), 69),
        (CapacityError("full"), 69),
        (JobOutputMissing("the job made no 'x'"), 73),
        (JobLost("vm was lost"), 75),
        (InternalError("a broken invariant"), 70),
        (VmmeshError("other"), 71),
    ]
    for exc, status in cases:
        assert jobs.exit_status_of(exc) == status, exc
    statuses = {s for _e, s in cases} | {jobs.EXIT_TIMEOUT}
    for status in statuses:
        assert f"{status:>3}  " in jobs.EXIT_HELP or status in (0,), status


def test_missing_inputs_and_clashing_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(JobInputError, match="absent"):
        jobs.check_inputs((tmp_path / "absent",))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("1")
    (tmp_path / "x").write_text("2")
    with pytest.raises(UsageError, match="same name"):
        jobs.check_inputs((tmp_path / "a" / "x", tmp_path / "x"))


# --- job sessions through real nodes ------------------------------------------------------------


async def test_a_job_session_runs_and_leaves_nothing(
    root: Path, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The VM's disk is gone when run_job returns: what the guest held is looked at as
    # the command starts.
    on_disk: dict[str, bytes] = {}
    spawn = FakeGuest.spawn

    async def spawn_seen(guest: FakeGuest, argv: list[str]) -> int:
        on_disk.update(files_on(guest.disk))
        return await spawn(guest, argv)

    monkeypatch.setattr(FakeGuest, "spawn", spawn_seen)
    async with mesh(root, port, capacity=(0, 1, 0)) as hosts:
        h1, h2, _h3 = hosts
        for h in hosts:
            h.hv.job_seconds = 0.3
        h2.hv.job_exit = 3
        src = root / "in.txt"
        src.write_text("payload")
        spec = jobs.JobSpec(argv=("cat", "in.txt"), packages=frozenset({"perl"}), inputs=(src,))
        out, err = io.BytesIO(), io.BytesIO()
        async with connect_control(h1.cfg.socket_path) as conn:
            result = await jobs.run_job(conn, spec, out=out, err=err, dest=root)
        assert result.exit_code == 3 and result.vm.host == "h2"
        commands = next(
            e for e in h1.node.extensions if isinstance(e, jobservice.JobService)
        ).commands
        assert (commands.ok, commands.failed, commands.running) == (0, 1, 0)  # for the page
        assert out.getvalue() == b"ran cat in.txt\n"
        assert any(p.endswith("/work/in.txt") for p in on_disk), "input sent"
        await eventually(lambda: h2.mgr.list_vms() == [], "the job's VM is gone")


async def test_a_finished_job_returns_with_its_vm_gone(root: Path, port: int) -> None:
    # The session ends with job.end, which answers once the VM is shut down: nothing
    # is left listed ("stopping") when `vmmesh run` has returned.
    async with mesh(root, port, capacity=(0, 1, 0)) as hosts:
        h1, h2, _h3 = hosts
        spec = jobs.JobSpec(argv=("true",))
        async with connect_control(h1.cfg.socket_path) as conn:
            result = await jobs.run_job(conn, spec, out=io.BytesIO(), err=io.BytesIO(), dest=root)
        assert result.exit_code == 0 and result.vm.host == "h2"
        assert h2.mgr.list_vms() == []


async def test_no_vm_for_a_job_is_its_own_error(root: Path, port: int) -> None:
    async with mesh(root, port, capacity=(0, 0, 0)) as hosts:
        spec = jobs.JobSpec(argv=("true",))
        async with connect_control(hosts[0].cfg.socket_path) as conn:
            with pytest.raises(NoJobVm, match="no VM for the job"):
                await jobs.run_job(conn, spec, out=io.BytesIO(), err=io.BytesIO(), dest=root)


async def test_a_users_request_may_not_take_the_job_prefix(root: Path, port: int) -> None:
    async with mesh(root, port) as hosts:
        with pytest.raises(UsageError, match="job-"):
            await request(hosts[0], "job-12345678", 1)


async def test_kept_vms_stay_and_lapsed_leases_end_job_vms(
    root: Path, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobservice.JobService, "lease_seconds", property(lambda self: 1.0))
    monkeypatch.setattr(jobservice, "WATCH_EVERY", 0.1)
    async with mesh(root, port, capacity=(0, 2, 0)) as hosts:
        h1, h2, _h3 = hosts
        kept_list = h2.cfg.data_dir / "jobs-kept.json"
        async with (
            connect_control(h1.cfg.socket_path) as conn,
            jobs.JobClient(conn).session(JobOpen(count=1, keep=True)) as kept,
        ):
            pass
        [vm] = kept.vms
        await trio.sleep(3.0)  # three lease periods: a kept VM is not shut down
        assert [v.name for v in h2.mgr.list_vms()] == [vm.name]
        assert vm.name.rsplit("-", 1)[0] in kept_list.read_text()
        # The VMs of a job whose owner never renews its lease (it crashed first):
        # made as the job service makes them, through the node's own request handler.
        orphan = RequestVms(name="job-0badc0de", count=1)
        local = LocalContext(h1.node.node_id)
        reply = await h1.node.control_handlers.local(REQUEST, local, orphan)
        assert reply.placed == 1 and reply.vms[0].host == "h2"
        await eventually(
            lambda: [v.name for v in h2.mgr.list_vms()] == [vm.name],
            "the owner-less job VM is shut down once its grace ran out",
        )
        # A kept VM shut down by hand drops out of the kept list.
        await call(h1, SHUTDOWN, ShutdownRequest(name=vm.name))
        await eventually(lambda: "job-" not in kept_list.read_text(), "the kept list forgets it")


async def test_a_boot_slower_than_the_lease_does_not_lose_the_job_vms(
    root: Path, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A loaded host (TCG, two cores, other guests) may take longer to boot a job VM
    # than a lease period. The owner cannot name the VMs before the request answers,
    # so the slow host must not count the boot against the lease, and the fast host's
    # VM, made long before, must not lapse while the request waits for the slow one.
    monkeypatch.setattr(jobservice.JobService, "lease_seconds", property(lambda self: 1.0))
    monkeypatch.setattr(jobservice, "WATCH_EVERY", 0.1)
    hvs = [fake(), fake(), fake(agent_seconds=4.0)]
    async with mesh(root, port, capacity=(0, 1, 1), hypervisors=hvs) as hosts:
        _h1, h2, h3 = hosts
        async with (
            connect_control(hosts[0].cfg.socket_path) as conn,
            jobs.JobClient(conn).session(JobOpen(count=2)) as session,
        ):
            assert sorted(v.host for v in session.vms) == ["h2", "h3"]
            await trio.sleep(3.0)  # the owner now renews by name
            assert len(h2.mgr.list_vms()) == 1
            assert len(h3.mgr.list_vms()) == 1


async def test_a_job_for_an_unknown_package_fails_with_the_install_error(
    root: Path, port: int
) -> None:
    # The request runs beside the lease renewer: its error must come out as itself
    # (exit 65 and one line naming the package), not as a group of errors.
    async with mesh(root, port) as hosts:
        with pytest.raises(PackageInstallError, match="no-such-package"):
            async with (
                connect_control(hosts[0].cfg.socket_path) as conn,
                jobs.JobClient(conn).session(
                    JobOpen(count=1, packages=frozenset({"no-such-package"}))
                ),
            ):
                pass
