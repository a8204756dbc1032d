"""The transfer service: serving blobs to peers, and getting templates and images from them.

Serving: ``blob.info`` and ``blob.pieces`` answer for the files this host
holds under a content name: template deltas (``templates/<sha>.qcow2``) and
the three files of each base image.  A peer's string never becomes a path:
the hash asked for is looked up among what this host holds.

Getting a template (``TemplateFetcher.obtain``, called by the template
manager before it would build): the hosts that gossip the template id are
grouped by the delta chain they hold (two hosts that built the same package
set hold different bytes), the chain with most holders is taken, and the
deltas this host lacks are counted.  The estimate to fetch them (their bytes
over the throughput measured from peers, plus the wait for a host still
building it) is set against the estimate to install (``host.history``), and
the faster wins unless the request forced one way.  Fetched deltas are
checked (hash, a qcow2 whose backing name is exactly its parent's) and
recorded as a template only when the whole chain is here.

Getting the base image: ``vmmesh image fetch``, and on its own when this host
has none and a peer has: the manifest, then its three files, each by hash,
then the image store verifies the whole again.

The cache under the quota: before fetching or building, templates no VM uses
are evicted, least recently used first, those another host still holds
before the last copies in the mesh.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from vmmesh.api.codec import Empty
from vmmesh.api.common import Progress
from vmmesh.api.figures import Figure, Unit, counter, gauge
from vmmesh.api.host import TemplateInfo
from vmmesh.api.transfer import (
    FETCH_IMAGE,
    FETCH_TEMPLATE,
    IMAGE_MANIFEST,
    INFO,
    PIECES,
    WARM_MANIFEST,
    BlobInfo,
    BlobRequest,
    FetchImageRequest,
    FetchReport,
    FetchTemplateRequest,
    HolderFigures,
    ManifestReply,
    PiecesRequest,
    WarmManifest,
    WarmRequest,
)
from vmmesh.api.vm import FETCH_ALWAYS, FETCH_NEVER, TemplateSource
from vmmesh.errors import (
    CapacityError,
    ImageError,
    IntegrityError,
    NotFound,
    VmmeshError,
)
from vmmesh.extension import NodeContext, NodeExtension
from vmmesh.gossip.hoststate import HostView
from vmmesh.gossip.view import JOINING
from vmmesh.host.history import TransferSample, fetch_estimate
from vmmesh.host.images import (
    DISK,
    INITRD,
    KERNEL,
    MANIFEST,
    ImageStore,
    decode_manifest,
)
from vmmesh.host.templates import TemplateRecord, delta_name
from vmmesh.host.warm import DISK as WARM_DISK
from vmmesh.host.warm import STATE as WARM_STATE
from vmmesh.hypervisor.savedstate import Shape
from vmmesh.net.rpc import Context, Handlers
from vmmesh.progress import progress_pump
from vmmesh.transfer import blobfile, packs
from vmmesh.transfer.fetcher import Fetched, Holder, fetch_blob
from vmmesh.transfer.pieces import HolderStats
from vmmesh.transfer.warmpick import choose as choose_warm

if TYPE_CHECKING:
    from vmmesh.vm.manager import VmManager
    from vmmesh.vmservice.service import VmService

log = logging.getLogger("vmmesh.transfer")

STAGING = "transfer"
PACKS = "packs"
PACK_EVERY = 10.0
STAGING_MAX_AGE = 24 * 3600.0
AUTO_IMAGE_EVERY = 5.0
WAIT_POLL = 0.5
WARM_ASK_TIMEOUT = 120.0  # a holder hashes its warm state's files (~150 MB) before it answers
Emit = Callable[[Progress], None]


class TransferService(NodeExtension):
    """Blobs to and from peers (see the module docstring)."""

    def __init__(self, vms: VmService) -> None:
        self.vms = vms
        self._node: NodeContext | None = None
        self._infos: dict[tuple[str, int, int], BlobInfo] = {}
        self._describing: dict[str, trio.Lock] = {}
        self._image_lock = trio.Lock()
        self._packs: dict[str, tuple[int, packs.Pack]] = {}
        self._unpackable: set[str] = set()
        self.active: dict[int, Progress] = {}  # fetches under way: their last progress
        self._fetch_ids = itertools.count()
        self.received_bytes = 0  # as they came over the wire, counted piece by piece
        self.sent_bytes = 0  # piece data sent to peers
        # warm-state files served by content: sha -> (path, size, mtime_ns) when described
        self._warm_files: dict[str, tuple[Path, int, int]] = {}
        vms.manager_hooks.append(self._hook_manager)

    def figures(self) -> list[Figure]:
        return [
            counter(
                "transfer_received_bytes",
                "Bytes of templates and images this host fetched from peers, as they came "
                "over the wire (counted as each piece is taken).",
                self.received_bytes,
                Unit.BYTES,
            ),
            counter(
                "transfer_sent_bytes",
                "Bytes of pieces this host sent to peers fetching from it.",
                self.sent_bytes,
                Unit.BYTES,
            ),
            gauge("transfers_active", "Fetches this host has under way.", len(self.active)),
        ]

    @property
    def node(self) -> NodeContext:
        assert self._node is not None
        return self._node

    @property
    def staging(self) -> Path:
        return self.node.data_dir / STAGING

    @property
    def packs_dir(self) -> Path:
        return self.node.data_dir / PACKS

    async def start(
        self,
        node: NodeContext,
        nursery: trio.Nursery,
        peer_handlers: Handlers,
        control_handlers: Handlers,
    ) -> None:
        self._node = node
        peer_handlers.add(INFO, self._info)
        peer_handlers.add(PIECES, self._pieces)
        peer_handlers.add(IMAGE_MANIFEST, self._manifest)
        peer_handlers.add(WARM_MANIFEST, self._warm_manifest)
        control_handlers.add(FETCH_TEMPLATE, self._ctl_fetch_template)
        control_handlers.add(FETCH_IMAGE, self._ctl_fetch_image)
        for name in blobfile.sweep(self.staging, STAGING_MAX_AGE, time.time()):
            log.info("reconcile: stale transfer file %s/%s", STAGING, name)
        if self.vms.mgr is not None:
            self._hook_manager(self.vms.mgr)
        if node.cfg.image_autofetch:
            nursery.start_soon(self._auto_image)
        if node.cfg.pack_level:
            nursery.start_soon(self._packer, node.cfg.pack_level)

    def _hook_manager(self, mgr: VmManager) -> None:
        mgr.templates.fetcher = self
        mgr.templates.downloaders = self._downloaders
        mgr.warm_sched.fetch_first = self._warm_instead_of_boot

    def _downloaders(self) -> int:
        """Hosts fetching packages from the source right now, this one included."""
        others = sum(len(h.building) for h in self._others())
        return 1 + others

    def _others(self) -> list[HostView]:
        return [h for h in self.node.hosts() if h.node_id != self.node.node_id and h.status == "up"]

    # --- serving ------------------------------------------------------------

    def _path_of(self, sha: str) -> Path:
        """The file this host holds under content name ``sha``; NotFound otherwise."""
        mgr = self.vms.mgr
        if mgr is not None and any(sha in r.chain for r in mgr.templates.records()):
            path = mgr.templates.delta_path(sha)
            if path.is_file():
                return path
        store = ImageStore(self.node.data_dir)
        for rec in store.list_images():
            for name, digest in (
                (DISK, rec.image_id),
                (KERNEL, rec.kernel_sha256),
                (INITRD, rec.initrd_sha256),
            ):
                if digest == sha:
                    return rec.path / name
        known = self._warm_files.get(sha)
        if known is not None:
            path, size, mtime = known
            with contextlib.suppress(OSError):
                st = path.stat()
                if (st.st_size, st.st_mtime_ns) == (size, mtime):
                    return path
            del self._warm_files[sha]  # dropped or remade since it was described
        raise NotFound(f"this host holds no blob {sha[:16]}")

    async def blob_info(self, sha: str) -> tuple[Path, BlobInfo]:
        path = self._path_of(sha)
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        lock = self._describing.setdefault(sha, trio.Lock())
        async with lock:
            info = self._infos.get(key)
            if info is None:
                info = await trio.to_thread.run_sync(blobfile.describe, path, sha)
                self._infos[key] = info
        return path, info

    async def _info(self, ctx: Context, req: BlobRequest) -> BlobInfo:
        return (await self.blob_info(req.sha256))[1]

    async def _pieces(self, ctx: Context, req: PiecesRequest) -> Empty:
        path, info = await self.blob_info(req.sha256)
        for index in req.indices:
            if index >= len(info.pieces):
                raise NotFound(f"blob {req.sha256[:16]} has no piece {index}")
            pack = self._pack_of(info)
            if pack is not None:
                chunks = await trio.to_thread.run_sync(pack.chunks, index)
            else:
                chunks = await trio.to_thread.run_sync(blobfile.read_chunks, path, info, index)
            for chunk in chunks:
                await ctx.send_item(chunk)
                self.sent_bytes += len(chunk.data)
        return Empty()

    def _pack_of(self, info: BlobInfo) -> packs.Pack | None:
        """The pack this host made of blob ``info``, if it has one that fits."""
        path = packs.pack_path(self.packs_dir, info.sha256)
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return None
        known = self._packs.get(info.sha256)
        if known is not None and known[0] == mtime and known[1].info == info:
            return known[1]
        pack = packs.Pack.open(path, info)
        if pack is not None:
            self._packs[info.sha256] = (mtime, pack)
        return pack

    def _held_deltas(self) -> set[str]:
        mgr = self.vms.mgr
        if mgr is None:
            return set()
        templates = mgr.templates
        return {sha for r in templates.records() for sha in r.chain if templates.has_delta(sha)}

    async def _packer(self, level: int) -> None:
        """Every template delta held here gets a pack, one at a time, in a niced process;
        packs of deltas no longer held go (see ``transfer.packs``)."""
        while True:
            if self.vms.mgr is not None:
                held = self._held_deltas()
                for name in packs.sweep(self.packs_dir, held):
                    log.debug("pack %s removed", name)
                for sha in sorted(held - self._unpackable):
                    if not packs.pack_path(self.packs_dir, sha).exists():
                        await self._make_pack(sha, level)
            await trio.sleep(PACK_EVERY)

    async def _make_pack(self, sha: str, level: int) -> None:
        blob = self.vms.manager().templates.delta_path(sha)
        dest = packs.pack_path(self.packs_dir, sha)
        self.packs_dir.mkdir(exist_ok=True)
        cmd = ["nice", "-n", "19", sys.executable, "-m", "vmmesh.transfer.packs"]
        started = time.monotonic()
        try:
            res = await trio.run_process(
                [*cmd, str(blob), sha, str(dest), str(level)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        except OSError as exc:  # no `nice`, no room for a process: serve as compressed on the fly
            self._unpackable.add(sha)
            log.warning("no pack of delta %s: cannot run %s: %s", sha[:12], cmd[0], exc)
            return
        if res.returncode != 0:
            if sha in self._held_deltas():
                self._unpackable.add(sha)
                err = res.stderr.decode(errors="replace").strip()[-300:]
                log.warning("no pack of delta %s: %s", sha[:12], err or res.returncode)
            return
        try:
            sizes = blob.stat().st_size / 1e6, dest.stat().st_size / 1e6
        except OSError:  # the template went while it was packed: so does the pack
            dest.unlink(missing_ok=True)
            return
        log.info(
            "packed delta %s: %.1f MB -> %.1f MB in %.0f s (zstd %d)",
            sha[:12],
            *sizes,
            time.monotonic() - started,
            level,
        )

    async def _manifest(self, ctx: Context, req: BlobRequest) -> ManifestReply:
        store = ImageStore(self.node.data_dir)
        rec = store.get(req.sha256)
        return ManifestReply(manifest=(rec.path / MANIFEST).read_bytes())

    # --- warm states ---------------------------------------------------------------

    async def _warm_manifest(self, ctx: Context, req: WarmRequest) -> WarmManifest:
        """This host's warm state of a template or base image, its files named by content
        (and from then on served as blobs, while they stay as they were)."""
        mgr = self.vms.mgr
        warm = mgr.warm_sched.store() if mgr is not None else None
        state = warm.get(req.key) if warm is not None else None
        if state is None:
            raise NotFound(f"this host holds no warm state of {req.key[:16]}")
        named: list[tuple[str, int]] = []
        for path in (state.state, state.disk):
            st = path.stat()
            info = await self._describe_own(path, st.st_size, st.st_mtime_ns)
            self._warm_files[info.sha256] = (path, st.st_size, st.st_mtime_ns)
            named.append((info.sha256, info.size))
        (state_sha, state_size), (disk_sha, disk_size) = named
        return WarmManifest(
            key=req.key,
            shape=state.shape.to_json(),
            made_seconds=state.made_seconds,
            state_sha256=state_sha,
            state_size=state_size,
            disk_sha256=disk_sha,
            disk_size=disk_size,
        )

    async def _describe_own(self, path: Path, size: int, mtime: int) -> BlobInfo:
        """The piece table of a file of this host's, named by what it hashes to (kept
        where ``blob_info`` finds it: the pieces asked next need no second reading)."""
        key = (str(path), size, mtime)
        lock = self._describing.setdefault(str(path), trio.Lock())
        async with lock:
            info = self._infos.get(key)
            if info is None:
                info = await trio.to_thread.run_sync(blobfile.describe, path, None)
                self._infos[key] = info
        return info

    def warm_holders(self, key: str) -> list[HostView]:
        """Peers that may hold a warm state of ``key``: those that gossip one of the
        template, or (a base image's) every peer holding the image."""
        held = self.holders_of(key)
        if held:
            return [h for h, t in held if t.warm]
        return [h for h in self._others() if key in h.images]

    async def _warm_instead_of_boot(self, key: str, disk: Path) -> bool:
        """(the warm scheduler, before a warm boot) fetch a peer's state instead?"""
        return await self.fetch_warm(key, self.warm_holders(key), disk, None) > 0

    async def fetch_warm(
        self, key: str, hosts: Sequence[HostView], disk: Path, emit: Emit | None
    ) -> int:
        """Fetch a peer's warm state of ``key`` (whose VMs' disks sit on ``disk``) if
        one fits this host's guests and fetching it beats a warm boot here; the bytes
        it moved on the wire, 0 if none was fetched (why is logged).  Never fails:
        without it the warm state is made here as before."""
        mgr = self.vms.mgr
        warm = mgr.warm_sched.store() if mgr is not None else None
        if mgr is None or warm is None or not hosts:
            return 0
        if warm.get(key) is not None or warm.making(key):
            return 0
        answers: dict[str, WarmManifest] = {}

        async def ask(h: HostView) -> None:
            try:
                answers[h.node_id] = await self.node.pool.call(
                    h.node_id, WARM_MANIFEST, WarmRequest(key=key), WARM_ASK_TIMEOUT
                )
            except VmmeshError as exc:
                log.debug("warm state of %s: %s did not describe one: %s", key[:12], h.name, exc)

        async with trio.open_nursery() as nursery:  # all at once: a slow holder delays none
            for h in hosts:
                nursery.start_soon(ask, h)
        offers = [
            (Holder(h.node_id, h.name), answers[h.node_id]) for h in hosts if h.node_id in answers
        ]
        policy = mgr.warm_sched.policy
        spec = warm.spec("warm-fetch", disk, warm.run_root, policy.vm_vcpus, policy.vm_memory_mb)
        ours = await warm.hv.shape(spec)
        base = warm.get(mgr.templates.base.image_id)
        history = mgr.templates.history

        def estimate(size: int) -> float:
            return fetch_estimate(history.transfers(), size).seconds

        choice = choose_warm(key, offers, ours, estimate, base.made_seconds if base else None)
        if choice.manifest is None:
            log.info("warm state of %s not fetched: %s", key[:12], choice.why)
            return 0
        if not mgr.warm_sched.trim(-(-choice.size // (1 << 20)), keep=key):
            log.info("warm state of %s not fetched: no room in the storage quota", key[:12])
            return 0
        return await self._fetch_warm_files(key, choice.manifest, choice.holders, disk, emit)

    async def _fetch_warm_files(
        self,
        key: str,
        m: WarmManifest,
        holders: Sequence[Holder],
        disk: Path,
        emit: Emit | None,
    ) -> int:
        mgr = self.vms.manager()
        warm = mgr.warm_sched.store()
        assert warm is not None
        log.info("warm state of %s: fetching %.0f MB", key[:12], (m.state_size + m.disk_size) / 1e6)
        staging = warm.staging(key)  # says "making": no warm boot starts meanwhile
        results: list[Fetched] = []
        try:
            for sha, name in ((m.state_sha256, WARM_STATE), (m.disk_sha256, WARM_DISK)):
                task = f"warm state of {key[:12]} ({name})"
                got = await self._fetch(sha, list(holders), task, emit)
                results.append(got)
                os.replace(got.path, staging / name)
            backing = await warm.hv.backing_of(staging / WARM_DISK)
            expected = _relative(disk, staging)
            if backing != expected:
                raise IntegrityError(
                    f"its overlay backs onto {backing!r:.80}, not {expected!r}: refused"
                )
        except (VmmeshError, OSError) as exc:
            warm.abandon(key)
            log.warning("warm state of %s not fetched: %s", key[:12], exc)
            return 0
        finally:
            for got in results:
                got.path.unlink(missing_ok=True)
        source = ", ".join(h.name for h in holders)
        if warm.receive(key, Shape.of(m.shape), m.made_seconds, source) is None:
            return 0
        seconds = sum(r.seconds for r in results)
        size = m.state_size + m.disk_size
        mgr.templates.history.add_transfer(
            TransferSample(bytes=size, seconds=seconds, holders=len(holders))
        )
        mgr.templates.on_change()
        self.vms.publish_now()
        return sum(r.wire_bytes for r in results)

    # --- templates: fetch or install ------------------------------------------

    def holders_of(self, tid: str) -> list[tuple[HostView, TemplateInfo]]:
        out = []
        for h in self._others():
            for t in h.templates:
                if t.template_id == tid:
                    out.append((h, t))
        return out

    async def obtain(
        self,
        template_id: str,
        wanted: frozenset[str],
        install_estimate: float,
        policy: str,
        progress: Callable[[str, float | None], None],
    ) -> tuple[TemplateRecord | None, TemplateSource]:
        """Fetch ``template_id`` from peers if that is faster (or asked); None: build it."""
        templates = self.vms.manager().templates
        ie = round(install_estimate, 1)
        if policy == FETCH_NEVER:
            return None, TemplateSource(
                how="built", install_estimate=ie, why="installing was asked"
            )
        holders = self.holders_of(template_id)
        if not holders:
            holders, source = await self._wait_for_builder(template_id, install_estimate, policy)
            if not holders:
                return None, source
        info, hosts = _best_chain(holders)
        missing = [
            (sha, size)
            for sha, size in zip(info.chain, info.delta_sizes, strict=True)
            if not templates.has_delta(sha)
        ]
        missing_bytes = sum(size for _, size in missing)
        fe = fetch_estimate(templates.history.transfers(), missing_bytes).seconds
        names = ", ".join(h.name for h in hosts)
        if policy != FETCH_ALWAYS and fe >= install_estimate:
            why = (
                f"installing ({ie:.0f} s) beats fetching {missing_bytes / 1e6:.1f} MB "
                f"from {names} ({fe:.0f} s)"
            )
            return None, TemplateSource(
                how="built", install_estimate=ie, fetch_estimate=round(fe, 1), why=why
            )
        progress(f"fetching from {names}", 0.0)
        await self.make_room(missing_bytes)
        results = await self._fetch_chain(info, missing, hosts, _phase_emitter(progress))
        moved = sum(r.wire_bytes for r in results)
        why = (
            "fetching was asked"
            if policy == FETCH_ALWAYS
            else f"fetching {missing_bytes / 1e6:.1f} MB from {names} ({fe:.0f} s) "
            f"beats installing ({ie:.0f} s)"
        )
        rec = templates.get(template_id)
        # its VMs resume a holder's warm state rather than boot (and no warm boot follows)
        warm_hosts = [h for h, t in holders if t.warm and t.chain == info.chain]
        warm_bytes = await self.fetch_warm(
            template_id, warm_hosts, templates.disk_path(rec), _phase_emitter(progress)
        )
        if warm_bytes:
            why += f"; and its warm state ({warm_bytes / 1e6:.0f} MB on the wire)"
        return rec, TemplateSource(
            how="fetched",
            install_estimate=ie,
            fetch_estimate=round(fe, 1),
            why=why,
            bytes_fetched=moved + warm_bytes,
            warm_bytes=warm_bytes,
        )

    async def _wait_for_builder(
        self, tid: str, install_estimate: float, policy: str
    ) -> tuple[list[tuple[HostView, TemplateInfo]], TemplateSource]:
        """If a peer is building ``tid`` and waiting for it then fetching is faster (or asked),
        wait; the holders it then has, or none and why not."""
        ie = round(install_estimate, 1)
        builders = [(h, b) for h in self._others() for b in h.building if b.template_id == tid]
        if not builders:
            return [], TemplateSource(how="built", install_estimate=ie, why="no host holds it")
        host, building = min(builders, key=lambda hb: hb[1].done_at)
        templates = self.vms.manager().templates
        wait = max(0.0, building.done_at - time.time())
        guess = templates._delta_guess(1)
        fe = fetch_estimate(templates.history.transfers(), guess, wait).seconds
        if policy != FETCH_ALWAYS and fe >= install_estimate:
            why = f"installing ({ie:.0f} s) beats waiting for {host.name} to build it ({fe:.0f} s)"
            return [], TemplateSource(how="built", install_estimate=ie, fetch_estimate=fe, why=why)
        log.info("template %s: waiting for %s to build it (~%.0f s)", tid[:12], host.name, wait)
        with trio.move_on_after(wait + max(60.0, install_estimate)):
            while True:
                holders = self.holders_of(tid)
                if holders:
                    return holders, TemplateSource()
                still = any(b.template_id == tid for h in self._others() for b in h.building)
                if not still:
                    break
                await trio.sleep(WAIT_POLL)
        why = f"{host.name} did not finish building it"
        return [], TemplateSource(how="built", install_estimate=ie, fetch_estimate=fe, why=why)

    async def _fetch_chain(
        self,
        info: TemplateInfo,
        missing: Sequence[tuple[str, int]],
        hosts: Sequence[HostView],
        emit: Emit,
    ) -> list[Fetched]:
        """Fetch, check and record the deltas of ``info`` this host lacks; what each
        fetch moved, from whom."""
        templates = self.vms.manager().templates
        holders = [Holder(h.node_id, h.name) for h in hosts]
        staged: dict[str, Path] = {}
        results: list[Fetched] = []
        seconds = 0.0
        try:
            for n, (sha, _size) in enumerate(missing):
                got = await self._fetch(
                    sha,
                    holders,
                    f"template {info.template_id[:12]} delta {n + 1}/{len(missing)}",
                    emit,
                    keep_pack=bool(self.node.cfg.pack_level),
                )
                await self._check_delta(got.path, info, sha)
                staged[sha] = got.path
                results.append(got)
                seconds += got.seconds
            templates.record_fetched(info, staged)
            self._keep_packs(results)
        finally:
            for path in staged.values():
                path.unlink(missing_ok=True)
            for got in results:
                if got.pack is not None:
                    got.pack.unlink(missing_ok=True)
        templates.history.add_transfer(
            TransferSample(bytes=sum(s for _, s in missing), seconds=seconds, holders=len(holders))
        )
        self.vms.publish_now()
        return results

    async def _fetch(
        self, sha: str, holders: list[Holder], task: str, emit: Emit | None, keep_pack: bool = False
    ) -> Fetched:
        """``fetch_blob``, shown in ``active`` while it runs (the web page's bars)."""
        key = next(self._fetch_ids)

        def track(item: Progress) -> None:
            self.active[key] = item
            if emit is not None:
                emit(item)

        self.active[key] = Progress(task=task, phase="asking the holders", fraction=0.0)
        try:
            got = await fetch_blob(
                self.node.pool,
                sha,
                holders,
                self.staging,
                task=task,
                emit=track,
                keep_pack=keep_pack,
                on_wire=self._received,
            )
        finally:
            del self.active[key]
        return got

    def _received(self, wire_bytes: int) -> None:
        self.received_bytes += wire_bytes

    def _keep_packs(self, results: list[Fetched]) -> None:
        """Packs put together from what the holders sent become this host's packs (the
        packer then has nothing to do for those deltas)."""
        for got in results:
            if got.pack is None:
                continue
            sha = got.pack.name.removesuffix(packs.SUFFIX)
            self.packs_dir.mkdir(exist_ok=True)
            try:
                os.replace(got.pack, packs.pack_path(self.packs_dir, sha))
            except OSError as exc:
                log.info("pack of delta %s not kept: %s", sha[:12], exc)
            else:
                log.info("delta %s: kept the pack it came in", sha[:12])

    async def _check_delta(self, path: Path, info: TemplateInfo, sha: str) -> None:
        """A fetched delta must back onto exactly what our layout names: its parent delta,
        or this mesh's base image."""
        templates = self.vms.manager().templates
        index = info.chain.index(sha)
        expected = (
            delta_name(info.chain[index - 1])
            if index
            else _relative(templates.base.disk, templates.dir)
        )
        try:
            backing = await templates.hv.backing_of(path)
        except ImageError as exc:
            raise IntegrityError(f"delta {sha[:16]} is not a usable qcow2: {exc}") from None
        if backing != expected:
            raise IntegrityError(
                f"delta {sha[:16]} backs onto {backing!r:.80}, not {expected!r}: refused"
            )

    async def make_room(self, need_bytes: int) -> None:
        mgr = self.vms.manager()
        cap = mgr.capacity()
        free = cap.storage_free_mb * (1 << 20) - mgr.policy.vm_disk_allowance_mb * (1 << 20)
        if free >= need_bytes:
            return
        in_use = {v.template_id for v in mgr.list_vms() if v.template_id}
        held_elsewhere = {t.template_id for h in self._others() for t in h.templates}
        order = sorted(
            mgr.templates.evictable(in_use),
            key=lambda r: (r.template_id not in held_elsewhere, r.last_used),
        )
        for rec in order:
            freed = mgr.templates.remove(rec.template_id)
            freed += sum(packs.sweep(self.packs_dir, self._held_deltas()).values())
            free += freed
            last = "" if rec.template_id in held_elsewhere else " (the last copy in the mesh)"
            log.info("evicted template %s, %d MB%s", rec.template_id[:12], freed >> 20, last)
            if free >= need_bytes:
                self.vms.publish_now()
                return
        self.vms.publish_now()
        if free < need_bytes:
            raise CapacityError(
                f"no room for {need_bytes >> 20} MB of template in the storage quota "
                f"({mgr.policy.storage_quota_mb} MB): every template left is in use"
            )

    # --- by hand ---------------------------------------------------------------

    async def _ctl_fetch_template(self, ctx: Context, req: FetchTemplateRequest) -> FetchReport:
        """``vmmesh fetch TEMPLATE [--from HOST]...``: this template from the peers that
        hold it, or from those named (like ``lxc image copy``), whatever the estimates say."""
        matches = {
            t.template_id
            for h in self._others()
            for t in h.templates
            if t.template_id.startswith(req.template)
        }
        if len(matches) != 1:
            what = "no host holds" if not matches else "more than one template matches"
            raise NotFound(f"{what} template {req.template!r}")
        tid = matches.pop()
        templates = self.vms.manager().templates
        with contextlib.suppress(NotFound):
            templates.get(tid)
            return FetchReport(what="template", item_id=tid, already_here=True)
        held = self.holders_of(tid)
        if req.sources:
            held = [(h, t) for h, t in held if h.name in req.sources]
            if not held:
                names = ", ".join(sorted(req.sources))
                raise NotFound(f"template {tid[:12]} is not held by {names}")
        info, hosts = _best_chain(held)
        missing = [
            (sha, size)
            for sha, size in zip(info.chain, info.delta_sizes, strict=True)
            if not templates.has_delta(sha)
        ]
        started = time.monotonic()
        await self.make_room(sum(size for _, size in missing))
        async with progress_pump(ctx.send_item) as emit:
            results = await self._fetch_chain(info, missing, hosts, emit)
        mgr = self.vms.manager()
        mgr.schedule_warm(mgr.templates.get(tid))  # no request waits on it: warm it now
        holders = [Holder(h.node_id, h.name) for h in hosts]
        return _report("template", tid, results, holders, time.monotonic() - started)

    # --- the base image ----------------------------------------------------------

    def mesh_image(self) -> tuple[str, list[HostView]]:
        """The base image most up peers hold as their default, and who holds it."""
        votes: dict[str, int] = {}
        for h in self._others():
            if h.images:
                votes[h.images[0]] = votes.get(h.images[0], 0) + 1
        if not votes:
            joining = [h.name for h in self.node.hosts() if h.status == JOINING]
            wait = f" (not known yet of {', '.join(joining)}: joining)" if joining else ""
            raise NotFound(f"no peer holds a base image{wait}")
        image_id = max(votes, key=lambda i: (votes[i], i))
        return image_id, [h for h in self._others() if image_id in h.images]

    async def fetch_image(self, image_id: str, emit: Emit | None) -> FetchReport:
        """Fetch base image ``image_id`` (default: the mesh's) from the peers that hold it."""
        async with self._image_lock:
            store = ImageStore(self.node.data_dir)
            if not image_id:
                image_id, hosts = self.mesh_image()
            else:
                hosts = [h for h in self._others() if image_id in h.images]
            if store.has(image_id):
                return FetchReport(what="base image", item_id=image_id, already_here=True)
            if not hosts:
                raise NotFound(f"no peer holds base image {image_id[:16]}")
            return await self._fetch_image_files(store, image_id, hosts, emit)

    async def _fetch_image_files(
        self, store: ImageStore, image_id: str, hosts: list[HostView], emit: Emit | None
    ) -> FetchReport:
        started = time.monotonic()
        holders = [Holder(h.node_id, h.name) for h in hosts]
        ask = BlobRequest(sha256=image_id)
        reply = await self.node.pool.call(hosts[0].node_id, IMAGE_MANIFEST, ask)
        record = decode_manifest(reply.manifest, self.staging)
        if record.image_id != image_id:
            raise IntegrityError(f"{hosts[0].name} sent the manifest of another image")
        files: dict[str, Path] = {}
        results: list[Fetched] = []
        try:
            wanted = (
                (DISK, image_id),
                (KERNEL, record.kernel_sha256),
                (INITRD, record.initrd_sha256),
            )
            for name, sha in wanted:
                task = f"base image {name}"
                got = await self._fetch(sha, holders, task, emit)
                files[name] = got.path
                results.append(got)
            rec = await trio.to_thread.run_sync(store.add_fetched, reply.manifest, files)
        finally:
            for path in files.values():
                path.unlink(missing_ok=True)
        if store.default_id() is None:
            store.set_default(rec.image_id)
        self.vms.publish_now()
        return _report("base image", rec.image_id, results, holders, time.monotonic() - started)

    async def _ctl_fetch_image(self, ctx: Context, req: FetchImageRequest) -> FetchReport:
        async with progress_pump(ctx.send_item) as emit:
            return await self.fetch_image(req.image_id, emit)

    async def _auto_image(self) -> None:
        """A host without a base image gets the mesh's from its peers, on its own."""
        while self.vms.mgr is None:
            await trio.sleep(AUTO_IMAGE_EVERY)
            if self.vms.mgr is not None or self.vms.fixed_image:
                return
            if ImageStore(self.node.data_dir).default_id() is not None:
                continue  # the VM service takes it up
            try:
                image_id, hosts = self.mesh_image()
            except NotFound:
                continue
            names = ", ".join(h.name for h in hosts)
            log.info("fetching the mesh's base image %s from %s", image_id[:16], names)
            try:
                report = await self.fetch_image(image_id, None)
            except VmmeshError as exc:
                log.warning("fetching the base image failed: %s (will try again)", exc)
                continue
            mb = report.bytes >> 20
            log.info("base image %s fetched: %d MB in %.1f s", image_id[:16], mb, report.seconds)


def _relative(target: Path, start: Path) -> str:
    return os.path.relpath(target.absolute(), start.absolute())


def _best_chain(
    holders: list[tuple[HostView, TemplateInfo]],
) -> tuple[TemplateInfo, list[HostView]]:
    """The delta chain most holders share (two builds of one package set differ in bytes)."""
    by_chain: dict[tuple[str, ...], list[tuple[HostView, TemplateInfo]]] = {}
    for h, t in holders:
        by_chain.setdefault(t.chain, []).append((h, t))
    best = max(by_chain.values(), key=lambda group: (len(group), group[0][1].chain))
    return best[0][1], [h for h, _ in best]


def _phase_emitter(progress: Callable[[str, float | None], None]) -> Emit:
    """Blob progress as phases of a share's progress bar (with the rate and holders)."""

    def emit(item: Progress) -> None:
        mb, total, rate = item.done / 1e6, item.total / 1e6, item.rate / 1e6
        progress(f"fetching {mb:.0f}/{total:.0f} MB, {rate:.1f} MB/s ({item.note})", item.fraction)

    return emit


def _report(
    what: str, item_id: str, results: list[Fetched], holders: list[Holder], seconds: float
) -> FetchReport:
    per: dict[str, HolderStats] = {}
    for r in results:
        for nid, s in r.holders.items():
            agg = per.setdefault(nid, HolderStats())
            agg.bytes += s.bytes
            agg.pieces += s.pieces
            agg.dropped = agg.dropped or s.dropped
    names = {h.node_id: h.name for h in holders}
    return FetchReport(
        what=what,
        item_id=item_id,
        bytes=sum(r.size for r in results),
        wire_bytes=sum(r.wire_bytes for r in results),
        seconds=round(seconds, 2),
        holders=tuple(
            HolderFigures(
                host=names.get(n, n[:12]), bytes=s.bytes, pieces=s.pieces, dropped=s.dropped[:300]
            )
            for n, s in per.items()
        ),
    )


__all__ = ["TransferService"]
