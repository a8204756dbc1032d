"""OpenSSH public keys, known_hosts lines and ssh port choice: pure text and numbers.

``vmmesh ssh NAME`` works like ``vagrant ssh``, minus the shared insecure key
and the disabled host-key check:

1. the CLI sends the user's *public* key to its node, which finds the host of
   the VM and asks it (over the mesh's mutual TLS) for ssh access;
2. that host, through the guest agent (a trusted channel), makes the guest's
   own ed25519 host key if it has none yet, appends the user's key to
   ``/root/.ssh/authorized_keys`` and reads the host public key back;
3. the CLI runs ``ssh`` to the host's forwarded port with a known_hosts file
   holding exactly that host key, so the first connection is already
   verified.

Everything here is checked text: a key or a host key from the wire never
reaches a shell or a file without passing ``check_public_key``.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Callable, Iterable

from vmmesh.api.vm import MAX_KEY_CHARS, MAX_KEYS
from vmmesh.errors import UsageError

KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)

NO_SSHD_EXIT = 3
# Run by the guest's sh through the agent; public keys (already checked) on stdin.
PREPARE_SCRIPT = (
    "set -e\n"
    f"[ -x /usr/sbin/sshd ] || exit {NO_SSHD_EXIT}\n"
    "k=/etc/ssh/ssh_host_ed25519_key\n"
    "if ! [ -s $k ] || ! [ -s $k.pub ]; then\n"
    "  rm -f $k $k.pub; ssh-keygen -q -t ed25519 -N '' -f $k </dev/null >/dev/null\n"
    "fi\n"
    "umask 077\n"
    "mkdir -p /root/.ssh\n"
    "f=/root/.ssh/authorized_keys\n"
    "touch $f\n"
    "while IFS= read -r key; do\n"
    '  if [ -n "$key" ] && ! grep -qxF "$key" $f; then printf \'%s\\n\' "$key" >> $f; fi\n'
    "done\n"
    "cat $k.pub\n"
)


def check_public_key(text: object) -> str:
    """One OpenSSH public key line (``TYPE BASE64 [COMMENT]``), normalised; else UsageError.

    The base64 blob must decode and name the same type inside, so a line with
    options (``command=...``) or anything that is not a key is refused.
    """
    if not isinstance(text, str):
        raise UsageError("an ssh public key must be text")
    line = text.strip()
    if not line or len(line) > MAX_KEY_CHARS:
        raise UsageError("an ssh public key must be one line of at most 16 KiB")
    if any(ord(c) < 32 or ord(c) == 127 for c in line):
        raise UsageError("an ssh public key must be one line without control characters")
    parts = line.split(None, 2)
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise UsageError(f"not an OpenSSH public key: {line[:40]!r}")
    kind, blob = parts[0], parts[1]
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UsageError(f"ssh public key: bad base64 ({exc})") from exc
    if len(raw) < 4:
        raise UsageError("ssh public key: blob too short")
    (n,) = struct.unpack(">I", raw[:4])
    if raw[4 : 4 + n] != kind.encode():
        raise UsageError(f"ssh public key: blob does not hold a {kind} key")
    return " ".join(parts)


def check_public_keys(value: object) -> tuple[str, ...]:
    """A non-empty list of public keys from the wire or the CLI."""
    if not isinstance(value, list | tuple) or not value:
        raise UsageError("ssh access needs at least one public key")
    if len(value) > MAX_KEYS:
        raise UsageError(f"at most {MAX_KEYS} ssh public keys at once")
    return tuple(dict.fromkeys(check_public_key(k) for k in value))


def known_hosts_line(address: str, port: int, host_key: str) -> str:
    """The known_hosts line that pins ``host_key`` for ``address:port``."""
    kind, blob = check_public_key(host_key).split()[:2]
    host = address if port == 22 else f"[{address}]:{port}"
    return f"{host} {kind} {blob}\n"


def pick_port(
    ports: range, used: Iterable[int], is_free: Callable[[int], bool] = lambda port: True
) -> int:
    """The lowest port of ``ports`` not in ``used`` for which ``is_free`` holds; 0 if none.

    0 means "no forward": a VM without an ssh port still runs (``vmmesh exec``).
    """
    taken = set(used)
    for port in ports:
        if port not in taken and is_free(port):
            return port
    return 0


def connect_address(owner_is_local: bool, bind: str, gossiped: str) -> str:
    """The address a CLI on the coordinating host dials for a forward bound on ``bind``.

    A wildcard bind is reached on loopback from the owning host itself and on
    the owner's gossiped peer address (``HOST:PORT``) from others;
    loopback-only forwards can only be used from the owning host; a specific
    address is used as it is.
    """
    if gossiped.count(":") == 1 or gossiped.startswith("["):
        gossiped = gossiped.rpartition(":")[0].strip("[]")
    wildcard = bind in ("", "0.0.0.0", "::")
    loopback = bind.startswith("127.") or bind == "::1"
    if owner_is_local:
        return "127.0.0.1" if wildcard else bind
    if loopback:
        raise UsageError(
            "that VM's host forwards ssh on loopback only (ssh_bind); run `vmmesh ssh` there"
        )
    if wildcard:
        if not gossiped:
            raise UsageError("the VM's host has no known address")
        return gossiped
    return bind
