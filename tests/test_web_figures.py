"""The figures behind /metrics and the page's bars: VMs sampled in the background
(``vmstats``), gossip traffic counted (``net.traffic``), transfers, migrations and jobs
under way, as series and in the page's snapshot."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from tests.test_web import (
    FIGURES,
    FakeNode,
    FakePool,
    _figures,
    _hosts,
    _peer_rows,
    _samples,
    _vm,
    _web_service,
)
from vmmesh.api.codec import Empty
from vmmesh.api.common import Progress
from vmmesh.api.figures import Figure, counter, gauge
from vmmesh.api.host import WorkKind
from vmmesh.api.node import PEERS, STATUS, PeersReply, StatusReply
from vmmesh.jobs.service import JobService
from vmmesh.jobs.service import Session as JobSession
from vmmesh.mesh import pki
from vmmesh.migrate.service import MigrateService
from vmmesh.net.rpc import Context, Handlers, LocalContext
from vmmesh.net.traffic import CountingHandlers, Traffic, body_size
from vmmesh.transfer.service import TransferService
from vmmesh.vmservice.service import VmService
from vmmesh.web.metrics import published, render
from vmmesh.web.service import LOOK_EVERY
from vmmesh.web.vmstats import (
    LOOK_TIMEOUT,
    SAMPLE_EVERY,
    Sampler,
    blockstats_totals,
    parse_proc_stat,
    read_proc,
)
from vmmesh_cli.cmd_peers import figure_lines


@pytest.fixture
def mesh(tmp_path: Path) -> pki.Identity:
    return pki.init_mesh(tmp_path / "a" / "pki", "alpha")


# --- reading /proc and QMP (pure) -------------------------------------------------

STAT = "4242 (qemu-system-x86 (a) b) S 1 2 3 0 -1 4194560 9 0 0 0 250 50 0 0 20 0 5 0 77 " + (
    "1000000 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0"
)


def test_proc_stat_fields_count_from_the_last_parenthesis() -> None:
    cpu, rss = parse_proc_stat(STAT, clock_ticks=100, page_size=4096)
    assert cpu == 3.0  # (250 + 50) ticks at 100 Hz
    assert rss == 2560 * 4096


@pytest.mark.parametrize("text", ["", "no parenthesis 1 2 3", "1 (x) S 1 2"])
def test_a_line_that_is_no_stat_line_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_proc_stat(text, 100, 4096)


def test_this_process_can_be_read() -> None:
    got = read_proc(os.getpid())
    assert got is not None and got[0] > 0 and got[1] > 0


def test_blockstats_are_summed_over_the_drives() -> None:
    reply = [
        {"device": "d0", "stats": {"rd_bytes": 10, "wr_bytes": 20, "rd_operations": 1}},
        {"device": "", "node-name": "x", "stats": {"rd_bytes": 5, "wr_operations": 3}},
    ]
    assert blockstats_totals(reply) == (15, 20, 1, 3)


@pytest.mark.parametrize(
    "reply", [{}, [{"device": "d0"}], [{"stats": {"rd_bytes": -1}}], [{"stats": {"wr_bytes": "9"}}]]
)
def test_a_blockstats_reply_of_another_shape_is_refused(reply: object) -> None:
    with pytest.raises(ValueError):
        blockstats_totals(reply)


# --- the sampler ------------------------------------------------------------------


@dataclass
class FakeMonitor:
    """A guest whose monitor answers ``reads`` bytes read, or hangs when ``hang``."""

    name: str
    pid: int
    reads: int = 0
    hang: bool = False
    fail: bool = False
    asked: list[str] = field(default_factory=list)

    async def qmp(self, execute: str, arguments: dict[str, Any] | None = None) -> Any:
        self.asked.append(execute)
        if self.hang:
            await trio.sleep_forever()
        if self.fail:
            raise OSError("monitor gone")
        return [{"device": "d0", "stats": {"rd_bytes": self.reads, "wr_bytes": 7}}]


@dataclass
class NoMonitor:
    """A fake hypervisor's guest: a pid that is not a QEMU process, and no monitor."""

    name: str
    pid: int


async def test_the_sampler_keeps_each_guests_last_figures(autojump_clock: Any) -> None:
    web_1 = FakeMonitor("1f114cbacf387358", 11, reads=100)  # a guest's name is not the VM's
    slow = FakeMonitor("2f114cbacf387358", 12, hang=True)
    guests: dict[str, object] = {"a": web_1, "b": slow, "c": NoMonitor("fake-1", 13)}
    procs = {11: (1.5, 1 << 20), 12: (2.0, 2 << 20), 13: (9.0, 9)}
    sampler = Sampler(lambda: guests, proc=procs.get)
    t0 = trio.current_time()
    await sampler.look()
    assert trio.current_time() - t0 == pytest.approx(LOOK_TIMEOUT)  # the hung one, bounded
    assert sampler.latest["a"].read_bytes == 100 and sampler.latest["a"].cpu_seconds == 1.5
    assert sampler.latest["a"].vm == "a"  # named as the VM service names it
    assert sampler.latest["b"].cpu_seconds == 2.0 and sampler.latest["b"].read_bytes == 0
    assert "c" not in sampler.latest  # no monitor: not sampled, its pid not read

    web_1.reads, web_1.fail = 500, True  # a look that fails keeps the last disk figures
    procs[11] = (3.0, 1 << 20)
    await sampler.look()
    assert (sampler.latest["a"].cpu_seconds, sampler.latest["a"].read_bytes) == (3.0, 100)

    web_1.pid = 21  # a new QEMU process (resumed, migrated back): its counters start again
    procs[21] = (0.1, 1 << 20)
    await sampler.look()
    assert (sampler.latest["a"].pid, sampler.latest["a"].read_bytes) == (21, 0)

    del procs[12]  # QEMU gone: the VM leaves the figures
    web_1.fail = False
    await sampler.look()
    assert set(sampler.latest) == {"a"} and sampler.latest["a"].read_bytes == 500

    # between two rounds: a VM that left (migrated away, stopped) is reported no more
    assert [u.vm for u in sampler.current()] == ["a"]
    del guests["a"]
    assert sampler.current() == [] and "a" in sampler.latest


async def test_the_sampler_looks_every_few_seconds(autojump_clock: Any) -> None:
    guest = FakeMonitor("web-1", 11)
    sampler = Sampler(lambda: {"a": guest}, proc=lambda pid: (1.0, 1))
    with trio.move_on_after(SAMPLE_EVERY * 3 + 1):
        await sampler.run()
    assert sampler.looks == 4 and guest.asked == ["query-blockstats"] * 4


# --- gossip traffic ----------------------------------------------------------------


async def test_served_and_made_calls_are_counted_with_their_body_sizes() -> None:
    traffic = Traffic()
    handlers = Handlers()

    async def status(ctx: Context, body: Empty) -> StatusReply:
        return _figures().status

    CountingHandlers(handlers, traffic).add(STATUS, status)
    reply = await handlers.local(STATUS, LocalContext("a" * 32), Empty())
    size = len(msgpack.packb(reply.to_wire(), use_bin_type=True))
    assert body_size(reply) == size
    assert (traffic.messages_in, traffic.messages_out) == (1, 1)
    assert (traffic.bytes_in, traffic.bytes_out) == (body_size(Empty()), size)

    async def call(method: Any, request: Empty) -> StatusReply:
        return await handlers.local(method, LocalContext("a" * 32), request)

    await traffic.call(call, STATUS, Empty())
    assert traffic.messages_out == 3 and traffic.messages_in == 3  # served twice, made once
    assert traffic.bytes_in == 2 * body_size(Empty()) + size


# --- the series and the snapshot ---------------------------------------------------------


def test_the_vms_transfers_jobs_and_gossip_series() -> None:
    samples = _samples(render(_figures()).decode())
    web_1 = (("host", "alpha"), ("vm", "web-1"))
    assert samples[("vmmesh_vm_cpu_seconds_total", web_1)] == 12.5
    assert samples[("vmmesh_vm_resident_memory_bytes", web_1)] == 300 << 20
    assert samples[("vmmesh_vm_disk_read_bytes_total", web_1)] == 5 << 20
    assert samples[("vmmesh_vm_disk_writes_total", web_1)] == 8
    assert samples[("vmmesh_transfer_received_bytes_total", ())] == 7 << 20
    assert samples[("vmmesh_transfers_active", ())] == 1
    assert samples[("vmmesh_migrations_active", ())] == 1
    assert samples[("vmmesh_jobs", (("state", "running"),))] == 1
    assert samples[("vmmesh_jobs", (("state", "placing"),))] == 0
    assert samples[("vmmesh_job_commands_total", (("result", "ok"),))] == 5
    assert samples[("vmmesh_gossip_messages_total", (("direction", "out"),))] == 12
    assert samples[("vmmesh_gossip_bytes_total", (("direction", "in"),))] == 900
    assert not any(name.startswith("vmmesh_vm_network") for name, _ in samples)


@dataclass
class Commands:
    running: int = 1
    ok: int = 3
    failed: int = 1
    lost: int = 0


@dataclass
class Session:
    job_id: str
    name: str
    vms: dict[str, str]
    opened: float
    state: str
    commands: Commands = field(default_factory=Commands)
    tasks: int = 0


@dataclass
class Jobs:
    sessions: dict[str, Session]


@dataclass
class UnderWay:
    active: dict[Any, Progress]
    targets: dict[str, str] = field(default_factory=dict)


async def test_the_work_under_way_goes_into_gossip_and_every_hosts_row_shows_it(
    tmp_path: Path, mesh: pki.Identity
) -> None:
    node = FakeNode(mesh, tmp_path / "a", _hosts(), FakePool({}))
    web = await _web_service(node, "10.0.0.1")
    odd = "<img src=x>"
    fetch = Progress(
        task=f"template {odd}", phase="fetching", fraction=0.27, done=1234567, total=4 << 20
    )
    web.transfers = UnderWay({0: fetch})
    move = Progress(task="web-1", phase="mirroring", note="to beta")
    web.migrations = UnderWay({"web-1": move}, {"web-1": "beta"})
    web.jobs = Jobs(
        {"j": Session("ab" * 8, "job-abababab", {"job-abababab-1": "x"}, 5.0, "running")}
    )
    web.publish(node)  # type: ignore[arg-type]
    work = node.published.work
    by_kind = {w.kind: w for w in work}
    assert by_kind[WorkKind.FETCH].name == f"template {odd}"  # as text: the page sets it so
    assert by_kind[WorkKind.FETCH].fraction == 0.25 and by_kind[WorkKind.FETCH].done == 1200000
    assert by_kind[WorkKind.MIGRATION].peer == "beta"
    job = by_kind[WorkKind.JOB]
    assert (job.name, job.phase, job.done, job.total, job.failed, job.vms) == (
        "job-abababab", "running", 4, 5, 1, 1,
    )  # fmt: skip
    assert job.started == 5.0  # a job: when it was opened
    # a bag said how many tasks it has: those not started yet count in its total
    web.jobs = Jobs({"j": Session("cd" * 8, "bag", {}, 5.0, "running", tasks=20)})
    web.publish(node)  # type: ignore[arg-type]
    later = node.published.work
    [bag] = [w for w in later if w.kind is WorkKind.JOB]
    assert (bag.done, bag.total, bag.fraction) == (4, 20, 0.2)

    hosts = [replace(h, work=work if i == 1 else ()) for i, h in enumerate(_hosts())]

    async def peers(ctx: Context, body: Empty) -> PeersReply:
        return _peer_rows(hosts)

    web._control.add(PEERS, peers)
    snap = json.loads(await web.snapshot())
    beta = next(h for h in snap["hosts"]["hosts"] if h["name"] == "beta")
    assert [w["kind"] for w in beta["work"]] == [w.kind.value for w in work]  # another host's
    assert snap["usage"] == []  # no guests given: no sampler
    assert "migrations" in {f["name"] for f in snap["status"]["figures"]}  # the page's source


# --- the extensions' figures: one seam for status, the page and /metrics -------------


def _by_name(figures: Sequence[Figure]) -> dict[tuple[str, tuple[str, ...]], float]:
    return {(f.name, tuple(f.labels.values())): f.value for f in figures}


def test_the_extensions_publish_their_counters_as_figures() -> None:
    vms = VmService()
    migrate, transfers, jobs = MigrateService(vms), TransferService(vms), JobService(vms)
    migrate.migrated, migrate.failed = 4, 1
    migrate.active["web-1"] = Progress(task="web-1", phase="mirroring")
    transfers.received_bytes, transfers.sent_bytes = 5 << 20, 1 << 20
    jobs.commands.ok, jobs.commands.lost, jobs.commands.running = 7, 1, 2
    placing = JobSession("ab" * 8, "job-abababab", keep=False)
    held = JobSession("cd" * 8, "job-cdcdcdcd", keep=False, vms={"job-cdcdcdcd-1": "x"})
    jobs.sessions = {"a": placing, "b": held}
    figures = [*migrate.figures(), *transfers.figures(), *jobs.figures()]
    got = _by_name(figures)
    assert got[("migrations", ("done",))] == 4 and got[("migrations_active", ())] == 1
    assert got[("transfer_received_bytes", ())] == 5 << 20 and got[("transfers_active", ())] == 0
    assert got[("jobs", ("placing",))] == 1 and got[("jobs", ("running",))] == 1
    assert got[("jobs", ("ending",))] == 0
    assert got[("job_commands", ("lost",))] == 1 and got[("job_commands_running", ())] == 2
    status = replace(_figures().status, figures=tuple(figures))
    assert StatusReply.from_wire(status.to_wire()) == status  # they travel in the status reply
    samples = _samples(render(replace(_figures(), status=status)).decode())
    assert samples[("vmmesh_transfer_received_bytes_total", ())] == 5 << 20
    assert samples[("vmmesh_job_commands_total", (("result", "ok"),))] == 7
    assert samples[("vmmesh_jobs", (("state", "placing"),))] == 1


def test_configured_memory_is_a_series_of_its_own() -> None:
    fig = replace(_figures(), vms=[replace(_vm("web-1", "running"), memory_mb=512, vcpus=2)])
    samples = _samples(render(fig).decode())
    web_1 = (("host", "alpha"), ("vm", "web-1"))
    assert samples[("vmmesh_vm_memory_bytes", web_1)] == 512 << 20
    assert samples[("vmmesh_vm_vcpus", web_1)] == 2


async def test_this_hosts_own_new_vm_reaches_the_task_log_without_a_gossip_event(
    tmp_path: Path, mesh: pki.Identity, autojump_clock: Any
) -> None:
    hosts = _hosts()
    web = await _web_service(FakeNode(mesh, tmp_path / "a", hosts, FakePool({})), "10.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(web._look_at_vms)
        await trio.sleep(LOOK_EVERY / 2)
        woke = web._changed
        hosts[0] = replace(hosts[0], vms=(*hosts[0].vms, "web-2"))  # this host: no event
        await trio.sleep(LOOK_EVERY)
        nursery.cancel_scope.cancel()
    assert [e["text"] for e in web.events.rows()] == ["VM web-2 on alpha"]
    assert woke.is_set()  # the open pages were woken


async def test_work_under_way_wakes_the_page_every_second(
    tmp_path: Path, mesh: pki.Identity, autojump_clock: Any
) -> None:
    web = await _web_service(FakeNode(mesh, tmp_path / "a", _hosts(), FakePool({})), "10.0.0.1")
    web.migrations = UnderWay({})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(web._look_at_vms)
        await trio.sleep(LOOK_EVERY / 2)
        idle = web._changed
        await trio.sleep(LOOK_EVERY)
        assert not idle.is_set()  # nothing changed, nothing under way: no wake-up
        web.migrations.active["web-1"] = Progress(task="web-1", phase="mirroring")
        busy = web._changed
        await trio.sleep(LOOK_EVERY)
        assert busy.is_set()  # the bar moves without waiting for the 2 s push
        before = web.changes()
        await trio.sleep(2.0)
        assert web.changes() - before <= 3  # about once a second, not at every look
        nursery.cancel_scope.cancel()


def test_vmmesh_status_prints_each_figure_name_on_one_line() -> None:
    lines = dict(figure_lines(FIGURES))
    assert lines["gossip messages"] == "in 10, out 12"
    assert lines["gossip bytes"] == "in 0.9 kB"
    assert lines["migrations"] == "done 3, failed 1"
    assert lines["transfer received bytes"] == "7 MB"


def test_a_figure_whose_labels_differ_from_its_names_first_is_left_out() -> None:
    figures = [
        counter("moves", "Moves.", 1, result="done"),
        counter("moves", "Moves.", 2, result="failed"),
        counter("moves", "Moves.", 9, result="done", why="x"),  # another label set: not kept
        gauge("queue", "Queue.", 4),
    ]
    families = list(published(figures))
    assert [f.name for f in families] == ["vmmesh_moves", "vmmesh_queue"]
    assert [(s.labels, s.value) for s in families[0].samples] == [
        ({"result": "done"}, 1.0),
        ({"result": "failed"}, 2.0),
    ]
