"""The local control socket: how the CLI talks to its node.

A Unix stream socket in the data directory, mode 0660, group ``vmmesh`` when
that group exists, so root and the vmmesh group only.  It speaks the same
framed msgpack RPC and typed methods as the peer links (``rpc.py``), with a
larger frame limit because exec output and job files travel over it.  A stale socket file left by a
killed node is replaced; a live one means another node runs on this data
directory, which is refused.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from vmmesh.errors import NodeNotRunning, StateError
from vmmesh.net.refusals import Refusals
from vmmesh.net.rpc import Handlers, RpcConnection, open_rpc

CONTROL_MAX_FRAME = 16 << 20
LOCAL_PEER = "local"


def _socket_alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


async def serve_control(
    path: Path,
    handlers: Handlers,
    *,
    refusals: Refusals | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    if path.exists() or path.is_symlink():
        if _socket_alive(path):
            raise StateError(f"another node is running on {path.parent} ({path} answers)")
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
    with contextlib.suppress(KeyError, PermissionError):
        os.chown(path, -1, grp.getgrnam("vmmesh").gr_gid)
    sock.listen(64)
    listener = trio.SocketListener(sock)

    async def serve_one(stream: trio.SocketStream) -> None:
        conn = RpcConnection(
            stream, LOCAL_PEER, handlers, max_frame=CONTROL_MAX_FRAME, refusals=refusals
        )
        await conn.run()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, serve_one, [listener])
            task_status.started()
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.asynccontextmanager
async def connect_control(path: Path) -> AsyncIterator[RpcConnection]:
    """Open the node's control socket; NodeNotRunning with a hint when it is not there."""
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            raise NodeNotRunning(
                f"no node is running on {path.parent} (start it with `vmmesh node`)"
            ) from None
        if exc.errno == errno.EACCES:
            raise NodeNotRunning(
                f"permission denied on {path}: run as root or a member of group vmmesh"
            ) from None
        raise NodeNotRunning(f"cannot reach the node at {path}: {exc.strerror}") from None
    async with open_rpc(stream, "node", max_frame=CONTROL_MAX_FRAME) as conn:
        yield conn
