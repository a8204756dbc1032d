"""Names and ids: what a peer's or a user's string must look like, and VM naming.

Every id that may end up in a file name (node, mesh, template, image, blob,
VM ids) is lowercase hex, checked here, so no string from a peer ever
becomes a path.  VMs of one request share its NAME; each is ``NAME-<n>``,
and ``next_index`` is the one place that picks the next free ``n``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from vmmesh.api.codec import Text
from vmmesh.errors import MalformedMessage

HEX_ID = re.compile(r"^[0-9a-f]{8,64}$")
VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,127}$")
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_PACKAGES = 256
# Requests named ``job-...`` belong to jobs (`vmmesh run`): their host shuts them down
# when the job's lease runs out, so a user's request may not take the prefix.
JOB_PREFIX = "job-"

# Specs of the same rules, for typed bodies.
HexId = Text(64, HEX_ID.pattern[1:-1], "hex id")
Sha256 = Text(64, "[0-9a-f]{64}", "sha256")
VmName = Text(63, VM_NAME.pattern[1:-1], "VM name")
Package = Text(128, PACKAGE_NAME.pattern[1:-1], "package name")
HostName = Text(63, HOST_NAME.pattern[1:-1], "host name")


def check_hex_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a lowercase hex id, else raise MalformedMessage."""
    if not isinstance(value, str) or not HEX_ID.match(value):
        raise MalformedMessage(f"bad {what}: {value!r:.80}")
    return value


def check_vm_name(value: object) -> str:
    if not isinstance(value, str) or not VM_NAME.match(value):
        raise MalformedMessage(f"bad VM name: {value!r:.80}")
    return value


def check_package(value: object) -> str:
    if not isinstance(value, str) or not PACKAGE_NAME.match(value):
        raise MalformedMessage(f"bad package name: {value!r:.80}")
    return value


def request_name_of(display_name: str) -> str:
    """``web-3`` -> ``web``: the request a VM belongs to."""
    head, sep, tail = display_name.rpartition("-")
    return head if sep and tail.isdigit() and head else display_name


def next_index(name: str, existing: Iterable[str]) -> int:
    """The first ``n`` after every ``NAME-<n>`` among ``existing`` VM names."""
    highest = 0
    for vm in existing:
        head, sep, tail = vm.rpartition("-")
        if sep and head == name and tail.isdigit():
            highest = max(highest, int(tail))
    return highest + 1


def guest_hostname(display: str) -> str:
    """A valid host name (RFC 1123 label) from a VM name: lower case, ``_``/``.`` -> ``-``."""
    label = "".join(c if c.isalnum() else "-" for c in display.lower()).strip("-")[:63]
    return label.strip("-") or "vm"
