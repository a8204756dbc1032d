"""This host's own addresses: what it advertises and lets peers dial."""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct

_SIOCGIFADDR = 0x8915


def local_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this host (of its network namespace), by interface."""
    out: list[str] = []
    with contextlib.suppress(OSError):
        for _idx, ifname in socket.if_nameindex():
            if ifname == "lo":
                continue
            addr = _ipv4_of(ifname)
            if addr and addr not in out:
                out.append(addr)
    return out


def _ipv4_of(ifname: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(
                s.fileno(), _SIOCGIFADDR, struct.pack("256s", ifname[:15].encode())
            )
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])
