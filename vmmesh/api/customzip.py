"""A custom zip (``--custom FILE.zip``, thesis §4.2): what makes one safe to unpack.

Checked where it enters, as every input is: ``CustomZip`` is the wire spec of
the ``custom_zip`` fields, so ``from_wire`` refuses a bad zip from a peer (the
peer misbehaved) and the CLI's ``.checked()`` refuses the user's with the same
words before anything is placed.  A name like ``../../etc/passwd`` or an
absolute path must never be written outside ``/opt``, a symbolic link could
point anywhere, and a zip bomb must not fill the VM's disk allowance.

``check_zip`` makes a ``CheckedZip``: the zip's bytes with the entries the
check listed, so the entries travel with the value from where it was checked
(the CLI's ``.checked()``, a node's ``from_wire``) to the host that unpacks it
(``host.customzip``), which reads them and checks nothing again.  A
``CheckedZip`` is made only by ``check_zip`` (a peer's body decodes to plain
bytes), so one already checked is not checked twice.
"""

from __future__ import annotations

import io
import stat
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

from vmmesh.api.codec import Bytes
from vmmesh.errors import InternalError, MalformedMessage, UsageError

MAX_ZIP_ENTRIES = 10_000
MAX_ZIP_BYTES = 1 << 30


@dataclass(frozen=True)
class ZipEntry:
    """A checked member of a custom zip."""

    path: str  # relative, POSIX, no '..'
    is_dir: bool
    mode: int


class CheckedZip(bytes):
    """A custom zip that ``check_zip`` passed: its bytes, and the entries it listed."""

    entries: tuple[ZipEntry, ...]

    def __new__(cls, data: bytes, entries: tuple[ZipEntry, ...]) -> CheckedZip:
        made = super().__new__(cls, data)
        made.entries = entries
        return made


def check_zip(data: bytes) -> CheckedZip:
    """Validate a custom zip: names, symlinks, size; raise UsageError if bad.

    A ``CheckedZip`` passed already and is returned as it is.
    """
    if isinstance(data, CheckedZip):
        return data
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
    return CheckedZip(data, tuple(out))


def checked_zip(data: bytes) -> CheckedZip:
    """The zip a body carries past its edge, as ``from_wire`` or ``.checked()`` made it.

    ``InternalError`` if it is plain bytes: a body that skipped its edge is a bug.
    """
    if not isinstance(data, CheckedZip):
        raise InternalError("a custom zip went past its edge unchecked")
    return data


class CustomZip(Bytes):
    """A custom zip on the wire: at most ``max_len`` bytes, and safe to unpack."""

    def load(self, value: object, where: str) -> bytes:
        data = super().load(value, where)
        try:
            return check_zip(data)
        except UsageError as exc:
            raise MalformedMessage(f"{where}: {exc}") from None
