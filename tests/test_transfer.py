"""Blobs between hosts: the piece scheduler and blob files without I/O, then templates
fetched between real nodes (real TLS, real gossip) over a fake hypervisor."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.nodeutil import Host, eventually, fake, fast_publish, mesh, port, request, root
from vmmesh.api.transfer import (
    CHUNK,
    PIECE_SIZE,
    BlobInfo,
    FetchReport,
    PieceChunk,
    WarmManifest,
)
from vmmesh.errors import IntegrityError, MalformedMessage
from vmmesh.host.history import BuildSample, TransferSample, fetch_estimate, install_estimate
from vmmesh.host.warm import WarmStore
from vmmesh.hypervisor.savedstate import Shape
from vmmesh.transfer import blobfile, packs
from vmmesh.transfer.blobfile import (
    PieceAssembly,
    Staging,
    check_info,
    describe,
    read_chunks,
    sweep,
)
from vmmesh.transfer.fetcher import Holder
from vmmesh.transfer.pieces import Scheduler
from vmmesh.transfer.service import TransferService
from vmmesh.transfer.warmpick import choose

__all__ = ["fast_publish", "port", "root"]  # fixtures

PS = 64 << 10


# --- the scheduler --------------------------------------------------------------------


def test_faster_holders_get_more_pieces() -> None:
    s = Scheduler(10)
    s.add_holder("fast")
    s.add_holder("slow")
    slow = s.next_batch("slow", 2)
    fast_total = 0
    while True:
        batch = s.next_batch("fast", 2)
        if not batch or all(i in slow for i in batch):
            break
        for i in batch:
            s.arrived("fast", i, PS, PS, 0.01)
            fast_total += 1
    assert fast_total == 8 and not s.complete
    for i in slow:
        assert s.arrived("slow", i, PS, PS, 1.0)
    assert s.complete


def test_a_dropped_holder_gives_its_pieces_back() -> None:
    s = Scheduler(4)
    s.add_holder("a")
    s.add_holder("b")
    assert s.next_batch("a", 2) == [0, 1]
    assert s.next_batch("b", 2) == [2, 3]
    s.drop("a", "connection lost")
    assert s.next_batch("b", 4) == [0, 1]
    assert s.live_holders() == ["b"]
    assert s.holders["a"].dropped == "connection lost"
    s.drop("b", "bad piece")
    assert s.stalled()


def test_endgame_copies_a_piece_and_the_first_copy_counts() -> None:
    s = Scheduler(2)
    for h in ("a", "b"):
        s.add_holder(h)
    assert s.next_batch("a", 2) == [0, 1]
    assert s.next_batch("b", 2) == [0]  # b helps with what a is still sending
    assert s.arrived("b", 0, PS, PS, 0.1)
    assert not s.arrived("a", 0, PS, PS, 0.5), "a's copy came second"
    assert s.arrived("a", 1, PS, PS, 0.5) and s.complete


def test_a_resumed_transfer_asks_only_for_what_it_lacks() -> None:
    s = Scheduler(5, have={0, 1, 3})
    s.add_holder("a")
    assert s.next_batch("a", 5) == [2, 4]
    assert s.missing == 2


# --- blob files ----------------------------------------------------------------------------


def _blob(path: Path) -> str:
    data = os.urandom(PS) + bytes(PS) + b"x" * (PS // 2)  # random, zeros, compressible tail
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_describe_notes_zero_pieces_and_checks_the_whole(tmp_path: Path) -> None:
    sha = _blob(tmp_path / "b")
    info = describe(tmp_path / "b", sha, PS)
    assert (info.size, len(info.pieces), info.zero) == (PS * 5 // 2, 3, frozenset({1}))
    check_info(info, sha)
    with pytest.raises(IntegrityError):
        describe(tmp_path / "b", "0" * 64, PS)
    liar = BlobInfo(
        sha256=sha, size=info.size, piece_size=PS, pieces=info.pieces, zero=frozenset({0})
    )
    with pytest.raises(MalformedMessage, match="called zeros"):
        check_info(liar, sha)


def test_pieces_travel_compressed_where_it_pays_and_are_verified(tmp_path: Path) -> None:
    sha = _blob(tmp_path / "b")
    info = describe(tmp_path / "b", sha, PS)
    random_chunks = read_chunks(tmp_path / "b", info, 0)
    tail_chunks = read_chunks(tmp_path / "b", info, 2)
    assert not random_chunks[0].zstd and tail_chunks[0].zstd
    assert len(tail_chunks[0].data) < 200, "a run of one byte costs nothing"
    assembly = PieceAssembly(info, 2)
    assert assembly.add(tail_chunks[0])
    assert assembly.piece() == b"x" * (PS // 2)
    bad = PieceAssembly(info, 0)
    assert bad.add(PieceChunk(index=0, offset=0, data=b"y" * PS))
    with pytest.raises(IntegrityError, match="does not match its hash"):
        bad.piece()
    garbled = PieceAssembly(info, 0)
    assert garbled.add(PieceChunk(index=0, offset=0, data=b"\x28\xb5\x2f\xfd", zstd=True))
    with pytest.raises(MalformedMessage):
        garbled.piece()
    with pytest.raises(MalformedMessage, match="came twice"):
        garbled.add(PieceChunk(index=0, offset=0, data=b"z"))
    with pytest.raises(MalformedMessage, match="does not belong"):
        PieceAssembly(info, 0).add(PieceChunk(index=1, offset=0, data=b"z"))


def test_staging_resumes_and_never_hands_over_a_wrong_file(tmp_path: Path) -> None:
    src = tmp_path / "b"
    sha = _blob(src)
    info = describe(src, sha, PS)
    staging = Staging(tmp_path / "staging", info)
    assert staging.open() == {1}, "the zero piece is there from the start"
    piece0 = src.read_bytes()[:PS]
    staging.write(0, piece0)
    assert Staging(tmp_path / "staging", info).open() == {1}, "not synced yet: not counted"
    staging.write(0, piece0)
    staging.sync()  # what the fetcher does at the end of every attempt
    # the receiving node restarts: the verified piece is still there
    again = Staging(tmp_path / "staging", info)
    assert again.open() == {0, 1}
    again.write(2, src.read_bytes()[2 * PS :])
    done = again.finish()
    assert done.read_bytes() == src.read_bytes()
    # a file that does not hash to its name is never handed over, and goes
    other = Staging(tmp_path / "staging2", info)
    other.open()
    other.write(0, b"z" * PS)
    other.write(2, src.read_bytes()[2 * PS :])
    with pytest.raises(IntegrityError):
        other.finish()
    assert list((tmp_path / "staging2").iterdir()) == []


def test_sweep_removes_stale_and_broken_staging(tmp_path: Path) -> None:
    d = tmp_path / "t"
    d.mkdir()
    for name in ("a.part", "a.info", "a.have", "b.part", "c.info.tmp"):
        (d / name).write_text("x")
    assert sorted(sweep(d, 3600, os_time())) == ["b.part", "c.info.tmp"]
    assert sorted(sweep(d, -1, os_time())) == ["a.have", "a.info", "a.part"]


def os_time() -> float:
    import time

    return time.time()


# --- estimates --------------------------------------------------------------------------------


def test_estimates_come_from_measurements_and_say_so() -> None:
    default = install_estimate([], 2)
    assert not default.measured and default.seconds > 20
    sample = BuildSample(
        boot=10,
        update=2,
        install=12,
        shutdown=2,
        packages=2,
        download_bytes=10_000_000,
        download_seconds=2.0,
    )
    measured = install_estimate([sample], 2)
    assert measured.measured and measured.seconds == pytest.approx(10 + 2 + 2 + 2 * 5 + 2)
    # four hosts downloading from one source at once share its bandwidth
    assert install_estimate([sample], 2, downloaders=4).seconds == pytest.approx(
        10 + 2 + 8 + 2 * 5 + 2
    )
    fast = [TransferSample(bytes=100 << 20, seconds=1.0)]
    assert fetch_estimate(fast, 50 << 20).seconds == pytest.approx(1.5)
    assert fetch_estimate(fast, 50 << 20, wait=30).seconds == pytest.approx(31.5)


# --- packs ---------------------------------------------------------------------------------


def _big_blob(path: Path) -> str:
    """Two pieces, the second short: random, zeros and text-like chunks."""
    text = b"".join(b"%d %s\n" % (i, hex(i * 7919).encode()) for i in range(200_000))
    data = os.urandom(CHUNK) + bytes(CHUNK) + text[: 2 * CHUNK] + text[: CHUNK + CHUNK // 2]
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_a_pack_serves_every_piece_as_verified_chunks_smaller_than_on_the_fly(
    tmp_path: Path,
) -> None:
    blob = tmp_path / "blob"
    sha = _big_blob(blob)
    info = describe(blob, sha)
    assert len(info.pieces) == 2 and info.piece_length(1) < PIECE_SIZE
    dest = packs.pack_path(tmp_path / "packs", sha)
    dest.parent.mkdir()
    packs.make(blob, sha, dest, 19)
    pack = packs.Pack.open(dest, info)
    assert pack is not None
    packed = fly = 0
    for index in range(len(info.pieces)):
        assembly = PieceAssembly(info, index)
        chunks = pack.chunks(index)
        assert [c.offset for c in chunks] == list(range(0, info.piece_length(index), CHUNK))
        assert [assembly.add(c) for c in chunks][-1], "the piece is whole"
        assert hashlib.sha256(assembly.piece()).hexdigest() == info.pieces[index]
        packed += sum(len(c.data) for c in chunks)
        fly += sum(len(c.data) for c in read_chunks(blob, info, index))
    assert not pack.chunks(0)[0].zstd, "random bytes are stored as they are"
    assert packed < fly, (packed, fly)
    assert [p.name for p in dest.parent.iterdir()] == [dest.name], "no temporary file left"


def test_a_receiver_keeps_the_chunks_it_got_from_a_pack_as_its_own_pack(tmp_path: Path) -> None:
    # Pieces 0 and 2 travel (in any order), piece 1 is zeros and never does.
    text = b"".join(b"%d %s\n" % (i, hex(i * 7919).encode()) for i in range(100_000))
    data = os.urandom(PIECE_SIZE) + bytes(PIECE_SIZE) + text[: CHUNK + CHUNK // 2]
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    info = describe(blob, sha)
    assert info.zero == {1}
    packs.make(blob, sha, tmp_path / "holder.zpk", 19)
    holder = packs.Pack.open(tmp_path / "holder.zpk", info)
    assert holder is not None
    dest = tmp_path / "recv" / f"{sha}.zpk"
    dest.parent.mkdir()
    writer = packs.PackWriter(dest, info)
    for index in (2, 0):
        writer.add(index, holder.chunks(index))
    assert writer.finish() == dest
    kept = packs.Pack.open(dest, info)
    assert kept is not None, "a pack that fits the blob"
    for index in range(3):
        assembly = PieceAssembly(info, index)
        assert [assembly.add(c) for c in kept.chunks(index)][-1]
        assert assembly.piece() == data[index * PIECE_SIZE : (index + 1) * PIECE_SIZE]
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]
    # Chunks compressed on the fly (not packed) or a piece missing: no pack, nothing left.
    onthefly = packs.PackWriter(dest.with_name("b.zpk"), info)
    onthefly.add(0, holder.chunks(0))
    onthefly.add(2, read_chunks(blob, info, 2))
    assert onthefly.finish() is None
    short = packs.PackWriter(dest.with_name("c.zpk"), info)
    short.add(0, holder.chunks(0))
    assert short.finish() is None
    short.close()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


def test_a_pack_that_does_not_fit_its_blob_is_not_used(tmp_path: Path) -> None:
    blob, other = tmp_path / "blob", tmp_path / "other"
    sha, other_sha = _big_blob(blob), _blob(other)
    info = describe(blob, sha)
    dest = tmp_path / f"{sha}.zpk"
    packs.make(blob, sha, dest, 3)
    assert packs.Pack.open(dest, describe(other, other_sha)) is None, "another blob's table"
    whole = dest.read_bytes()
    for broken in (whole[:-3], whole[: len(whole) // 2], b"", os.urandom(4096)):
        dest.write_bytes(broken)
        assert packs.Pack.open(dest, info) is None
    assert packs.Pack.open(tmp_path / "missing.zpk", info) is None
    with pytest.raises(IntegrityError):
        packs.make(blob, other_sha, dest, 3)
    assert packs.main([str(blob), other_sha, str(dest), "3"]) == 1
    assert packs.main([]) == 2


@given(st.permutations(range(6)), st.integers(0, 6))
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_staging_hashes_the_whole_blob_along_in_any_order(
    tmp_path_factory: pytest.TempPathFactory, order: list[int], cut: int
) -> None:
    # Pieces come out of order from several holders and a transfer may stop after
    # any of them: the whole-file hash, fed as the gaps fill, still comes out right.
    tmp = tmp_path_factory.mktemp("order")
    data = os.urandom(3 * PS) + bytes(PS) + b"y" * (PS + PS // 3)
    (tmp / "b").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    info = describe(tmp / "b", sha, PS)
    first = Staging(tmp / "staging", info)
    have = first.open()
    todo = [i for i in order if i not in have]
    for i in todo[:cut]:
        first.write(i, data[i * PS : (i + 1) * PS])
    first.sync()  # the node stops here and starts again
    second = Staging(tmp / "staging", info)
    have = second.open()
    for i in todo:
        if i not in have:
            second.write(i, data[i * PS : (i + 1) * PS])
    assert second.finish().read_bytes() == data


def test_packs_of_blobs_gone_and_unfinished_packs_are_swept(tmp_path: Path) -> None:
    for name in ("a" * 64 + ".zpk", "b" * 64 + ".zpk", "a" * 64 + ".zpk.tmp", "junk"):
        (tmp_path / name).write_bytes(b"x")
    gone = packs.sweep(tmp_path, {"a" * 64})
    assert sorted(gone) == sorted(["b" * 64 + ".zpk", "a" * 64 + ".zpk.tmp", "junk"])
    assert [p.name for p in tmp_path.iterdir()] == ["a" * 64 + ".zpk"]


# --- between nodes -------------------------------------------------------------------------------


async def test_a_template_built_on_one_host_is_fetched_by_another(root: Path, port: int) -> None:
    """h1 holds {perl}; a request placed on h2 (h1 has no room) fetches it: h2 installs
    nothing, its VM has the package, and the report says fetched, with both estimates."""
    hvs = [fake(), fake(), fake()]
    async with mesh(root, port, (0, 2, 0), hypervisors=hvs) as hosts:
        h1, h2, _h3 = hosts
        got = await h1.mgr.templates.ensure_template(["perl"])
        assert got.record is not None
        tid = got.record.template_id
        await eventually(
            lambda: any(t.template_id == tid for t in h2.view()["h1"].templates), "h2 learns"
        )
        reply = await request(h1, "web", 1, "perl")
        [vm] = reply.vms
        assert vm.host == "h2", reply
        assert vm.source.how == "fetched", vm.source
        assert vm.source.fetch_estimate < vm.source.install_estimate
        assert "beats installing" in vm.source.why and vm.source.bytes_fetched > 0
        assert not any(g.name.startswith("tpl-") for g in h2.hv.started), "h2 installed nothing"
        rec = h2.mgr.templates.get(tid)
        assert rec.origin == "fetched" and rec.chain == got.record.chain
        guest = h2.hv.running[h2.mgr.get(vm.name).vm_id]
        res = await guest.exec(["cat", "/usr/share/vmm-test/perl"])
        assert res.stdout == b"perl"
        # /metrics' received bytes: every piece as it was taken, so a long fetch moves
        [transfers] = [e for e in h2.node.extensions if isinstance(e, TransferService)]
        assert transfers.received_bytes == vm.source.bytes_fetched > 0


async def test_install_wins_when_it_is_faster_and_flags_force_either_way(
    root: Path, port: int
) -> None:
    async with mesh(root, port, (0, 2, 0)) as hosts:
        h1, h2, _ = hosts
        await h1.mgr.templates.ensure_template(["perl"])
        await eventually(lambda: bool(h2.view()["h1"].templates), "h2 learns")
        # this host measured a very slow link and very fast builds
        for _ in range(3):
            h2.mgr.templates.history.add_transfer(TransferSample(bytes=10 << 20, seconds=1000))
            h2.mgr.templates.history.add_build(
                BuildSample(boot=0.1, update=0.1, install=0.2, shutdown=0.1, packages=1)
            )
        got = await h2.mgr.templates.ensure_template(["perl"])
        assert got.how == "built" and "installing" in got.source.why
        assert got.source.install_estimate < got.source.fetch_estimate
        h2.mgr.templates.remove(got.record.template_id if got.record else "")
        forced = await h2.mgr.templates.ensure_template(["perl"], policy="fetch")
        assert forced.how == "fetched" and forced.source.why == "fetching was asked"


async def test_a_corrupt_holder_is_dropped_and_the_piece_fetched_elsewhere(
    root: Path, port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with mesh(root, port, (0, 2, 0)) as hosts:
        h1, h2, h3 = hosts
        got = await h1.mgr.templates.ensure_template(["perl"])
        assert got.record is not None
        # h3 got the same template (same bytes) from h1
        await eventually(lambda: bool(h3.view()["h1"].templates), "h3 learns")
        await h3.mgr.templates.ensure_template(["perl"], policy="fetch")
        await eventually(
            lambda: len([h for h in h2.node.hosts() if h.templates]) == 2, "h2 sees two holders"
        )
        real = blobfile.read_chunks
        h1_staging, h3_staging = h1.node.data_dir, h3.node.data_dir

        def corrupting(path: Path, info: BlobInfo, index: int) -> list[PieceChunk]:
            if h3_staging in path.parents:  # h1 is asked before h3 has sent everything
                time.sleep(1.0)
            chunks = real(path, info, index)
            if h1_staging in path.parents:  # h1 flips a byte of what it sends
                c = chunks[0]
                data = bytes([c.data[0] ^ 1]) + c.data[1:] if not c.zstd else c.data
                chunks[0] = PieceChunk(index=c.index, offset=c.offset, data=data, zstd=False)
            return chunks

        monkeypatch.setattr(blobfile, "read_chunks", corrupting)
        fetched = await h2.mgr.templates.ensure_template(["perl"], policy="fetch")
        assert fetched.how == "fetched"
        dropped = [r.getMessage() for r in caplog.records if "dropping holder" in r.getMessage()]
        assert dropped and "h1" in dropped[0] and "bad piece" in dropped[0], dropped
        assert h2.mgr.templates.get(got.record.template_id).chain == got.record.chain


async def test_a_chain_over_another_base_image_is_refused(root: Path, port: int) -> None:
    from vmmesh.api.host import TemplateInfo

    async with mesh(root, port) as hosts:
        h1 = hosts[0]
        info = TemplateInfo("ab" * 16, "ff" * 32, frozenset({"x"}), ("cd" * 32,), (10,))
        with pytest.raises(IntegrityError, match="not this mesh's"):
            h1.mgr.templates.record_fetched(info, {})


async def test_eviction_takes_the_least_recently_used_unused_template(
    root: Path, port: int
) -> None:
    async with mesh(root, port) as hosts:
        h1 = hosts[0]
        tm = h1.mgr.templates
        old = (await tm.ensure_template(["perl"])).record
        await trio.sleep(0.01)
        used = (await tm.ensure_template(["povray"])).record
        assert old is not None and used is not None
        report = await request(h1, "web", 1, "povray")
        assert report.vms
        svc = h1.node.extensions[1]
        with pytest.raises(Exception):  # noqa: B017 - nothing can be freed past these
            await svc.make_room(1 << 50)  # type: ignore[attr-defined]
        names = {r.template_id for r in tm.records()}
        assert used.template_id in names, "never a template a VM runs on"
        assert old.template_id not in names, "the unused one went first"


async def test_a_holder_packs_its_templates_serves_from_the_pack_and_drops_it_with_them(
    root: Path, port: int
) -> None:
    async with mesh(root, port, (0, 2, 0), pack_level=3) as hosts:
        h1, h2, _h3 = hosts
        got = (await h1.mgr.templates.ensure_template(["perl"])).record
        assert got is not None
        [sha] = got.chain
        made = packs.pack_path(h1.node.data_dir / "packs", sha)
        await eventually(made.exists, "h1 packs its new template")
        served: list[int] = []
        real = packs.Pack.chunks

        def counting(self: packs.Pack, piece: int) -> list[PieceChunk]:
            served.append(piece)
            return real(self, piece)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(packs.Pack, "chunks", counting)
            await eventually(lambda: bool(h2.view()["h1"].templates), "h2 learns")
            fetched = await h2.mgr.templates.ensure_template(["perl"], policy="fetch")
        assert fetched.how == "fetched" and served, "h1 sent its pieces from its pack"
        assert h2.mgr.templates.get(got.template_id).chain == got.chain
        kept = packs.pack_path(h2.node.data_dir / "packs", sha)
        assert kept.exists(), "h2 kept the pack the pieces came in: nothing to pack again"
        info = blobfile.describe(h2.mgr.templates.delta_path(sha), sha)
        assert packs.Pack.open(kept, info) is not None
        h1.mgr.templates.remove(got.template_id)
        await eventually(lambda: not made.exists(), "the pack goes with its template")


async def test_fetch_by_hand_takes_only_the_holders_named(root: Path, port: int) -> None:
    from vmmesh.api.transfer import FETCH_TEMPLATE, FetchTemplateRequest
    from vmmesh.errors import NotFound
    from vmmesh.net.control import connect_control

    async def fetch(host: Host, tid: str, *sources: str) -> FetchReport:
        body = FetchTemplateRequest(template=tid, sources=frozenset(sources)).checked()
        async with (
            connect_control(host.cfg.socket_path) as conn,
            conn.stream(FETCH_TEMPLATE, body) as answer,
        ):
            async for _ in answer:
                pass
        return answer.result()

    async with mesh(root, port) as hosts:
        h1, h2, h3 = hosts
        rec = (await h1.mgr.templates.ensure_template(["perl"])).record
        assert rec is not None
        await eventually(lambda: bool(h3.view()["h1"].templates), "h3 learns")
        await h3.mgr.templates.ensure_template(["perl"], policy="fetch")
        await eventually(
            lambda: len([h for h in h2.node.hosts() if h.templates]) == 2, "h2 sees two holders"
        )
        with pytest.raises(NotFound, match="not held by h9"):
            await fetch(h2, rec.template_id[:12], "h9")
        report = await fetch(h2, rec.template_id[:12], "h3")
        assert [h.host for h in report.holders] == ["h3"], report
        assert h2.mgr.templates.get(rec.template_id).chain == rec.chain


async def _warm_holder_and_slow_fetcher(h1: Host, h2: Host) -> tuple[str, WarmStore, WarmStore]:
    """h1 builds {perl} and saves its warm state; h2 (whose guests boot slowly) has
    timed its own warm boot of the base image.  The template id and both stores."""
    got = await h1.mgr.templates.ensure_template(["perl"])
    assert got.record is not None
    tid = got.record.template_id
    h1_warm, h2_warm = h1.mgr.warm_sched.store(), h2.mgr.warm_sched.store()
    assert h1_warm is not None and h2_warm is not None
    h1.mgr.schedule_warm(got.record)
    await eventually(lambda: h1_warm.get(tid) is not None, "h1's warm state")
    base = h2.mgr.templates.base.image_id
    await eventually(lambda: h2_warm.get(base) is not None, "h2 timed its own warm boot")
    return tid, h1_warm, h2_warm


async def test_a_fetched_template_brings_its_warm_state_and_its_vm_resumes_it(
    root: Path, port: int
) -> None:
    """h1 built {perl} (its warm build left a warm state); h2 fetches the template for a
    request and the state with it: h2's VM resumes it, and h2 boots nothing to make one."""
    # h2's guests take 3 s to boot: fetching a state beats a warm boot of its own
    async with mesh(
        root, port, (1, 2, 0), hypervisors=[fake(), fake(agent_seconds=3.0), fake()]
    ) as hosts:
        h1, h2, _h3 = hosts
        tid, h1_warm, h2_warm = await _warm_holder_and_slow_fetcher(h1, h2)
        await eventually(
            lambda: any(t.template_id == tid and t.warm for t in h2.view()["h1"].templates),
            "h2 learns h1 holds it warm",
        )
        share = await h2.mgr.request_local("web", 1, ["perl"])
        [vm] = share.vms
        assert vm.host == "h2" and vm.source.how == "fetched", share
        assert vm.start == "warm", vm
        assert vm.source.warm_bytes > 0 and "warm state" in vm.source.why, vm.source
        assert vm.source.bytes_fetched > vm.source.warm_bytes
        mine, theirs = h2_warm.get(tid), h1_warm.get(tid)
        assert mine is not None and theirs is not None
        assert mine.state.read_bytes() == theirs.state.read_bytes()
        assert mine.shape == theirs.shape
        booted = [g.name for g in h2.hv.started]
        assert f"warm-{tid[:16]}" not in booted, f"h2 booted {booted} to make a warm state"
        # h2 now says it holds it warm too
        await eventually(
            lambda: any(t.template_id == tid and t.warm for t in h1.view()["h2"].templates),
            "h1 learns h2 holds it warm",
        )


async def test_a_warm_state_of_another_shape_or_a_lying_overlay_is_not_kept(
    root: Path, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A holder whose guests have another shape is not fetched from; a holder whose
    overlay backs onto another file is refused after the fetch.  Either way the VM is
    made (it boots) and nothing half-fetched stays."""
    import json
    import logging

    caplog.set_level(logging.INFO, logger="vmmesh.transfer")
    slow_h2 = [fake(), fake(agent_seconds=3.0), fake()]
    async with mesh(root, port, (1, 2, 0), hypervisors=slow_h2) as hosts:
        h1, h2, _h3 = hosts
        tid, h1_warm, h2_warm = await _warm_holder_and_slow_fetcher(h1, h2)
        theirs = h1_warm.get(tid)
        assert theirs is not None
        # h1's state says it needs 4 vCPUs: not h2's shape
        shape = json.loads((theirs.directory / "shape.json").read_text())
        shape["shape"]["vcpus"] = "4"
        (theirs.directory / "shape.json").write_text(json.dumps(shape))
        await eventually(lambda: bool(h2.view()["h1"].templates), "h2 learns")
        first = await h2.mgr.templates.ensure_template(["perl"], policy="fetch")
        assert first.how == "fetched" and first.source.warm_bytes == 0
        assert any("another guest shape" in r.getMessage() for r in caplog.records)
        assert h2_warm.get(tid) is None
        # the shape fixed, the overlay now backs onto something else
        shape["shape"]["vcpus"] = "1"
        (theirs.directory / "shape.json").write_text(json.dumps(shape))
        disk = json.loads(theirs.disk.read_text())
        disk["backing"] = "../../../../etc/passwd"
        theirs.disk.write_text(json.dumps(disk))
        h2.mgr.templates.remove(tid)
        again = await h2.mgr.templates.ensure_template(["perl"], policy="fetch")
        assert again.how == "fetched" and again.source.warm_bytes == 0
        assert any("not fetched" in r.getMessage() and "refused" in r.getMessage()
                   for r in caplog.records)  # fmt: skip
        assert h2_warm.get(tid) is None and not h2_warm.making(tid)
        assert not [p for p in h2_warm.dir.iterdir() if p.name.startswith(".saving-")]


def _manifest(key: str, state: str, vcpus: str = "1", made: float = 60.0) -> WarmManifest:
    return WarmManifest(
        key=key,
        shape={"qemu": "7.2", "vcpus": vcpus},
        state_sha256=state * 64,
        state_size=150_000_000,
        disk_sha256="d" * 64,
        disk_size=1_000_000,
        made_seconds=made,
    )


def test_the_warm_state_most_holders_share_is_fetched_when_it_beats_a_boot() -> None:
    ours = Shape.of({"qemu": "7.2", "vcpus": "1"})
    a, b, c = Holder("1" * 32, "h1"), Holder("2" * 32, "h2"), Holder("3" * 32, "h3")
    key = "ab" * 16
    offers = [(a, _manifest(key, "a")), (b, _manifest(key, "b")), (c, _manifest(key, "b"))]
    at_150mb_s = lambda size: size / 150e6  # noqa: E731
    got = choose(key, offers, ours, at_150mb_s, booting=60.0)
    assert got.manifest is not None and got.manifest.state_sha256 == "b" * 64
    assert got.holders == (b, c) and "beats a warm boot (60 s)" in got.why
    # a slow link: booting wins (this host's own figure, not the holders')
    slow = choose(key, offers, ours, lambda size: size / 1e6, booting=60.0)
    assert slow.manifest is None and "beats fetching 151 MB (151 s)" in slow.why
    # this host never timed a boot: the holder's figure stands in
    assert choose(key, offers, ours, at_150mb_s, booting=None).manifest is not None
    # another shape, another key: nothing to fetch, and why
    other = choose(key, [(a, _manifest(key, "a", vcpus="2"))], ours, at_150mb_s, 60.0)
    assert other.manifest is None and "vcpus 2 != 1" in other.why
    stray = choose(key, [(a, _manifest("cd" * 16, "a"))], ours, at_150mb_s, 60.0)
    assert stray.manifest is None and "another state" in stray.why
    assert choose(key, [], ours, at_150mb_s, 60.0).why == "no holder has one"
