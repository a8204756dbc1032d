"""What makes a guest itself: its host name and its ssh keys, set through the agent.

A VM is a clone: everything its template holds it shares with its siblings.
What must differ is made here, after the guest is up and before anyone uses
it: the host name is its VM name, the ssh host key is its own (made on first
use, never copied), and the keys allowed to log in are the ones the user
sent.  A guest resumed from a warm state also needs a machine id, randomness
and a clock of its own (``become_itself``; see ``host.warm``).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Sequence

from vmmesh.api.names import guest_hostname
from vmmesh.errors import HypervisorError, UsageError
from vmmesh.host.sshkeys import NO_SSHD_EXIT, PREPARE_SCRIPT, check_public_key
from vmmesh.hypervisor.base import Guest

log = logging.getLogger("vmmesh.host.persona")

# Shell builtins only (under TCG every process costs 0.03-0.1 s): the kernel's host
# name through /proc (what hostname(1) does), the 127.0.1.1 line of /etc/hosts
# rewritten by a read loop (what sed did).
_SET_HOSTNAME = (
    'printf "%s\\n" "$1" > /etc/hostname && printf %s "$1" > /proc/sys/kernel/hostname && '
    '{ h=; while IFS= read -r l || [ -n "$l" ]; do '
    'case $l in 127.0.1.1[[:space:]]*) l="127.0.1.1\t$1" ;; esac; h="$h$l\n"; '
    'done < /etc/hosts; printf %s "$h" > /etc/hosts; }'
)


async def set_hostname(guest: Guest, display: str) -> None:
    """The guest calls itself by its VM name (as in ``vmmesh vms`` and ssh prompts)."""
    hostname = guest_hostname(display)
    try:
        res = await guest.exec(["sh", "-c", _SET_HOSTNAME, "sh", hostname])
    except HypervisorError as exc:
        log.warning("%s: hostname not set: %s", display, exc)
        return
    if res.exit_code != 0:
        log.warning("%s: hostname not set: %r", display, res.stderr[-200:])


async def authorize_ssh(guest: Guest, vm: str, request: str, keys: Sequence[str]) -> str:
    """Let ``keys`` log in as root; make the guest's own host key if it has none; return it."""
    res = await guest.exec(
        ["sh", "-c", PREPARE_SCRIPT], input_data="".join(f"{k}\n" for k in keys).encode()
    )
    if res.exit_code == NO_SSHD_EXIT:
        raise UsageError(
            f"{vm} has no ssh server (its base image predates it); "
            f"use `vmmesh exec {request} -- COMMAND`"
        )
    if res.exit_code != 0:
        raise HypervisorError(f"preparing ssh in {vm} failed: {res.stderr[-300:]!r}")
    return check_public_key(res.stdout.decode("utf-8", "replace"))


# What a resumed clone runs first - becoming itself (``become_itself``), a job's wrapper
# (jobs.guestjob) - is run once before the save, so that the programs and their
# libraries are in the saved page cache: read from the disk after a resume, through
# virtio under TCG, they cost the first request and the first job.
PRELOAD = (
    "date >/dev/null; cat </dev/null; networkctl --version >/dev/null; mkdir -p /; "
    "find /dev/null -maxdepth 0 -printf '' ; timeout 1 true"
)

# Run by a guest resumed from a warm state, before anyone uses it: its own
# machine id ($3, made on the host), fresh randomness (stdin, kept as fd 3 for a
# background job; QEMU's new VM generation id already made the kernel reseed),
# the host's time ($1), its host name ($2), a new DHCP lease.  Under TCG every
# process costs 0.03-0.1 s, and more in a guest just resumed (its code is
# translated again), so shell builtins where they do, the rest side by side,
# and the lease renewal asked for last and not waited on (networkd renews on
# its own time either way; its output goes to /dev/null, so the agent does not
# wait for it).
_BECOME_ITSELF = (
    "exec 3<&0\n"
    "cat <&3 > /dev/urandom & r=$!\n"
    'date -u -s "@$1" >/dev/null & d=$!\n'
    'printf "%s\\n" "$3" > /etc/machine-id\n'
    "m=/var/lib/dbus/machine-id\n"
    '[ ! -e "$m" ] || [ -L "$m" ] || rm -f "$m"\n'
    'set -- "$2"\n'
    f"{_SET_HOSTNAME}\n"
    "status=$?\n"
    'wait "$r" "$d"\n'
    "networkctl renew eth0 >/dev/null 2>&1 3<&- &\n"
    'exit "$status"\n'
)


async def become_itself(guest: Guest, display: str) -> None:
    """A resumed clone takes its own identity: host name, machine id, RNG, clock, lease.

    One guest command for all of it: under TCG each command costs a process
    start and a few agent round trips, and this is on the path of every warm VM.
    """
    argv = ["sh", "-c", _BECOME_ITSELF, "sh", f"{time.time():.3f}", guest_hostname(display),
            secrets.token_hex(16)]  # fmt: skip
    res = await guest.exec(argv, input_data=os.urandom(64))
    if res.exit_code != 0:  # the host name in /etc/hosts; as in set_hostname
        log.warning("%s: hostname not set: %r", display, res.stderr[-200:])
