"""The mesh coordination of VMs (``vmmesh.vmservice.service``) through three real nodes
in one trio run: loopback addresses 127.0.0.1-3, static seeds, real mutual
TLS and gossip, the control socket - and a fake hypervisor, so that each test
takes seconds.  The same scenarios as tests/test_mesh_vms.py (real processes,
QEMU), minus the machines.

Each host offers two VM slots unless a test says otherwise.  Slots are set by
vCPUs (``cpu_overcommit`` so that the host offers exactly N default-size
VMs): running VMs count against vCPUs by what they were given, while the
storage quota counts them only by what their overlays really hold (see
``test_disk_quota_counts_running_vms``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.fakehv import FAKE_HOST_KEY
from tests.nodeutil import (
    ALLOWANCE,
    REPO,
    BuildFailsHypervisor,
    Host,
    building,
    call,
    eventually,
    fake,
    fast_publish,
    mesh,
    overlays,
    per_host,
    port,
    request,
    root,
)
from vmmesh.api.codec import Empty
from vmmesh.api.common import Progress
from vmmesh.api.vm import (
    EXEC,
    LIST,
    SHUTDOWN,
    SSH,
    TEMPLATES,
    ExecRequest,
    RequestReport,
    ShareRequest,
    ShutdownRequest,
    SshRequest,
)
from vmmesh.errors import NotFound, PackageInstallError, UsageError
from vmmesh.net.rpc import LocalContext

__all__ = ["fast_publish", "port", "root"]  # fixtures


# --- scenarios ------------------------------------------------------------------------


async def test_request_prefers_the_host_with_the_template(root: Path, port: int) -> None:
    """The thesis example: B holds {povray, perl} and has room for two."""
    async with mesh(root, port) as hosts:
        h1, h2, _h3 = hosts
        got = await h2.mgr.templates.ensure_template(["povray", "perl"])
        tpl, built, _ = got.record, got.built, got.timings
        assert built and tpl is not None
        await eventually(
            lambda: any(t.packages == {"povray", "perl"} for t in h1.view()["h2"].templates),
            "h1 learns h2's template",
        )
        items: list[Progress] = []
        reply = await request(h1, "web", 3, "povray", "perl", items=items)
        assert reply.placed == 3 and reply.unplaced == (), reply
        assert reply.plan[0].host == "h2"
        assert reply.plan[0].match == "exact"
        hosts_of = sorted(v.host for v in reply.vms)
        assert hosts_of.count("h2") == 2 and len(set(hosts_of)) == 2, reply
        assert sorted(v.name for v in reply.vms) == ["web-1", "web-2", "web-3"]
        for v in reply.vms:
            assert v.template == tpl.template_id
            assert v.seconds >= 0 and v.seconds_end_to_end >= 0
        assert not any(v.built for v in reply.vms if v.host == "h2"), "h2 reused"
        [other] = [v for v in reply.vms if v.host != "h2"]
        # the other host lacked the template: it fetched it from h2 (faster here)
        assert other.source.how == "fetched" and "fetch" in other.phases, other
        assert {i.task for i in items} >= {"h2", other.host}, "progress of each host"
        assert reply.errors == () and reply.notes == ()
        assert per_host(hosts)["h2"] == 2


async def test_request_prefers_a_holder_with_a_warm_state(root: Path, port: int) -> None:
    """h2 and h3 hold the template; only h3 saved a warm boot of it (gossiped with its
    inventory): h3 gets the VM, though h2 has more free slots, and the VM resumes."""
    async with mesh(root, port, capacity=(2, 3, 2)) as hosts:
        h1, h2, h3 = hosts
        h2.mgr.warm_enabled = False
        for h in (h2, h3):
            rec = (await h.mgr.templates.ensure_template(["perl"])).record
            h.mgr.schedule_warm(rec)  # as a request does once its VMs run
        tid = h3.mgr.templates.records()[0].template_id
        await eventually(
            lambda: (
                [t.warm for t in h1.view()["h3"].templates] == [True]
                and [t.warm for t in h1.view()["h2"].templates] == [False]
            ),
            "h1 learns that h3's template is warm and h2's is not",
        )
        reply = await request(h1, "hot", 1, "perl")
        [vm] = reply.vms
        assert (vm.host, vm.template, vm.start) == ("h3", tid, "warm"), reply
        assert reply.plan[0].reason.endswith("; warm start"), reply.plan


async def test_fill_then_spill_then_unplaced(root: Path, port: int) -> None:
    async with mesh(root, port) as hosts:
        h1 = hosts[0]
        reply = await request(h1, "fill", 3, "perl")
        assert [s.count for s in reply.plan] == [2, 1], reply
        assert sorted(per_host(hosts).values()) == [0, 1, 2]
        # Three slots are left; gossip may still show the old figures.
        reply = await request(h1, "more", 4, "perl")
        assert reply.placed == 3, reply
        [unplaced] = reply.unplaced
        assert unplaced.count == 1 and "no capacity" in unplaced.reason, reply
        assert per_host(hosts) == {"h1": 2, "h2": 2, "h3": 2}
        assert all(h.mgr.capacity().free_slots == 0 for h in hosts)
        names = [v.name for h in hosts for v in h.mgr.list_vms()]
        assert sorted(n for n in names if n.startswith("fill-")) == ["fill-1", "fill-2", "fill-3"]
        # Unique names; a share refused on stale gossip burns its indices (gaps).
        more = [n for n in names if n.startswith("more-")]
        assert len(more) == len(set(more)) == 3, names
        # A dry run plans without making anything.
        await eventually(
            lambda: all(v.capacity.free_slots == 0 for v in h1.view().values()),
            "h1 sees the mesh full",
        )
        dry = await request(h1, "dry", 2, dry_run=True)
        assert dry.dry_run and dry.unplaced[0].count == 2


async def test_failed_share_is_replaced(root: Path, port: int) -> None:
    """h3 (most room, so first choice) cannot build: its share moves to h2."""
    hvs = [
        fake(),
        fake(),
        BuildFailsHypervisor(
            repo_packages=REPO, agent_seconds=0.01, install_seconds=0.01, shutdown_seconds=0.01
        ),
    ]
    async with mesh(root, port, (0, 3, 4), hypervisors=hvs) as hosts:
        h1, _h2, h3 = hosts
        reply = await request(h1, "fail", 3, "perl")
        assert reply.plan[0].host == "h3", reply
        assert [v.host for v in reply.vms] == ["h2"] * 3, reply
        assert any("h3" in n and "re-placed" in n for n in reply.notes), reply
        assert reply.unplaced == ()
        assert h3.mgr.list_vms() == [] and h3.mgr.list_templates() == []
        assert building(hosts) == []
        assert h3.mgr.capacity().free_slots == 4, "h3 released its reservation"
        assert per_host(hosts) == {"h1": 0, "h2": 3, "h3": 0}


async def test_host_cancelled_mid_request_is_replaced(root: Path, port: int) -> None:
    """h3's node stops while it builds its share: the coordinator re-places it."""
    hvs = [fake(), fake(), fake(install_seconds=60.0)]
    async with mesh(root, port, (0, 3, 4), hypervisors=hvs) as hosts:
        h1, _h2, h3 = hosts
        done: dict[str, RequestReport] = {}

        async def go() -> None:
            done["reply"] = await request(h1, "kill", 3, "perl")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(go)
            await eventually(lambda: h3.hv.started, "h3 starts building its share")
            h3.scope.cancel()
        reply = done["reply"]
        assert [v.host for v in reply.vms] == ["h2"] * 3, reply
        assert any("h3" in n and "re-placed" in n for n in reply.notes), reply
        assert reply.unplaced == ()
        assert building([h3]) == [], "h3 abandoned its half-built template"


async def test_concurrent_requests_never_overcommit(root: Path, port: int) -> None:
    async with mesh(root, port) as hosts:
        h1, h2, _h3 = hosts
        results: dict[str, RequestReport] = {}

        async def go(host: Host, name: str) -> None:
            results[name] = await request(host, name, 4, "vmm-test-a")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(go, h1, "c1")
            nursery.start_soon(go, h2, "c2")
        counts = per_host(hosts)
        assert all(n <= 2 for n in counts.values()), (counts, results)
        placed = sum(len(r.vms) for r in results.values())
        assert placed == sum(counts.values()) == 6, (results, counts)
        unplaced = sum(u.count for r in results.values() for u in r.unplaced)
        assert unplaced == 2, results
        assert all(h.mgr.capacity().free_slots == 0 for h in hosts)


async def test_list_exec_and_shutdown_across_the_mesh(root: Path, port: int) -> None:
    async with mesh(root, port) as hosts:
        h1, _h2, h3 = hosts
        reply = await request(h1, "web", 3, "povray", "perl")
        assert reply.placed == 3
        made = {v.name: v.host for v in reply.vms}

        listed = await call(h3, LIST, Empty())
        assert listed.errors == ()
        rows = [v for v in listed.vms if v.request == "web"]
        assert {v.name: v.host for v in rows} == made
        assert all(v.packages == {"perl", "povray"} and v.state == "running" for v in rows)

        templates = await call(h3, TEMPLATES, Empty())
        builders = {v.host for v in reply.vms if v.built}
        assert {t.host for t in templates.templates} == builders
        assert all(t.packages == {"perl", "povray"} for t in templates.templates)
        tid = templates.templates[0].template_id
        await eventually(
            lambda: (
                {h.name for h in h3.node.hosts() for x in h.templates if x.template_id == tid}
                == builders
            ),
            "h3 learns who holds the template",
        )
        templates = await call(h3, TEMPLATES, Empty())
        assert all(set(t.holders) == builders for t in templates.templates)

        # exec reaches a VM on another host, by VM name and by request name.
        remote = next(n for n, h in made.items() if h != "h3")
        await eventually(lambda: remote in h3.view()[made[remote]].vms, "h3 learns the VMs")
        argv = ["cat", "/usr/share/vmm-test/povray"]
        out = await call(h3, EXEC, ExecRequest(name=remote, argv=tuple(argv)))
        assert out.exit_code == 0 and out.stdout == b"povray"
        out = await call(h3, EXEC, ExecRequest(name="web", argv=("cat", "/nope")))
        assert out.exit_code == 1
        with pytest.raises(NotFound):
            await call(h3, EXEC, ExecRequest(name="ghost", argv=("true",)))

        # ssh: the caller's key lands in the VM on its own host; the answer says
        # where to dial (the owner's gossiped address) and pins the guest's host key.
        user_key = FAKE_HOST_KEY + " alice@laptop"
        access = await call(h3, SSH, SshRequest(name=remote, keys=(user_key,)))
        owner = next(h for h in hosts if h.name == made[remote])
        assert access.address == owner.cfg.listen and access.host == owner.name
        assert access.vm == remote and access.host_key == f"{FAKE_HOST_KEY} root@" + (
            owner.mgr.get(remote).vm_id
        )
        assert access.port == owner.mgr.get(remote).ssh_port > 0
        guest = owner.hv.running[owner.mgr.get(remote).vm_id]
        assert guest.authorized_keys == [user_key]
        with pytest.raises(UsageError):
            await call(h3, SSH, SshRequest(name=remote, keys=("ssh-ed25519 garbage",)))
        ports = [v.ssh_port for v in (await call(h1, LIST, Empty())).vms if v.host == owner.name]
        assert len(set(ports)) == len(ports), "VMs of one host never share a forward port"

        # shutdown by name from a third host stops all three, wherever they run.
        stopped = await call(h3, SHUTDOWN, ShutdownRequest(name="web"))
        assert len(stopped.removed) == 3 and stopped.errors == (), stopped
        assert {r.state for r in stopped.removed} == {"running"}
        assert (await call(h1, LIST, Empty())).vms == ()
        assert overlays(hosts) == [], "overlays deleted"
        assert all(not h.hv.running for h in hosts)
        again = await call(h1, TEMPLATES, Empty())
        assert len(again.templates) == len(builders), "the templates stay"
        with pytest.raises(NotFound, match="no VM called 'web' in the mesh"):
            await call(h3, SHUTDOWN, ShutdownRequest(name="web"))


async def test_unknown_package_fails_the_request_and_leaves_nothing(root: Path, port: int) -> None:
    async with mesh(root, port) as hosts:
        h1 = hosts[0]
        with pytest.raises(PackageInstallError, match="no-such-package"):
            await request(h1, "bad", 3, "perl", "no-such-package")
        for h in hosts:
            assert h.mgr.list_vms() == [] and h.mgr.list_templates() == []
            assert h.mgr.capacity().free_slots == 2, f"{h.name} released its reservation"
        assert building(hosts) == [] and overlays(hosts) == []
        assert all(not h.hv.running for h in hosts)


async def test_disk_quota_counts_running_vms(root: Path, port: int) -> None:
    """Quota for two VM disks: two running VMs should leave no disk slot."""
    quota = 2 * ALLOWANCE + 64
    async with mesh(root, port, (4, 4, 4), storage_quota_mb=quota) as hosts:
        h1 = hosts[0]
        assert h1.mgr.capacity().free_slots == 2
        share = ShareRequest(request_id="1", name="q", count=2)
        reply = await h1.svc.local.share(LocalContext(h1.node.node_id), share)
        assert reply.granted == 2 and len(reply.vms) == 2
        assert h1.mgr.capacity().free_slots == 0


async def test_failed_share_releases_its_reservation_once(root: Path, port: int) -> None:
    """A share that fails must not give back slots another request holds."""
    async with mesh(root, port) as hosts:
        h1 = hosts[0]
        assert h1.mgr.reserve(1) == 1, "another request's share in flight"
        with pytest.raises(PackageInstallError):
            share = ShareRequest(request_id="1", name="bad", count=1, packages=frozenset({"nope"}))
            await h1.svc.local.share(LocalContext(h1.node.node_id), share)
        assert h1.mgr.capacity().free_slots == 1, "the other request keeps its slot"


async def test_package_missing_on_one_host_only(root: Path, port: int) -> None:
    """h3's apt sources lack povray, h2's have it: no VM may be left unreported."""
    hvs = [fake(), fake(), fake(repo_packages=frozenset({"perl"}))]
    async with mesh(root, port, (0, 2, 3), hypervisors=hvs) as hosts:
        h1 = hosts[0]
        try:
            reply = await request(h1, "mixed", 5, "povray")
        except PackageInstallError:
            assert per_host(hosts) == {"h1": 0, "h2": 0, "h3": 0}, "VMs left behind"
        else:
            assert sorted(v.host for v in reply.vms) == ["h2", "h2"], reply
            assert any("h3" in n for n in reply.notes), reply
            assert reply.unplaced[0].count == 3
