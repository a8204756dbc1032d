"""Packs: a blob's chunks compressed once, hard, and kept, so a holder serves them as they are.

Compressing on the fly costs the holder CPU at every send, so it must be
fast (zstd level 3).  A pack is made once per blob and host, at low CPU
priority in a process of its own, at a high level (19 by default,
``pack_level``), the way a registry keeps image layers compressed at rest.
Measured on a ``python3`` template delta (54 MB allocated): 12.3 MB on the
wire at level 3, 10.4 MB at level 19, made in about 25 s of one core.
A holder serves pieces from its pack when it has one (chunks marked
``packed``) and compresses on the fly otherwise; the receiver checks both
the same way (every piece is verified by its hash on arrival).  A receiver
whose every piece came from holders' packs keeps those chunks as its own
pack (``PackWriter``), so a template is compressed hard once per mesh, not
once per host.

File ``<dir>/<sha>.zpk``: the payloads, chunk after chunk in blob order,
then a msgpack index (the blob's sha, size, piece size, chunk size, and per
chunk its offset, length and whether it is zstd), then the index's length
and a magic.  Written under a temporary name and renamed.  A pack whose
index does not fit the blob's piece table is not used.  Nothing here is
trusted by a peer: a wrong pack only makes pieces fail their hash at the
receiver, which then drops this holder.

    python -m vmmesh.transfer.packs BLOB SHA256 DEST LEVEL   # what the node runs, niced
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgpack
import zstandard

from vmmesh.api.transfer import CHUNK, BlobInfo, PieceChunk
from vmmesh.errors import IntegrityError
from vmmesh.transfer import blobfile

MAGIC = b"VMMZPK01"
_TRAILER = struct.Struct(">Q8s")
SUFFIX = ".zpk"


def pack_path(directory: Path, sha: str) -> Path:
    return directory / f"{sha}{SUFFIX}"


def _chunk_count(info: BlobInfo) -> int:
    return sum(-(-info.piece_length(i) // CHUNK) for i in range(len(info.pieces)))


def make(blob: Path, sha: str, dest: Path, level: int) -> int:
    """Write the pack of ``blob`` (which must hash to ``sha``) to ``dest``; its size."""
    info = blobfile.describe(blob, sha)
    compressor = zstandard.ZstdCompressor(level=level)
    index: list[tuple[int, int, bool]] = []
    tmp = dest.with_name(dest.name + ".tmp")
    offset = 0
    try:
        with blob.open("rb") as src, tmp.open("wb") as out:
            while True:
                raw = src.read(CHUNK)
                if not raw:
                    break
                data, zstd = blobfile.compress_chunk(compressor, raw)
                out.write(data)
                index.append((offset, len(data), zstd))
                offset += len(data)
            _write_tail(out, sha, info, index)
        if len(index) != _chunk_count(info):
            raise IntegrityError(f"{blob.name} changed while it was packed")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest.stat().st_size


@dataclass(frozen=True)
class Pack:
    """An open pack that fits ``info``: ``chunks(index)`` gives a piece as stored."""

    path: Path
    info: BlobInfo
    index: tuple[tuple[int, int, bool], ...]

    @classmethod
    def open(cls, path: Path, info: BlobInfo) -> Pack | None:
        """The pack at ``path`` if it is whole and made for exactly this blob."""
        try:
            with path.open("rb") as fh:
                end = fh.seek(0, os.SEEK_END)
                if end < _TRAILER.size:
                    return None
                fh.seek(end - _TRAILER.size)
                length, magic = _TRAILER.unpack(fh.read(_TRAILER.size))
                if magic != MAGIC or length > end - _TRAILER.size:
                    return None
                fh.seek(end - _TRAILER.size - length)
                head = msgpack.unpackb(fh.read(length))
            chunks = tuple((int(o), int(n), bool(z)) for o, n, z in head["chunks"])
            fits = (
                head["sha"] == info.sha256
                and head["size"] == info.size
                and head["piece"] == info.piece_size
                and head["chunk"] == CHUNK
                and len(chunks) == _chunk_count(info)
                and all(o >= 0 and 0 <= n <= CHUNK and o + n <= end for o, n, _ in chunks)
            )
        except (OSError, ValueError, TypeError, KeyError, msgpack.UnpackException):
            return None
        return cls(path, info, chunks) if fits else None

    def chunks(self, piece: int) -> list[PieceChunk]:
        per_piece = self.info.piece_size // CHUNK
        length = self.info.piece_length(piece)
        first = piece * per_piece
        out = []
        with self.path.open("rb") as fh:
            for n, offset in enumerate(range(0, length, CHUNK)):
                at, size, zstd = self.index[first + n]
                fh.seek(at)
                data = fh.read(size)
                if len(data) != size:
                    raise IntegrityError(f"pack {self.path.name} is shorter than its index")
                chunk = PieceChunk(index=piece, offset=offset, data=data, zstd=zstd, packed=True)
                out.append(chunk)
        return out


def _write_tail(
    out: BinaryIO, sha: str, info: BlobInfo, index: list[tuple[int, int, bool]]
) -> None:
    head = msgpack.packb(
        {"sha": sha, "size": info.size, "piece": info.piece_size, "chunk": CHUNK, "chunks": index}
    )
    out.write(head)
    out.write(_TRAILER.pack(len(head), MAGIC))
    out.flush()
    os.fsync(out.fileno())


class PackWriter:
    """A pack put together from the chunks a fetch receives, so the receiver does not
    compress the blob again (for a JDK template, minutes of a core on every host).

    Only chunks the holder sent from its own pack are kept (``packed``): chunks
    compressed on the fly at a low level would make a poorer pack than the
    packer's, and then the packer makes it.  Chunks are appended as pieces
    arrive, in any order; ``finish`` adds the zero pieces (which never travel),
    writes the index in blob order and renames the pack into place.  Pieces are
    checked by their hash before they are added, so a pack written here holds
    exactly what the blob does.  Thread-safe: pieces arrive in worker threads.
    """

    def __init__(self, dest: Path, info: BlobInfo) -> None:
        self.dest = dest
        self.info = info
        self.tmp = dest.with_name(dest.name + ".tmp")
        self._out: BinaryIO | None = self.tmp.open("wb")
        self._at = 0
        self._index: dict[int, tuple[int, int, bool]] = {}
        self._lock = threading.Lock()
        self._per_piece = info.piece_size // CHUNK

    @property
    def usable(self) -> bool:
        return self._out is not None

    def add(self, piece: int, chunks: list[PieceChunk]) -> None:
        """A verified piece's chunks as they came; the pack is given up if any chunk was
        not sent from the holder's pack."""
        with self._lock:
            if self._out is None:
                return
            if not all(c.packed and len(c.data) <= CHUNK for c in chunks):
                self._give_up()
                return
            try:
                for c in chunks:
                    self._out.write(c.data)
                    self._index[piece * self._per_piece + c.offset // CHUNK] = (
                        self._at,
                        len(c.data),
                        c.zstd,
                    )
                    self._at += len(c.data)
            except OSError:  # no room: the packer makes it later; the blob goes on
                self._give_up()

    def finish(self) -> Path | None:
        """The whole pack renamed to ``dest``; None if it was given up or is not whole."""
        with self._lock:
            try:
                return self._finish()
            except OSError:
                self._give_up()
                return None

    def _finish(self) -> Path | None:
        """Zero pieces, the index in blob order, the rename (under the lock)."""
        out = self._out
        if out is None:
            return None
        zeros: dict[int, tuple[bytes, bool]] = {}
        compressor = zstandard.ZstdCompressor(level=19)
        for piece in sorted(self.info.zero):
            length = self.info.piece_length(piece)
            for offset in range(0, length, CHUNK):
                n = min(CHUNK, length - offset)
                if n not in zeros:
                    zeros[n] = blobfile.compress_chunk(compressor, bytes(n))
                data, zstd = zeros[n]
                out.write(data)
                self._index[piece * self._per_piece + offset // CHUNK] = (
                    self._at,
                    len(data),
                    zstd,
                )
                self._at += len(data)
        count = _chunk_count(self.info)
        if sorted(self._index) != list(range(count)):
            self._give_up()
            return None
        _write_tail(out, self.info.sha256, self.info, [self._index[n] for n in range(count)])
        out.close()
        self._out = None
        os.replace(self.tmp, self.dest)
        return self.dest

    def close(self) -> None:
        """Give up what is not finished (always safe to call)."""
        with self._lock:
            self._give_up()

    def _give_up(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        self.tmp.unlink(missing_ok=True)


def sweep(directory: Path, keep: set[str]) -> dict[str, int]:
    """Remove unfinished packs and packs of blobs not in ``keep``; name -> bytes freed."""
    gone: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in directory.iterdir():
            sha = entry.name.removesuffix(SUFFIX)
            if entry.name.endswith(".tmp") or sha not in keep:
                with contextlib.suppress(FileNotFoundError):
                    gone[entry.name] = entry.stat().st_blocks * 512
                    entry.unlink()
    return gone


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: python -m vmmesh.transfer.packs BLOB SHA256 DEST LEVEL", file=sys.stderr)
        return 2
    blob, sha, dest, level = argv
    try:
        make(Path(blob), sha, Path(dest), int(level))
    except (OSError, ValueError, IntegrityError) as exc:
        print(f"pack of {Path(blob).name} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
