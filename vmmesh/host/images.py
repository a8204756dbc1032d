"""Content-addressed store of base images: add, verify, import, export.

Theory of operation
-------------------
A base image is a directory ``<data_dir>/images/<image_id>/`` holding exactly
four files with fixed names: ``disk.qcow2`` (the root file system),
``vmlinuz`` and ``initrd.img`` (direct kernel boot) and ``manifest.json``.
``image_id`` is the sha256 of ``disk.qcow2``; the manifest also carries the
sha256 and size of the kernel and initrd, so one id pins all three.

Images arrive from a local build or from a peer (a tar, optionally zstd
compressed), and a host refuses to start VMs on one whose content does not
match its manifest.  So:

* nothing from a manifest or a tar member becomes a path: file names must be
  the four fixed names, ids must be 64 lowercase hex digits;
* the qcow2 header is checked to be self-contained (no backing file, no
  external data file), since a crafted disk could otherwise make QEMU open a
  host file;
* an image is assembled in a temporary directory inside ``images/``, verified
  there, and renamed to its id: a crash or a corrupt transfer leaves at most a
  ``.partial-*`` directory that the next node start sweeps
  (``sweep_unfinished``), never a half-written image under a valid id.

Hashing a base disk (a few hundred MB) takes about a second; callers verify
when an image is added and at node start, not before every VM.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard

from vmmesh.errors import ImageError, IntegrityError, NotFound, UsageError
from vmmesh.hypervisor.base import ImageManifest
from vmmesh.hypervisor.qcow2 import qcow2_virtual_size

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
DISK = "disk.qcow2"
KERNEL = "vmlinuz"
INITRD = "initrd.img"
MANIFEST = "manifest.json"
IMAGE_FILES = (MANIFEST, DISK, KERNEL, INITRD)  # manifest first: a reader can check early
MAX_MANIFEST_BYTES = 4 << 20
_ID_RE = re.compile(r"[0-9a-f]{64}")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20
_PARTIAL = ".partial-"
_DEFAULT = "default"


@dataclass(frozen=True)
class ImageRecord:
    """A stored image: its manifest plus the hashes ``ImageManifest`` has no field for."""

    manifest: ImageManifest
    path: Path  # the image directory
    kernel_sha256: str
    kernel_size: int
    initrd_sha256: str
    initrd_size: int
    virtual_size: int  # the disk's size as the guest sees it

    @property
    def image_id(self) -> str:
        return self.manifest.image_id

    @property
    def disk_path(self) -> Path:
        return self.path / DISK

    @property
    def kernel_path(self) -> Path:
        return self.path / KERNEL

    @property
    def initrd_path(self) -> Path:
        return self.path / INITRD


# --- pure parts -------------------------------------------------------------


def check_image_id(image_id: str) -> str:
    """Return ``image_id`` if it is 64 lowercase hex digits, else raise UsageError."""
    if not isinstance(image_id, str) or not _ID_RE.fullmatch(image_id):
        raise UsageError(f"not an image id (64 hex digits): {image_id!r}")
    return image_id


def encode_manifest(record: ImageRecord) -> bytes:
    m = record.manifest
    doc = {
        "version": MANIFEST_VERSION,
        "image_id": m.image_id,
        "disk": m.disk,
        "kernel": m.kernel,
        "initrd": m.initrd,
        "cmdline": m.cmdline,
        "size": m.size,
        "virtual_size": record.virtual_size,
        "kernel_sha256": record.kernel_sha256,
        "kernel_size": record.kernel_size,
        "initrd_sha256": record.initrd_sha256,
        "initrd_size": record.initrd_size,
        "packages": list(m.packages),
        "created": m.created,
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def _field(doc: dict[str, Any], name: str, kind: type) -> Any:
    value = doc.get(name)
    if kind is int and isinstance(value, bool):
        raise ImageError(f"manifest field {name!r} must be {kind.__name__}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        raise ImageError(f"manifest field {name!r} must be {kind.__name__}")
    return value


def decode_manifest(data: bytes, path: Path) -> ImageRecord:
    """Parse and validate a manifest; ``path`` is the directory it describes."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"manifest is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ImageError("manifest is not a JSON object")
    if doc.get("version") != MANIFEST_VERSION:
        raise ImageError(f"unsupported manifest version {doc.get('version')!r}")
    names = {"disk": DISK, "kernel": KERNEL, "initrd": INITRD}
    for key, expected in names.items():
        if doc.get(key) != expected:
            raise ImageError(f"manifest {key!r} must be {expected!r}")
    hashes = {}
    for key in ("image_id", "kernel_sha256", "initrd_sha256"):
        value = _field(doc, key, str)
        if not _ID_RE.fullmatch(value):
            raise ImageError(f"manifest {key!r} is not a sha256")
        hashes[key] = value
    sizes = {}
    for key in ("size", "virtual_size", "kernel_size", "initrd_size"):
        value = _field(doc, key, int)
        if value < 0:
            raise ImageError(f"manifest {key!r} is negative")
        sizes[key] = value
    packages = _field(doc, "packages", list)
    if not all(isinstance(p, str) for p in packages):
        raise ImageError("manifest 'packages' must be a list of strings")
    manifest = ImageManifest(
        image_id=hashes["image_id"],
        disk=DISK,
        kernel=KERNEL,
        initrd=INITRD,
        cmdline=_field(doc, "cmdline", str),
        size=sizes["size"],
        packages=tuple(packages),
        created=_field(doc, "created", float),
    )
    return ImageRecord(
        manifest=manifest,
        path=path,
        kernel_sha256=hashes["kernel_sha256"],
        kernel_size=sizes["kernel_size"],
        initrd_sha256=hashes["initrd_sha256"],
        initrd_size=sizes["initrd_size"],
        virtual_size=sizes["virtual_size"],
    )


# --- files ------------------------------------------------------------------


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def read_manifest(image_dir: Path) -> ImageRecord:
    """The record of ``image_dir`` from its manifest alone (no hashing)."""
    path = image_dir / MANIFEST
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError as exc:
        raise ImageError(f"{image_dir} has no {MANIFEST}") from exc
    if len(data) > MAX_MANIFEST_BYTES:
        raise ImageError("manifest is too large")
    return decode_manifest(data, image_dir)


def verify(image_dir: Path) -> ImageRecord:
    """Recompute every hash of ``image_dir`` and check them against its manifest.

    Raises ImageError when a file is missing, the manifest is malformed or
    the disk is not a self-contained qcow2, and IntegrityError when content
    does not match the manifest.  Returns the verified record.
    """
    record = read_manifest(image_dir)
    for name in IMAGE_FILES:
        path = image_dir / name
        if path.is_symlink() or not path.is_file():
            raise ImageError(f"{image_dir} lacks a regular file {name}")
    with record.disk_path.open("rb") as fh:
        virtual_size = qcow2_virtual_size(fh.read(4096))
    if virtual_size != record.virtual_size:
        raise IntegrityError(f"{DISK}: virtual size does not match the manifest")
    expected = {
        DISK: (record.image_id, record.manifest.size),
        KERNEL: (record.kernel_sha256, record.kernel_size),
        INITRD: (record.initrd_sha256, record.initrd_size),
    }
    for name, (want_hash, want_size) in expected.items():
        path = image_dir / name
        if path.stat().st_size != want_size:
            raise IntegrityError(f"{name}: size does not match the manifest")
        got, _ = _hash_file(path)
        if got != want_hash:
            raise IntegrityError(f"{name}: sha256 {got} does not match the manifest")
    return record


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ImageStore:
    """The images under ``<data_dir>/images``; one instance per node."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "images"
        self.root.mkdir(parents=True, exist_ok=True)

    def sweep_unfinished(self) -> list[str]:
        """Remove ``.partial-*`` left by a crash; only at node start, never in passing:
        an image being added right now (a fetch, verified in a worker thread) is one
        too, and a sweep in every new ``ImageStore`` once deleted its files midway."""
        removed = []
        for leftover in sorted(self.root.glob(f"{_PARTIAL}*")):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(f"unfinished image {leftover.name}")
        return removed

    def path(self, image_id: str) -> Path:
        return self.root / check_image_id(image_id)

    def has(self, image_id: str) -> bool:
        return (self.path(image_id) / MANIFEST).is_file()

    def get(self, image_id: str) -> ImageRecord:
        """The stored image's record from its manifest (NotFound if absent)."""
        path = self.path(image_id)
        if not (path / MANIFEST).is_file():
            raise NotFound(f"no base image {image_id}")
        record = read_manifest(path)
        if record.image_id != image_id:
            raise ImageError(f"image directory {image_id} holds a manifest for {record.image_id}")
        return record

    def verify(self, image_id: str) -> ImageRecord:
        """``verify`` the stored image, also checking it sits under its own id."""
        record = self.get(image_id)
        return verify(record.path)

    def list_images(self) -> list[ImageRecord]:
        """Stored images, oldest first; a directory with a broken manifest is skipped."""
        records = []
        for path in self.root.iterdir():
            if not _ID_RE.fullmatch(path.name):
                continue
            try:
                records.append(self.get(path.name))
            except ImageError as exc:
                log.warning("skipping image %s: %s", path.name, exc)
        return sorted(records, key=lambda r: (r.manifest.created, r.image_id))

    def default_image(self) -> ImageRecord:
        """The image new templates start from: set explicitly, else the first one added."""
        try:
            image_id = (self.root / _DEFAULT).read_text().strip()
        except FileNotFoundError:
            raise NotFound("no default base image (build or import one)") from None
        if not _ID_RE.fullmatch(image_id):
            raise ImageError(f"{self.root / _DEFAULT} names no image id: {image_id[:80]!r}")
        return self.get(image_id)

    def default_id(self) -> str | None:
        """The default image's id; None when there is none or its record is unreadable."""
        try:
            return self.default_image().image_id
        except (NotFound, ImageError):
            return None

    def set_default(self, image_id: str) -> None:
        self.get(image_id)
        tmp = self.root / f"{_PARTIAL}{_DEFAULT}"
        tmp.write_text(image_id + "\n")
        tmp.replace(self.root / _DEFAULT)

    @contextmanager
    def _partial(self) -> Iterator[Path]:
        """A scratch directory inside the store, removed unless it was renamed away."""
        tmp = Path(tempfile.mkdtemp(prefix=_PARTIAL, dir=self.root))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _commit(self, tmp: Path) -> ImageRecord:
        """Verify the assembled ``tmp`` and rename it to its id (or keep the existing copy)."""
        record = verify(tmp)
        final = self.path(record.image_id)
        if final.exists():
            try:
                verify(final)
            except (ImageError, IntegrityError) as exc:
                log.warning("replacing damaged image %s: %s", record.image_id, exc)
                trash = Path(tempfile.mkdtemp(prefix=_PARTIAL, dir=self.root))
                final.rename(trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
        if not final.exists():
            for name in IMAGE_FILES:
                with (tmp / name).open("rb") as fh:
                    os.fsync(fh.fileno())
            tmp.chmod(0o755)  # mkdtemp made it private; images are readable like any disk
            tmp.rename(final)
            _fsync_dir(self.root)
        if not (self.root / _DEFAULT).exists():
            self.set_default(record.image_id)
        return self.get(record.image_id)

    def add(
        self,
        disk: Path,
        kernel: Path,
        initrd: Path,
        *,
        cmdline: str,
        packages: Sequence[str],
        created: float,
        move: bool = False,
    ) -> ImageRecord:
        """Store freshly built files under their hash; ``move`` consumes the inputs."""
        with self._partial() as tmp:
            for src, name in ((disk, DISK), (kernel, KERNEL), (initrd, INITRD)):
                if move:
                    shutil.move(src, tmp / name)
                else:
                    shutil.copyfile(src, tmp / name)
            disk_hash, disk_size = _hash_file(tmp / DISK)
            kernel_hash, kernel_size = _hash_file(tmp / KERNEL)
            initrd_hash, initrd_size = _hash_file(tmp / INITRD)
            with (tmp / DISK).open("rb") as fh:
                virtual_size = qcow2_virtual_size(fh.read(4096))
            record = ImageRecord(
                manifest=ImageManifest(
                    image_id=disk_hash,
                    disk=DISK,
                    kernel=KERNEL,
                    initrd=INITRD,
                    cmdline=cmdline,
                    size=disk_size,
                    packages=tuple(packages),
                    created=created,
                ),
                path=tmp,
                kernel_sha256=kernel_hash,
                kernel_size=kernel_size,
                initrd_sha256=initrd_hash,
                initrd_size=initrd_size,
                virtual_size=virtual_size,
            )
            (tmp / MANIFEST).write_bytes(encode_manifest(record))
            return self._commit(tmp)

    def add_fetched(self, manifest: bytes, files: dict[str, Path]) -> ImageRecord:
        """Store an image fetched from peers: its manifest and its three verified files
        (moved in); the whole is verified again before it gets its id."""
        with self._partial() as tmp:
            if len(manifest) > MAX_MANIFEST_BYTES:
                raise ImageError("manifest is too large")
            (tmp / MANIFEST).write_bytes(manifest)
            for name in (DISK, KERNEL, INITRD):
                shutil.move(files[name], tmp / name)
            return self._commit(tmp)

    def import_image(self, src: Path, *, link: bool = False) -> ImageRecord:
        """Add an image from a directory or a tar (plain, gzip or zstd) made by ``export_image``.

        Only the four image files are taken, as regular files; anything else
        in the tar is an error.  The result is verified before it is stored.
        """
        with self._partial() as tmp:
            if src.is_dir():
                for name in IMAGE_FILES:
                    if (src / name).is_symlink() or not (src / name).is_file():
                        raise ImageError(f"{src} lacks a regular file {name}")
                    _link_or_copy(src / name, tmp / name, link)
            else:
                with src.open("rb") as raw:
                    _extract(raw, tmp)
            return self._commit(tmp)

    def export_image(self, image_id: str, dest: Path, *, compress: bool = False) -> Path:
        """Write the image as a tar of its four files (zstd-compressed if asked).

        The image is verified first, so a corrupt image is never passed on.
        ``dest`` is written through a temporary file and renamed.
        """
        record = self.verify(image_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                if compress:
                    cctx = zstandard.ZstdCompressor(level=3, threads=-1)
                    with cctx.stream_writer(out, closefd=False) as zout:
                        _write_tar(record.path, zout)
                else:
                    _write_tar(record.path, out)
                out.flush()
                os.fsync(out.fileno())
            tmp.replace(dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return dest


def _link_or_copy(src: Path, dest: Path, link: bool) -> None:
    """Hard-link ``src`` (image files are never written in place), else copy it."""
    if link:
        try:
            os.link(src, dest)
        except OSError:
            pass
        else:
            return
    shutil.copyfile(src, dest)


def _write_tar(image_dir: Path, out: IO[bytes]) -> None:
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in IMAGE_FILES:
            info = tarfile.TarInfo(name)
            info.size = (image_dir / name).stat().st_size
            info.mode = 0o644
            with (image_dir / name).open("rb") as fh:
                tar.addfile(info, fh)


def _extract(raw: IO[bytes], dest: Path) -> None:
    """Stream the image files out of a tar into ``dest``; refuse anything else."""
    head = raw.read(4)
    stream: IO[bytes] = io.BufferedReader(_Prefixed(head, raw), _CHUNK)
    if head == _ZSTD_MAGIC:
        stream = zstandard.ZstdDecompressor().stream_reader(stream)
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name not in IMAGE_FILES or name in seen:
                    raise ImageError(f"unexpected member {member.name!r} in image archive")
                if not member.isreg():
                    raise ImageError(f"image archive member {name} is not a regular file")
                if name == MANIFEST and member.size > MAX_MANIFEST_BYTES:
                    raise ImageError("manifest is too large")
                seen.add(name)
                src = tar.extractfile(member)
                if src is None:
                    raise ImageError(f"cannot read {name} from the image archive")
                with (dest / name).open("wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
        raise ImageError(f"image archive is unreadable: {exc}") from exc
    missing = set(IMAGE_FILES) - seen
    if missing:
        raise ImageError(f"image archive lacks {', '.join(sorted(missing))}")


class _Prefixed(io.RawIOBase):
    """A read-only stream: ``head`` (already read to sniff the format) then ``rest``."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(view))
        view[: len(data)] = data
        return len(data)
