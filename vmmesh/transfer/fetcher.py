"""Fetching one blob from every holder at once: the trio glue around ``Scheduler``.

``DEPTH`` tasks per holder each ask for a batch of pieces (``blob.pieces``),
put each arriving piece together, check its hash and write it to the staging
file (both in a worker thread), and ask for the next batch: while one batch
is checked and written, the other is on the wire, so the link is never idle
waiting for a request.  A holder that breaks off, sends a bad piece or does
not have the blob is dropped and its pieces go to the others.  Memory stays
bounded whatever the blob's size: per holder, ``DEPTH * BATCH`` pieces
being assembled and the few frames the connection buffers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from vmmesh.api.common import Progress
from vmmesh.api.transfer import INFO, PIECES, BlobInfo, BlobRequest, PieceChunk, PiecesRequest
from vmmesh.errors import IntegrityError, ProtocolError, TransferError, VmmeshError
from vmmesh.net.peers import PeerPool
from vmmesh.net.refusals import describe
from vmmesh.transfer.blobfile import PieceAssembly, Staging, check_info
from vmmesh.transfer.packs import SUFFIX as PACK_SUFFIX
from vmmesh.transfer.packs import PackWriter
from vmmesh.transfer.pieces import HolderStats, Scheduler

log = logging.getLogger("vmmesh.transfer")

BATCH = 1
DEPTH = 2
PROGRESS_EVERY = 0.5
INFO_TIMEOUT = 120.0  # a holder hashes a big file before it answers


@dataclass(frozen=True)
class Holder:
    node_id: str
    name: str


@dataclass(frozen=True)
class Fetched:
    """A verified blob file (still in the staging directory) and how it came."""

    path: Path
    size: int
    wire_bytes: int
    seconds: float
    holders: dict[str, HolderStats]
    pack: Path | None = None  # the chunks as received, as a pack (see PackWriter)


Emit = Callable[[Progress], None]


async def blob_info(pool: PeerPool, sha: str, holders: Sequence[Holder]) -> tuple[BlobInfo, str]:
    """The piece table, from the first holder that answers with a valid one."""
    reasons = []
    for h in holders:
        try:
            info = await pool.call(h.node_id, INFO, BlobRequest(sha256=sha), INFO_TIMEOUT)
            check_info(info, sha)
            return info, h.name
        except VmmeshError as exc:
            reasons.append(f"{h.name}: {describe(exc)}")
    raise TransferError(f"no holder described blob {sha[:16]}: {'; '.join(reasons) or 'none'}")


async def fetch_blob(
    pool: PeerPool,
    sha: str,
    holders: Sequence[Holder],
    staging_dir: Path,
    *,
    task: str,
    emit: Emit | None = None,
    keep_pack: bool = False,
    on_wire: Callable[[int], None] | None = None,
) -> Fetched:
    """Fetch blob ``sha`` from ``holders`` into ``staging_dir``; TransferError if no holder
    could finish it.  ``keep_pack``: keep the chunks as received as a pack too, when
    every piece comes in this attempt and from holders' packs (``Fetched.pack``).
    ``on_wire`` is told the wire bytes of each piece as it is taken (the counters)."""
    if not holders:
        raise TransferError(f"no host holds blob {sha[:16]}")
    info, _ = await blob_info(pool, sha, holders)
    staging = Staging(staging_dir, info)
    have = await trio.to_thread.run_sync(staging.open)
    sched = Scheduler(len(info.pieces), have)
    by_id = {h.node_id: h for h in holders}
    fresh = keep_pack and not (have - info.zero)
    writer = PackWriter(staging_dir / f"{sha}{PACK_SUFFIX}", info) if fresh else None
    run = _Run(pool, info, staging, sched, by_id, task=task, emit=emit, writer=writer,
               on_wire=on_wire)  # fmt: skip
    started = time.monotonic()
    try:
        return await _finish(run, holders, started)
    finally:
        if writer is not None:
            writer.close()


async def _finish(run: _Run, holders: Sequence[Holder], started: float) -> Fetched:
    """Run the holder loops until the blob is whole (or every holder failed); verify it."""
    info, staging, sched, sha = run.info, run.staging, run.sched, run.info.sha256
    try:
        async with trio.open_nursery() as nursery:
            for h in holders:
                sched.add_holder(h.node_id)
                for _ in range(DEPTH):
                    nursery.start_soon(run.holder_loop, h)
            nursery.start_soon(run.report_loop)
            await run.done.wait()
            nursery.cancel_scope.cancel()
    finally:  # what arrived is kept for the next attempt, whatever ended this one
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(staging.sync)
    if not sched.complete:
        reasons = "; ".join(
            f"{holders_by(holders, n)}: {s.dropped}" for n, s in sched.holders.items()
        )
        raise TransferError(f"blob {sha[:16]}: every holder failed ({reasons})")
    path = await trio.to_thread.run_sync(staging.finish)
    pack = None if run.writer is None else await trio.to_thread.run_sync(run.writer.finish)
    wire = sum(s.wire_bytes for s in sched.holders.values())
    run.progress(final=True)
    seconds = time.monotonic() - started
    return Fetched(path, info.size, wire, seconds, dict(sched.holders), pack)


def holders_by(holders: Sequence[Holder], node_id: str) -> str:
    return next((h.name for h in holders if h.node_id == node_id), node_id[:12])


@dataclass
class _Run:
    """One blob under way: a task per holder, one reporter."""

    pool: PeerPool
    info: BlobInfo
    staging: Staging
    sched: Scheduler
    holders: dict[str, Holder]
    task: str
    emit: Emit | None
    writer: PackWriter | None = None
    on_wire: Callable[[int], None] | None = None
    done: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.sched.complete:
            self.done.set()

    def _check_done(self) -> None:
        if self.sched.complete or self.sched.stalled():
            self.done.set()
        self.changed.set()
        self.changed = trio.Event()

    async def holder_loop(self, holder: Holder) -> None:
        """One of the ``DEPTH`` loops that keep ``holder`` busy."""
        sched = self.sched
        while not self.done.is_set():
            if holder.node_id not in sched.live_holders():
                return  # dropped by its other loop
            batch = sched.next_batch(holder.node_id, BATCH)
            if not batch:
                await self.changed.wait()  # pieces may come back from a dropped holder
                continue
            try:
                await self._fetch_batch(holder, batch)
            except (VmmeshError, trio.BrokenResourceError) as exc:
                if holder.node_id in sched.live_holders():
                    reason = describe(exc)
                    log.warning(
                        "transfer %s: dropping holder %s: %s", self.task, holder.name, reason
                    )
                    sched.drop(holder.node_id, reason)
                self._check_done()
                return

    async def _fetch_batch(self, holder: Holder, batch: list[int]) -> None:
        pending: dict[int, PieceAssembly] = {i: PieceAssembly(self.info, i) for i in batch}
        t = time.monotonic()
        request = PiecesRequest(sha256=self.info.sha256, indices=tuple(batch))

        async def take(chunk: PieceChunk) -> None:
            nonlocal t
            assembly = pending.get(chunk.index)
            if assembly is None:
                raise ProtocolError(f"{holder.name} sent piece {chunk.index}, not asked")
            if not assembly.add(chunk):
                return
            del pending[chunk.index]
            piece = await trio.to_thread.run_sync(assembly.piece)
            seconds, t = time.monotonic() - t, time.monotonic()
            if self.sched.arrived(holder.node_id, chunk.index, len(piece), assembly.wire, seconds):
                if self.on_wire is not None:
                    self.on_wire(assembly.wire)
                await trio.to_thread.run_sync(self._keep, chunk.index, piece, assembly)
            self._check_done()

        try:
            await self.pool.stream(holder.node_id, PIECES, request, take)
        except IntegrityError as exc:
            raise IntegrityError(f"{holder.name} sent a bad piece: {exc}") from None
        finally:
            self.sched.given_back(holder.node_id, pending)
        if pending:
            raise ProtocolError(f"{holder.name} ended the batch without pieces {sorted(pending)}")

    def _keep(self, index: int, piece: bytes, assembly: PieceAssembly) -> None:
        """A verified piece into the staging file, and its chunks into the pack (a thread)."""
        self.staging.write(index, piece)
        if self.writer is not None:
            self.writer.add(index, assembly.chunks())

    async def report_loop(self) -> None:
        while True:
            self.progress()
            await trio.sleep(PROGRESS_EVERY)

    def progress(self, final: bool = False) -> None:
        if self.emit is None:
            return
        done_pieces = len(self.sched.have)
        total = len(self.info.pieces)
        bytes_done = min(self.info.size, done_pieces * self.info.piece_size)
        elapsed = max(1e-6, time.monotonic() - self.started)
        got = sum(s.bytes for s in self.sched.holders.values())
        live = [self.holders[h].name for h in self.sched.live_holders() if h in self.holders]
        self.emit(
            Progress(
                task=self.task,
                phase="done" if final else "fetching",
                fraction=1.0 if final else done_pieces / max(1, total),
                done=bytes_done,
                total=self.info.size,
                rate=got / elapsed,
                note=f"from {', '.join(live) or 'no holder'}",
            )
        )
