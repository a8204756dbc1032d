"""Blobs between hosts (templates' deltas, base images), and fetching by hand.

A blob is named by its sha256.  ``blob.info`` says how it is cut into pieces
(each with its own sha256; pieces that are all zeros are listed, and cost
nothing on the wire); ``blob.pieces`` streams the asked pieces in chunks of at
most ``CHUNK`` bytes, each compressed with zstd when that pays.  The control
methods fetch a template or the mesh's base image by hand, with progress.
``warm.manifest`` describes a host's warm state of a template or base image
(the saved boot its VMs resume): the shape it needs, what it cost to make
there, and its two files by content, which are then fetched as blobs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vmmesh.api.codec import (
    Bool,
    Bytes,
    Empty,
    Float,
    Int,
    ListOf,
    MapOf,
    Message,
    Method,
    Nested,
    Record,
    SetOf,
    StreamMethod,
    Text,
    wire,
)
from vmmesh.api.common import Progress
from vmmesh.api.names import HexId, HostName, Sha256

PIECE_SIZE = 4 << 20
"""Bytes per piece (Kraken and Dragonfly use about as much)."""
CHUNK = 1 << 20
"""Bytes of a piece per streamed item: four fit in one 4 MiB frame's worth."""
MAX_PIECES = 1 << 20  # 4 TiB of blob
MAX_ASK = 16
MAX_WARM_BYTES = 64 << 30  # a saved guest: its RAM and its overlay


@dataclass(frozen=True)
class BlobRequest(Message):
    sha256: str = wire(Sha256)


@dataclass(frozen=True)
class BlobInfo(Message):
    """How a blob is cut: its size, piece size, every piece's hash, which pieces are zeros."""

    sha256: str = wire(Sha256)
    size: int = wire(Int(0, MAX_PIECES * PIECE_SIZE))
    piece_size: int = wire(Int(64 << 10, 64 << 20))
    pieces: tuple[str, ...] = wire(ListOf(Sha256, MAX_PIECES))
    zero: frozenset[int] = wire(SetOf(Int(0, MAX_PIECES), MAX_PIECES), default=frozenset())

    def __post_init__(self) -> None:
        count = -(-self.size // self.piece_size)
        if len(self.pieces) != count:
            raise ValueError(f"{len(self.pieces)} piece hashes for {count} pieces")
        if any(i >= count for i in self.zero):
            raise ValueError("a zero piece outside the blob")

    def piece_length(self, index: int) -> int:
        return min(self.piece_size, self.size - index * self.piece_size)


@dataclass(frozen=True)
class PiecesRequest(Message):
    sha256: str = wire(Sha256)
    indices: tuple[int, ...] = wire(ListOf(Int(0, MAX_PIECES), MAX_ASK))


@dataclass(frozen=True)
class PieceChunk(Message):
    """``data`` of piece ``index`` from ``offset`` on (zstd-compressed if ``zstd``);
    ``packed``: as the holder keeps it at rest (its pack), so a receiver may keep it
    as its own pack instead of compressing the blob again."""

    index: int = wire(Int(0, MAX_PIECES))
    offset: int = wire(Int(0, 64 << 20))
    data: bytes = wire(Bytes(CHUNK + (64 << 10)))
    zstd: bool = wire(Bool(), default=False)
    packed: bool = wire(Bool(), default=False)


@dataclass(frozen=True)
class ManifestReply(Message):
    """A base image's manifest, as stored (its hashes pin the three files)."""

    manifest: bytes = wire(Bytes(4 << 20))


@dataclass(frozen=True)
class WarmRequest(Message):
    key: str = wire(HexId)  # a template id, or a base image id (VMs with no packages)


@dataclass(frozen=True)
class WarmManifest(Message):
    """A host's warm state of ``key``: the shape a guest must have to resume it (see
    ``hypervisor.savedstate.Shape``), the seconds its warm boot took there, and its
    two files by content: the saved RAM and devices, and the overlay the saved guest
    sees (over the template's last delta)."""

    key: str = wire(HexId)
    shape: Mapping[str, str] = wire(MapOf(Text(32), Text(400), 32))
    state_sha256: str = wire(Sha256)
    state_size: int = wire(Int(1, MAX_WARM_BYTES))
    disk_sha256: str = wire(Sha256)
    disk_size: int = wire(Int(1, MAX_WARM_BYTES))
    made_seconds: float = wire(Float(0.0), default=0.0)


@dataclass(frozen=True)
class FetchTemplateRequest(Message):
    template: str = wire(Text(64, "[0-9a-f]{4,64}", "template id"))
    sources: frozenset[str] = wire(SetOf(HostName, 64), default=frozenset())  # empty: every holder


@dataclass(frozen=True)
class FetchImageRequest(Message):
    image_id: str = wire(Text(64, "[0-9a-f]{0,64}", "image id"), default="")


@dataclass(frozen=True)
class HolderFigures(Record):
    host: str = wire(Text(63))
    bytes: int = wire(Int(), default=0)
    pieces: int = wire(Int(), default=0)
    dropped: str = wire(Text(300), default="")


@dataclass(frozen=True)
class FetchReport(Message):
    """What a fetch moved: blob bytes, bytes on the wire, seconds, from whom."""

    what: str = wire(Text(200))
    item_id: str = wire(HexId)
    bytes: int = wire(Int(), default=0)
    wire_bytes: int = wire(Int(), default=0)
    seconds: float = wire(Float(0.0), default=0.0)
    already_here: bool = wire(Bool(), default=False)
    holders: tuple[HolderFigures, ...] = wire(ListOf(Nested(HolderFigures), 256), default=())


INFO = Method("blob.info", BlobRequest, BlobInfo)
PIECES = StreamMethod("blob.pieces", PiecesRequest, Empty, item=PieceChunk)
IMAGE_MANIFEST = Method("image.manifest", BlobRequest, ManifestReply)
WARM_MANIFEST = Method("warm.manifest", WarmRequest, WarmManifest)
FETCH_TEMPLATE = StreamMethod("template.fetch", FetchTemplateRequest, FetchReport, item=Progress)
FETCH_IMAGE = StreamMethod("image.fetch", FetchImageRequest, FetchReport, item=Progress)
