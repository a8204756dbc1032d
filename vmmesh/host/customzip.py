"""A custom zip (``--custom FILE.zip``, thesis §4.2): unpacked into ``/opt``.

It was checked where it entered (``api.customzip``: ``from_wire`` for a peer's,
the CLI for the user's), and carries the entries that check listed: what the
host writes when the guest has no python3 to unzip it itself.
"""

from __future__ import annotations

import contextlib
import io
import zipfile
from pathlib import PurePosixPath

from vmmesh.api.customzip import CheckedZip
from vmmesh.errors import HypervisorError
from vmmesh.hypervisor.base import Guest

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


async def unpack(guest: Guest, data: CheckedZip) -> None:
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
    entries = data.entries
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
