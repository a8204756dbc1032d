"""A custom zip (``--custom FILE.zip``, thesis §4.2): checked here, unpacked into ``/opt``.

Why checked on the host: the guest may have no python3, and even when it
has, a name like ``../../etc/passwd`` or an absolute path must never be
written outside ``/opt``; a zip bomb must not fill the VM's disk allowance.
"""

from __future__ import annotations

import contextlib
import io
import stat
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

from vmmesh.errors import HypervisorError, UsageError
from vmmesh.hypervisor.base import Guest

MAX_ZIP_ENTRIES = 10_000
MAX_ZIP_BYTES = 1 << 30
GUEST_ZIP = "/tmp/vmmesh-custom.zip"
# Extract in the guest with its own python3; modes are kept, which extractall does not.
_PY_UNZIP = (
    "import sys, zipfile, os\n"
    "z = zipfile.ZipFile(sys.argv[1])\n"
    "for i in z.infolist():\n"
    "    p = z.extract(i, '/opt')\n"
    "    m = (i.external_attr >> 16) & 0o777\n"
    "    if m and not i.is_dir():\n"
    "        os.chmod(p, m)\n"
    "os.unlink(sys.argv[1])\n"
)


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


async def unpack(guest: Guest, data: bytes, entries: list[ZipEntry]) -> None:
    """Extract to /opt: with the guest's python3 if it has one, else file by file."""
    probe = None
    with contextlib.suppress(HypervisorError):
        probe = await guest.exec(["python3", "-c", "pass"])
    if probe is not None and probe.exit_code == 0:
        await guest.write_file(GUEST_ZIP, data)
        res = await guest.exec(["python3", "-c", _PY_UNZIP, GUEST_ZIP])
        if res.exit_code != 0:
            raise HypervisorError(f"unpacking the custom zip failed: {res.stderr[-300:]!r}")
        return
    dirs = sorted(
        {f"/opt/{e.path}" for e in entries if e.is_dir}
        | {f"/opt/{PurePosixPath(e.path).parent}" for e in entries if not e.is_dir}
    )
    if dirs:
        await guest.exec(["mkdir", "-p", *dirs])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for e in entries:
            if e.is_dir:
                continue
            await guest.write_file(f"/opt/{e.path}", zf.read(e.path))
            if e.mode:
                await guest.exec(["chmod", f"{e.mode:o}", f"/opt/{e.path}"])
