"""The qcow2 header, read without QEMU: what a disk says of its size and backing file.

Disks from elsewhere (a base image from a tar or a peer, a template delta
fetched from a peer) are checked with this before QEMU opens them: a crafted
header could otherwise make QEMU open a host file as backing or as external
data.
"""

from __future__ import annotations

import struct

from vmmesh.errors import ImageError

__all__ = ["qcow2_backing", "qcow2_virtual_size"]


def qcow2_virtual_size(header: bytes) -> int:
    """Virtual size from a qcow2 header, refusing disks that reach outside themselves.

    A qcow2 may name a backing file or an external data file; either would
    make QEMU open a host path chosen by whoever made the image.
    """
    if len(header) < 72 or header[:4] != b"QFI\xfb":
        raise ImageError("disk is not a qcow2 image")
    version, backing_offset, backing_size = struct.unpack_from(">IQI", header, 4)
    if version not in (2, 3):
        raise ImageError(f"unsupported qcow2 version {version}")
    if backing_offset or backing_size:
        raise ImageError("base image disk names a backing file")
    if version == 3:
        if len(header) < 80:
            raise ImageError("truncated qcow2 header")
        (incompatible,) = struct.unpack_from(">Q", header, 72)
        if incompatible & 0b100:
            raise ImageError("base image disk uses an external data file")
    (size,) = struct.unpack_from(">Q", header, 24)
    return int(size)


def qcow2_backing(header: bytes) -> str | None:
    """The backing file name a qcow2 delta names (None: standalone); ImageError if the
    file is not a qcow2 or reaches for an external data file.

    A delta from a peer is checked with this before it is used: its backing
    name must be exactly the one our layout gives (its parent delta, or the
    base image), never a host path of the sender's choosing.
    """
    if len(header) < 72 or header[:4] != b"QFI\xfb":
        raise ImageError("not a qcow2 image")
    version, backing_offset, backing_size = struct.unpack_from(">IQI", header, 4)
    if version not in (2, 3):
        raise ImageError(f"unsupported qcow2 version {version}")
    if version == 3:
        if len(header) < 80:
            raise ImageError("truncated qcow2 header")
        (incompatible,) = struct.unpack_from(">Q", header, 72)
        if incompatible & 0b100:
            raise ImageError("qcow2 uses an external data file")
    if not backing_offset:
        return None
    if backing_size > 1023 or backing_offset + backing_size > len(header):
        raise ImageError("qcow2 backing file name is out of bounds")
    raw = header[backing_offset : backing_offset + backing_size]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ImageError("qcow2 backing file name is not UTF-8") from None
