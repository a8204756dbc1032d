"""A custom zip (``--custom FILE.zip``, thesis §4.2): what makes one safe to unpack.

Checked where it enters, as every input is: ``CustomZip`` is the wire spec of
the ``custom_zip`` fields, so ``from_wire`` refuses a bad zip from a peer (the
peer misbehaved) and the CLI's ``.checked()`` refuses the user's with the same
words before anything is placed.  A name like ``../../etc/passwd`` or an
absolute path must never be written outside ``/opt``, a symbolic link could
point anywhere, and a zip bomb must not fill the VM's disk allowance.  The host
unpacks it (``host.customzip``) by the entries ``check_zip`` lists.
"""

from __future__ import annotations

import io
import stat
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

from vmmesh.api.codec import Bytes
from vmmesh.errors import MalformedMessage, UsageError

MAX_ZIP_ENTRIES = 10_000
MAX_ZIP_BYTES = 1 << 30


@dataclass(frozen=True)
class ZipEntry:
    """A checked member of a custom zip."""

    path: str  # relative, POSIX, no '..'
    is_dir: bool
    mode: int


def check_zip(data: bytes) -> list[ZipEntry]:
    """Validate a custom zip: names, symlinks, size; raise UsageError if bad."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise UsageError(f"custom zip is not a zip file: {exc}") from None
    infos = zf.infolist()
    if len(infos) > MAX_ZIP_ENTRIES:
        raise UsageError(f"custom zip has over {MAX_ZIP_ENTRIES} entries")
    if sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
        raise UsageError(f"custom zip unpacks to over {MAX_ZIP_BYTES >> 20} MB")
    out: list[ZipEntry] = []
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name).parts
        bad = (
            not name
            or "\\" in name
            or "\x00" in name
            or name.startswith("/")
            or ":" in parts[0]
            or any(p in ("..", ".") for p in parts)
        )
        mode = (info.external_attr >> 16) & 0o177777
        if bad:
            raise UsageError(f"custom zip: unsafe member name {name!r:.80}")
        if stat.S_ISLNK(mode):
            raise UsageError(f"custom zip: symbolic link not allowed: {name!r:.80}")
        out.append(ZipEntry("/".join(parts), info.is_dir(), mode & 0o777))
    return out


class CustomZip(Bytes):
    """A custom zip on the wire: at most ``max_len`` bytes, and safe to unpack."""

    def load(self, value: object, where: str) -> bytes:
        data = super().load(value, where)
        try:
            check_zip(data)
        except UsageError as exc:
            raise MalformedMessage(f"{where}: {exc}") from None
        return data
