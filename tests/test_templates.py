"""Templates: the parent choice (pure) and building against the fake hypervisor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from tests.fakehv import FakeHypervisor, chain_of, make_base_image, packages_on
from vmmesh.errors import (
    HypervisorError,
    NotFound,
    PackageInstallError,
    PackageSourceError,
    UsageError,
)
from vmmesh.host.apt import dpkg_errors, missing_packages, source_problem
from vmmesh.host.build import BaseImage
from vmmesh.host.store import Store
from vmmesh.host.templates import (
    BUILDING_PREFIX,
    TemplateManager,
    TemplateRecord,
    choose_parent,
    template_id,
)
from vmmesh.hypervisor.base import BootSpec

REPO = frozenset({"vmm-test-a", "vmm-test-b", "vmm-test-c", "vmm-test-d", "a", "b", "c", "d"})


def rec(tid: str, pkgs: set[str], depth: int = 1, state: str = "ready") -> TemplateRecord:
    return TemplateRecord(
        template_id=tid,
        parent_id=None,
        base_image_id="ba5e" * 16,
        packages=frozenset(pkgs),
        disk=f"{tid}.qcow2",
        size=0,
        sha256="",
        chain=(),
        depth=depth,
        state=state,
        created=0.0,
    )


# --- choose_parent ---------------------------------------------------------


def test_partial_match_takes_most_packages_in_common() -> None:
    ts = [rec("aa", {"a"}), rec("ab", {"a", "b"})]
    choice = choose_parent(ts, {"a", "b", "c"})
    assert choice.parent is not None
    assert choice.parent.template_id == "ab"
    assert choice.missing == {"c"}
    assert not choice.full


def test_full_match_smallest_first_exact_beats_superset() -> None:
    ts = [rec("abc", {"a", "b", "c"}), rec("ab", {"a", "b"}), rec("abd", {"a", "b", "d"})]
    choice = choose_parent(ts, {"a", "b"})
    assert choice.full and choice.parent is not None
    assert choice.parent.template_id == "ab"
    choice = choose_parent(ts[:1] + ts[2:], {"a", "b"})
    assert choice.full and choice.parent is not None
    assert choice.parent.template_id == "abc"  # tie on size: smaller id


def test_nothing_in_common_starts_from_base() -> None:
    choice = choose_parent([rec("dd", {"d"})], {"a"})
    assert choice.parent is None
    assert choice.missing == {"a"}


def test_ties_prefer_fewer_extras_then_shallower() -> None:
    ts = [rec("x1", {"a", "z", "y"}), rec("x2", {"a", "z"}, depth=3), rec("x3", {"a", "q"})]
    choice = choose_parent(ts, {"a", "b"})
    assert choice.parent is not None and choice.parent.template_id == "x3"


def test_building_templates_are_ignored() -> None:
    choice = choose_parent([rec("ab", {"a", "b"}, state="building")], {"a", "b"})
    assert choice.parent is None and not choice.full


def test_template_id_is_order_free_and_base_bound() -> None:
    assert template_id("b" * 64, ["x", "y"]) == template_id("b" * 64, ["y", "x", "x"])
    assert template_id("b" * 64, ["x"]) != template_id("c" * 64, ["x"])
    assert len(template_id("b" * 64, ["x"])) == 32


def test_missing_packages_parses_apt() -> None:
    out = (
        "Reading package lists...\n"
        "E: Unable to locate package nope-1\n"
        "E: Package 'gone' has no installation candidate\n"
        "E: Unable to locate package nope-1\n"
    )
    assert missing_packages(out) == ["nope-1", "gone"]
    assert missing_packages("E: dpkg was interrupted\n") == []


# --- building with the fake hypervisor -----------------------------------


@pytest.fixture
def hv() -> FakeHypervisor:
    return FakeHypervisor(repo_packages=REPO)


def manager(store: Store, hv: FakeHypervisor, tmp_path: Path, **kw: object) -> TemplateManager:
    image_dir = tmp_path / "data" / "images" / "base"
    image_dir.mkdir(parents=True, exist_ok=True)
    manifest = make_base_image(image_dir)
    return TemplateManager(
        store=store,
        hypervisor=hv,
        data_dir=tmp_path / "data",
        base=BaseImage(image_dir, manifest),
        **kw,  # type: ignore[arg-type]
    )


def leftovers(tm: TemplateManager) -> list[str]:
    return sorted(p.name for p in tm.dir.iterdir() if p.name.startswith(BUILDING_PREFIX))


async def test_build_then_reuse(
    store: Store, hv: FakeHypervisor, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    tm = manager(store, hv, tmp_path, apt_sources=["deb [trusted=yes] http://10.0.2.2:1/ ./"])
    phases: list[str] = []
    first = await tm.ensure_template(["vmm-test-b", "vmm-test-a"], lambda p, f: phases.append(p))
    t, built, timings = first.record, first.built, first.timings
    assert built and t is not None
    assert t.template_id == template_id(tm.base.image_id, ["vmm-test-a", "vmm-test-b"])
    assert t.state == "ready" and t.depth == 1 and t.parent_id is None
    assert t.packages == {"vmm-test-a", "vmm-test-b"}
    assert len(t.chain) == 1 and t.chain[0] == t.sha256 and t.size > 0
    disk = tm.disk_path(t)
    assert disk.name == f"{t.sha256}.qcow2", "delta files are named by their content"
    assert packages_on(disk) == {"vmm-test-a", "vmm-test-b"}
    assert chain_of(disk)[-1] == tm.base.disk
    assert set(timings) >= {"clone", "boot", "install", "shutdown", "record"}
    assert phases[0] == "clone" and "install" in phases and phases[-1] == "ready"
    guest = hv.started[0]
    assert guest.exited.is_set()
    assert ["apt-get", "update"] in guest.exec_log
    assert not leftovers(tm)

    got = await tm.ensure_template(["vmm-test-a", "vmm-test-b"])
    again, built2, timings2 = got.record, got.built, got.timings
    assert not built2 and again is not None and again.template_id == t.template_id
    assert timings2 == {"install": 0.0}
    assert len(hv.started) == 1
    info = tm.templates_info()
    assert [i.template_id for i in info] == [t.template_id]
    assert info[0].delta_sizes == (t.size,)


async def test_superset_is_reused_and_partial_builds_on_parent(
    store: Store, hv: FakeHypervisor, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    tm = manager(store, hv, tmp_path)
    got = await tm.ensure_template(["a", "b"])
    ab, _, _ = got.record, got.built, got.timings
    got = await tm.ensure_template(["a"])
    a_only, built, _ = got.record, got.built, got.timings
    assert not built and a_only is not None and ab is not None
    assert a_only.template_id == ab.template_id
    got = await tm.ensure_template(["a", "b", "c"])
    abc, built, _ = got.record, got.built, got.timings
    assert built and abc is not None and ab is not None
    assert abc.parent_id == ab.template_id and abc.depth == 2
    assert abc.chain == (ab.sha256, abc.sha256)
    # only the missing package was installed on top of the parent
    installs = [c for c in hv.started[-1].exec_log if c[:2] == ["apt-get", "install"]]
    assert installs == [["apt-get", "install", "-y", "--no-install-recommends", "c"]]
    assert packages_on(tm.disk_path(abc)) == {"a", "b", "c"}
    infos = {i.template_id: i for i in tm.templates_info()}
    assert infos[abc.template_id].delta_sizes == (ab.size, abc.size)
    assert infos[abc.template_id].parent_id == ab.template_id


async def test_deep_chains_are_flattened(
    store: Store, hv: FakeHypervisor, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    tm = manager(store, hv, tmp_path, max_depth=2)
    await tm.ensure_template(["a"])
    got = await tm.ensure_template(["a", "b"])
    t2, _, _ = got.record, got.built, got.timings
    got = await tm.ensure_template(["a", "b", "c"])
    t3, _, _ = got.record, got.built, got.timings
    assert t2 is not None and t2.depth == 2
    assert t3 is not None and t3.depth == 1 and t3.parent_id is None
    assert t3.chain == (t3.sha256,)
    assert chain_of(tm.disk_path(t3)) == [tm.disk_path(t3), tm.base.disk]
    assert packages_on(tm.disk_path(t3)) == {"a", "b", "c"}


async def test_unknown_package_names_it_and_leaves_nothing(
    store: Store, hv: FakeHypervisor, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    tm = manager(store, hv, tmp_path)
    with pytest.raises(PackageInstallError, match="no-such-pkg"):
        await tm.ensure_template(["a", "no-such-pkg"])
    assert tm.records(include_building=True) == []
    assert list(tm.dir.iterdir()) == []
    assert not hv.running


async def test_a_failing_maintainer_script_names_the_package_and_leaves_nothing(
    store: Store, hv: FakeHypervisor, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Every host boots the same base image, so a postinst that fails here fails
    # everywhere: an install error (the request ends), not a source error (retried).
    tm = manager(store, hv, tmp_path)
    hv.broken_packages = frozenset({"b"})
    with pytest.raises(PackageInstallError, match=r"error processing package b \(--configure\)"):
        await tm.ensure_template(["a", "b"])
    assert tm.records(include_building=True) == []
    assert list(tm.dir.iterdir()) == []
    assert not hv.running


async def test_a_flaky_package_source_costs_a_retry_not_the_template(
    store: Store, hv: FakeHypervisor, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    tm = manager(store, hv, tmp_path)
    hv.update_failures = 2
    got = await tm.ensure_template(["a"])
    rec, built, _ = got.record, got.built, got.timings
    assert built and rec is not None and rec.packages == frozenset({"a"})
    hv.update_failures = 3
    with pytest.raises(PackageSourceError, match=r"could not reach its package source.*3 attempts"):
        await tm.ensure_template(["b"])
    assert [r.packages for r in tm.records(include_building=True)] == [frozenset({"a"})]
    assert not hv.running


async def test_bad_package_name_is_usage_error(
    store: Store, hv: FakeHypervisor, tmp_path: Path
) -> None:
    tm = manager(store, hv, tmp_path)
    with pytest.raises(UsageError):
        await tm.ensure_template(["../etc"])
    with pytest.raises(NotFound):
        tm.get("0" * 32)
    nothing = await tm.ensure_template([])
    assert (nothing.record, nothing.how, nothing.timings) == (None, "reused", {"install": 0.0})


async def test_cancel_mid_install_cleans_up(
    store: Store, hv: FakeHypervisor, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    tm = manager(store, hv, tmp_path)
    with trio.move_on_after(hv.agent_seconds + hv.install_seconds / 2):
        await tm.ensure_template(["a"])
    assert hv.started and hv.started[0].exited.is_set()
    assert tm.records(include_building=True) == []
    assert list(tm.dir.iterdir()) == []


AB, CD = "ab" * 32, "cd" * 32


async def test_reconcile_removes_half_builds_and_orphans(
    store: Store, hv: FakeHypervisor, tmp_path: Path
) -> None:
    tm = manager(store, hv, tmp_path)
    tid = template_id(tm.base.image_id, ["a"])
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO templates (template_id, base_image_id, packages, disk, state, created)"
            " VALUES (?, ?, ?, ?, 'building', 0)",
            (tid, tm.base.image_id, json.dumps(["a"]), f"{BUILDING_PREFIX}{tid}.qcow2"),
        )
        conn.execute(
            "INSERT INTO templates (template_id, base_image_id, packages, disk, chain, state,"
            " created) VALUES ('ab12ab12', ?, '[\"b\"]', ?, ?, 'ready', 0)",
            (tm.base.image_id, f"{AB}.qcow2", json.dumps([AB])),
        )
        conn.execute(
            "INSERT INTO templates (template_id, parent_id, base_image_id, packages, disk,"
            " chain, state, created) VALUES ('cd34cd34', 'ab12ab12', ?, '[\"b\",\"c\"]', ?, ?,"
            " 'ready', 0)",
            (tm.base.image_id, f"{CD}.qcow2", json.dumps([AB, CD])),
        )
    (tm.dir / f"{BUILDING_PREFIX}{tid}.qcow2").write_text("{}")
    (tm.dir / f"{CD}.qcow2").write_text("{}")  # its parent's delta is gone
    (tm.dir / f"{'f' * 64}.qcow2").write_text("{}")  # no chain holds it
    # the killed node's build guest still runs (QEMU has its own session)
    run_dir = tm.run_root / f"tpl-{tid[:16]}"
    guest = await hv.start(
        BootSpec(
            name=run_dir.name,
            disk=tm.dir / f"{BUILDING_PREFIX}{tid}.qcow2",
            kernel=tm.base.kernel,
            initrd=tm.base.initrd,
            run_dir=run_dir,
        )
    )
    removed = await tm.reconcile()
    assert len(removed) == 7
    assert guest.exited.is_set() and not run_dir.exists()
    assert tm.records(include_building=True) == []
    assert list(tm.dir.iterdir()) == []


async def test_same_set_requested_twice_at_once_builds_once(
    store: Store, hv: FakeHypervisor, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    tm = manager(store, hv, tmp_path)
    results: list[bool] = []

    async def one() -> None:
        got = await tm.ensure_template(["a", "b"])
        _, built, _ = got.record, got.built, got.timings
        results.append(built)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        nursery.start_soon(one)
    assert sorted(results) == [False, True]
    assert len(hv.started) == 1


async def test_build_guest_that_had_to_be_killed_gives_no_template(
    store: Store, hv: FakeHypervisor, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    hv.clean_poweroff = False
    tm = manager(store, hv, tmp_path)
    with pytest.raises(HypervisorError, match="power off cleanly"):
        await tm.ensure_template(["a"])
    assert tm.records(include_building=True) == []
    assert list(tm.dir.iterdir()) == []


UPDATE_UNREACHABLE = """\
Ign:1 http://10.0.2.2:8080 ./ InRelease
Err:1 http://10.0.2.2:8080 ./ InRelease
  Could not connect to 10.0.2.2:8080 (10.0.2.2). - connect (111: Connection refused)
Reading package lists...
W: Failed to fetch http://10.0.2.2:8080/./InRelease  Could not connect to 10.0.2.2:8080 \
(10.0.2.2). - connect (111: Connection refused)
W: Some index files failed to download. They have been ignored, or old ones used instead.
"""
UPDATE_NO_DNS = """\
Err:1 http://deb.debian.org/debian bookworm InRelease
  Temporary failure resolving 'deb.debian.org'
W: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  Temporary \
failure resolving 'deb.debian.org'
"""
UPDATE_OK = """\
Get:1 http://10.0.2.2:8080 ./ InRelease [1,234 B]
Reading package lists...
"""


JDK_WITHOUT_MAN1 = """\
Setting up openjdk-17-jre-headless:amd64 (17.0.13+11-1~deb12u1) ...
update-alternatives: using /usr/lib/jvm/java-17-openjdk-amd64/bin/java to provide /usr/bin/java (java) in auto mode
update-alternatives: error: error creating symbolic link '/usr/share/man/man1/java.1.gz.dpkg-tmp': No such file or directory
dpkg: error processing package openjdk-17-jre-headless:amd64 (--configure):
 installed openjdk-17-jre-headless:amd64 package post-installation script subprocess returned error exit status 2
dpkg: dependency problems prevent configuration of default-jre-headless:
Errors were encountered while processing:
 openjdk-17-jre-headless:amd64
E: Sub-process /usr/bin/dpkg returned an error code (1)
"""  # noqa: E501


def test_a_failed_maintainer_script_is_named_with_its_reason() -> None:
    found = dpkg_errors(JDK_WITHOUT_MAN1)
    assert found is not None
    assert found.startswith("update-alternatives: error: error creating symbolic link")
    assert "dpkg: error processing package openjdk-17-jre-headless:amd64" in found
    assert "post-installation script subprocess returned error exit status 2" in found
    assert dpkg_errors(UPDATE_OK) is None


def test_source_problem_finds_an_unreachable_source() -> None:
    """apt-get update exits 0 with only warnings when its source is unreachable."""
    assert source_problem(UPDATE_UNREACHABLE) == (
        "http://10.0.2.2:8080/./InRelease: Could not connect to 10.0.2.2:8080 (10.0.2.2). "
        "- connect (111: Connection refused)"
    )
    found = source_problem(UPDATE_NO_DNS)
    assert found is not None and "Temporary failure resolving 'deb.debian.org'" in found
    assert found.startswith("http://deb.debian.org/debian/dists/bookworm/InRelease")
    assert source_problem(UPDATE_OK) is None
    assert missing_packages(UPDATE_UNREACHABLE) == []


async def test_an_unreachable_source_is_not_called_a_missing_package(
    store: Store, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    class Unreachable(FakeHypervisor):
        pass

    hv = Unreachable(repo_packages=frozenset({"a"}))
    hv.update_output = UPDATE_UNREACHABLE.encode()
    tm = manager(store, hv, tmp_path)
    with pytest.raises(PackageSourceError) as info:
        await tm.ensure_template(["python3"])
    assert "could not reach its package source" in str(info.value)
    assert "Connection refused" in str(info.value)
    assert "package not found" not in str(info.value)
    assert tm.records(include_building=True) == []
