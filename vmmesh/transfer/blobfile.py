"""Blobs on disk: cutting a file into pieces to send, and putting received pieces together.

Holder side: ``describe`` reads a file once, hashes every piece and the
whole, and notes the pieces that are all zeros (a qcow2 delta has holes
where the guest freed blocks; they cost nothing on the wire).  A holder only
serves a file whose whole hash is the name asked for.  ``read_chunks`` cuts
one piece into ``CHUNK``-sized parts and compresses each with zstd when that
saves at least a tenth.

Receiver side: ``Staging`` keeps one blob under way in ``<dir>/<sha>.part``
(a sparse file of the blob's size) with ``<sha>.have`` (the verified pieces,
one index per line, appended after each fsync, every ``SYNC_EVERY`` pieces)
and ``<sha>.info`` (the piece table it is working to).  Only a piece whose hash matches the table is
written.  A transfer that stops — a cut link, a killed node — is taken up
again from the pieces in ``.have``.  The whole file's hash is computed in
order as pieces arrive; ``finish`` hands the file over only if that hash is
the blob's name; otherwise everything goes.
Nothing here ever becomes a template or an image: the caller moves a
finished file into place and records it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zstandard

from vmmesh.api.names import Sha256
from vmmesh.api.transfer import CHUNK, PIECE_SIZE, BlobInfo, PieceChunk
from vmmesh.errors import IntegrityError, MalformedMessage

ZSTD_LEVEL = 3
SYNC_EVERY = 8  # pieces written between two fsyncs of a staging file
_READ = 1 << 20


def _zero_hash(length: int, cache: dict[int, str] = {}) -> str:  # noqa: B006 - a memo
    if length not in cache:
        cache[length] = hashlib.sha256(bytes(length)).hexdigest()
    return cache[length]


def describe(path: Path, sha: str | None, piece_size: int = PIECE_SIZE) -> BlobInfo:
    """The piece table of ``path``, checked to be the blob ``sha`` (IntegrityError if not;
    None: whatever it hashes to, for a file this host names by content itself)."""
    whole = hashlib.sha256()
    pieces: list[str] = []
    zero: set[int] = set()
    size = 0
    with path.open("rb") as fh:
        while True:
            piece = fh.read(piece_size)
            if not piece:
                break
            whole.update(piece)
            if piece.count(0) == len(piece):
                zero.add(len(pieces))
            pieces.append(hashlib.sha256(piece).hexdigest())
            size += len(piece)
    digest = whole.hexdigest()
    if sha is not None and digest != sha:
        raise IntegrityError(f"{path.name} does not hash to {sha[:16]}")
    return BlobInfo(
        sha256=digest, size=size, piece_size=piece_size, pieces=tuple(pieces), zero=frozenset(zero)
    )


def check_info(info: BlobInfo, sha: str) -> None:
    """A peer's piece table must be for the blob asked, and its zero pieces really zeros."""
    if info.sha256 != sha:
        raise MalformedMessage(f"piece table for {info.sha256[:16]}, asked {sha[:16]}")
    Sha256.load(info.sha256, "blob")
    for index in info.zero:
        if info.pieces[index] != _zero_hash(info.piece_length(index)):
            raise MalformedMessage(f"piece {index} is called zeros but its hash is not")


def read_chunks(path: Path, info: BlobInfo, index: int) -> list[PieceChunk]:
    """Piece ``index`` of ``path`` as chunks, each zstd-compressed where that pays."""
    length = info.piece_length(index)
    with path.open("rb") as fh:
        fh.seek(index * info.piece_size)
        data = fh.read(length)
    if len(data) != length:
        raise IntegrityError(f"{path.name} is shorter than its piece table")
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    out = []
    for offset in range(0, length, CHUNK):
        packed, zstd = compress_chunk(compressor, data[offset : offset + CHUNK])
        out.append(PieceChunk(index=index, offset=offset, data=packed, zstd=zstd))
    return out


def compress_chunk(compressor: zstandard.ZstdCompressor, raw: bytes) -> tuple[bytes, bool]:
    """``raw`` compressed if that saves at least a tenth, else as it is; and which."""
    packed = compressor.compress(raw)
    return (packed, True) if len(packed) < len(raw) * 0.9 else (raw, False)


class PieceAssembly:
    """The chunks of one piece as they arrive.

    ``add`` only files a chunk (cheap, in the event loop); ``piece()``
    decompresses and checks the hash (CPU: the fetcher calls it in a worker
    thread, so the link keeps being read meanwhile).
    """

    def __init__(self, info: BlobInfo, index: int) -> None:
        self.index = index
        self.length = info.piece_length(index)
        self.expected = info.pieces[index]
        self._chunks: dict[int, PieceChunk] = {}
        self._count = -(-self.length // CHUNK)
        self.wire = 0

    def add(self, chunk: PieceChunk) -> bool:
        """File one chunk; True when every chunk of the piece is in (not yet checked)."""
        if chunk.index != self.index or chunk.offset % CHUNK or chunk.offset >= self.length:
            raise MalformedMessage(f"chunk at {chunk.offset} does not belong to piece {self.index}")
        if chunk.offset in self._chunks:
            raise MalformedMessage(f"chunk at {chunk.offset} of piece {self.index} came twice")
        self._chunks[chunk.offset] = chunk
        self.wire += len(chunk.data)
        return len(self._chunks) == self._count

    def chunks(self) -> list[PieceChunk]:
        """The chunks as they came, in order (what a receiver may keep as its pack)."""
        return [self._chunks[o] for o in sorted(self._chunks)]

    def piece(self) -> bytes:
        """The whole piece, decompressed and checked against its hash."""
        buf = bytearray(self.length)
        decompressor = zstandard.ZstdDecompressor()
        for offset, chunk in self._chunks.items():
            want = min(CHUNK, self.length - offset)
            data = chunk.data
            if chunk.zstd:
                try:
                    data = decompressor.decompress(data, max_output_size=want)
                except zstandard.ZstdError as exc:
                    raise MalformedMessage(
                        f"chunk of piece {self.index} is bad zstd: {exc}"
                    ) from None
            if len(data) != want:
                raise MalformedMessage(
                    f"chunk of piece {self.index} holds {len(data)} bytes, not {want}"
                )
            buf[offset : offset + want] = data
        if len(self._chunks) != self._count:
            raise MalformedMessage(f"piece {self.index} is not complete")
        if hashlib.sha256(buf).hexdigest() != self.expected:
            raise IntegrityError(f"piece {self.index} does not match its hash")
        return bytes(buf)


@dataclass
class Staging:
    """One blob being received under ``directory`` (see the module docstring).

    Pieces are written as they come and made durable ``SYNC_EVERY`` at a time
    (one fsync, then their numbers go into ``.have``): a node killed midway
    loses at most those not yet synced; ``sync`` at the end of every attempt
    keeps the rest for the next.
    """

    directory: Path
    info: BlobInfo
    _unsynced: list[int] = field(default_factory=list, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    # The whole file's hash, fed in order while pieces arrive (those behind a gap
    # are read back from the page cache when it fills), so ``finish`` has little
    # left to read: receiving a blob hashes it once, not twice.
    _whole: Any = field(default_factory=hashlib.sha256, init=False)
    _hashed: int = field(default=0, init=False)  # pieces 0.._hashed-1 are in _whole
    _present: set[int] = field(default_factory=set, init=False)
    _hash_lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    @property
    def part(self) -> Path:
        return self.directory / f"{self.info.sha256}.part"

    @property
    def _have_file(self) -> Path:
        return self.directory / f"{self.info.sha256}.have"

    @property
    def _info_file(self) -> Path:
        return self.directory / f"{self.info.sha256}.info"

    def open(self) -> set[int]:
        """Start, or take up where a stopped transfer left off; the pieces already here."""
        self.directory.mkdir(parents=True, exist_ok=True)
        packed = msgpack.packb(self.info.to_wire(), use_bin_type=True)
        have: set[int] = set()
        with contextlib.suppress(OSError):
            if self._info_file.read_bytes() == packed and self.part.is_file():
                for line in self._have_file.read_text().split():
                    if line.isdigit() and int(line) < len(self.info.pieces):
                        have.add(int(line))
        if not have:
            self.discard()
            tmp = self._info_file.with_suffix(".info.tmp")
            tmp.write_bytes(packed)
            os.replace(tmp, self._info_file)
            with self.part.open("wb") as fh:
                fh.truncate(self.info.size)
            self._have_file.write_text("")
        with self._hash_lock:
            self._whole, self._hashed = hashlib.sha256(), 0
            self._present = have | set(self.info.zero)
        return have | set(self.info.zero)

    def write(self, index: int, piece: bytes) -> None:
        """A verified piece into the file; into the record of what is here once synced."""
        fd = os.open(self.part, os.O_WRONLY)
        try:
            os.pwrite(fd, piece, index * self.info.piece_size)
        finally:
            os.close(fd)
        with self._lock:
            self._unsynced.append(index)
            due = len(self._unsynced) >= SYNC_EVERY
        self._hash_along(index, piece)
        if due:
            self.sync()

    def _hash_along(self, index: int | None = None, piece: bytes = b"") -> None:
        """Feed the whole-file hash every piece from where it stands up to the next gap."""
        with self._hash_lock:
            if index is not None:
                self._present.add(index)
            count, size = len(self.info.pieces), self.info.piece_size
            with contextlib.ExitStack() as stack:
                fh = None
                while self._hashed < count and self._hashed in self._present:
                    n = self._hashed
                    length = min(size, self.info.size - n * size)
                    if n == index:
                        data = piece
                    elif n in self.info.zero:
                        data = bytes(length)
                    else:
                        if fh is None:
                            fh = stack.enter_context(self.part.open("rb"))
                        fh.seek(n * size)
                        data = fh.read(length)
                    self._whole.update(data)
                    self._hashed += 1

    def sync(self) -> None:
        """Make the pieces written so far durable, then record them in ``.have``."""
        with self._lock:
            if not self._unsynced or not self.part.exists():
                return
            fd = os.open(self.part, os.O_WRONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            with self._have_file.open("a") as fh:
                fh.write("".join(f"{i}\n" for i in self._unsynced))
            self._unsynced.clear()

    def finish(self) -> Path:
        """The whole file's hash; the verified file (still ``.part``) or IntegrityError."""
        self.sync()
        self._hash_along()
        with self._hash_lock:
            whole = self._whole if self._hashed == len(self.info.pieces) else None
        if whole is None:  # a piece never came: hash what the file holds (it will not match)
            whole = hashlib.sha256()
            with self.part.open("rb") as fh:
                while chunk := fh.read(_READ):
                    whole.update(chunk)
        if whole.hexdigest() != self.info.sha256:
            self.discard()
            raise IntegrityError(f"blob {self.info.sha256[:16]} does not match its hash")
        self._have_file.unlink(missing_ok=True)
        self._info_file.unlink(missing_ok=True)
        return self.part

    def discard(self) -> None:
        with self._lock:
            self._unsynced.clear()
        for path in (self.part, self._have_file, self._info_file):
            path.unlink(missing_ok=True)


def sweep(directory: Path, max_age: float, now: float) -> list[str]:
    """Remove what a resumed transfer could not use: files of a blob whose staging is
    not whole (a ``.part`` without its ``.info``, or the other way round), and
    everything older than ``max_age`` seconds."""
    removed: list[str] = []
    if not directory.is_dir():
        return removed
    entries = sorted(directory.iterdir())
    names = {e.name for e in entries}
    for entry in entries:
        sha, _, suffix = entry.name.partition(".")
        whole = {f"{sha}.part", f"{sha}.info"} <= names
        if not whole or now - entry.stat().st_mtime > max_age or suffix.endswith("tmp"):
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed
