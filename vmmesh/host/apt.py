"""What apt says, and what we have the guest run: pure text, tested without a guest.

Two failures must not be confused (hardening, issue 11): a package the
source does not have (``missing_packages``: the request ends, no host would
do better) and a source the guest cannot reach (``source_problem``: apt's
``update`` even exits 0 then, with "W: Failed to fetch" lines; another host,
or a later try, may do better).

The build scripts keep apt's lists and downloaded archives on a tmpfs while
the template is made, so tens of MB of index files and every ``.deb`` never
land on the template's disk: the delta holds what was installed and little
else (what a peer that fetches the template pays for).
"""

from __future__ import annotations

import re

_MISSING = (
    re.compile(r"E: Unable to locate package (\S+)"),
    re.compile(r"E: Package '([^']+)' has no installation candidate"),
    re.compile(r"E: Couldn't find any package by (?:glob|regex) '([^']+)'"),
    re.compile(r"E: Version '[^']*' for '([^']+)' was not found"),
)
_FETCH_FAILED = re.compile(r"^[WE]: Failed to fetch (\S+)\s*(.*)$")
_UNREACHABLE = (
    re.compile(r"Temporary failure resolving '([^']+)'"),
    re.compile(r"Could not connect to (\S+)"),
    re.compile(r"Unable to connect to (\S+)"),
    re.compile(r"Could not resolve '([^']+)'"),
    re.compile(r"Connection failed"),
    re.compile(r"Network is unreachable"),
)

WAIT_ONLINE = "/usr/lib/systemd/systemd-networkd-wait-online --timeout=60 || true"
RETRIES_FILE = "/etc/apt/apt.conf.d/80vmmesh-retries"
RETRIES = b'Acquire::Retries "3";\n'
UPDATE_ATTEMPTS = 3
ENV = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

# apt's lists, and its archives where the guest has the RAM, on a tmpfs for the
# build.  A build in the VMs' shape (a warm build: 512 MB by default) keeps the
# archives on the disk: a JDK's 125 MB of .debs in RAM beside apt and dpkg could
# exhaust it, and CLEAN's sync and fstrim drop their blocks from the delta anyway.
SCRATCH = (
    "set -e\n"
    "dirs=/var/lib/apt/lists\n"
    "mem=$(sed -n 's/^MemTotal: *\\([0-9]*\\).*/\\1/p' /proc/meminfo)\n"
    '[ "${mem:-0}" -lt 900000 ] || dirs="$dirs /var/cache/apt/archives"\n'
    "for d in $dirs; do\n"
    "  mkdir -p $d && mount -t tmpfs -o mode=0755 tmpfs $d && mkdir -p $d/partial\n"
    "done\n"
)
# Before power-off: nothing of apt's left on disk, freed blocks handed back to
# the host (the drive has discard=unmap, so the qcow2 really drops them).  The
# first sync matters: ext4 frees a deleted file's blocks only when the journal
# commits, and fstrim skips blocks freed since (measured: 75 MB of deleted apt
# caches stayed in a delta without it, 2 MB with it).
CLEAN = (
    "apt-get clean; umount /var/lib/apt/lists /var/cache/apt/archives 2>/dev/null; "
    "rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt/* /tmp/* 2>/dev/null; "
    "sync; fstrim -av >/dev/null 2>&1; sync"
)
REPLACE_SOURCES = "rm -f /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources"


def missing_packages(apt_output: str) -> list[str]:
    """Package names apt says it cannot find, in the order it says so."""
    out: list[str] = []
    for line in apt_output.splitlines():
        for pattern in _MISSING:
            m = pattern.search(line)
            if m and m.group(1) not in out:
                out.append(m.group(1))
    return out


def source_problem(apt_output: str) -> str | None:
    """Why the guest could not reach its package source, or None if it could.

    Looks at "Failed to fetch URL reason" lines (warnings in ``update``,
    errors in ``install``) and at resolver and connection errors.  The answer
    names the source and the reason: "http://10.0.2.2:8080/ ./InRelease:
    Could not connect to 10.0.2.2:8080".
    """
    for line in apt_output.splitlines():
        m = _FETCH_FAILED.match(line.strip())
        if m:
            url, reason = m.group(1), m.group(2).strip()
            return f"{url}: {reason}" if reason else url
    for line in apt_output.splitlines():
        for pattern in _UNREACHABLE:
            if pattern.search(line):
                return line.strip()[:300]
    return None


_FETCHED = re.compile(r"^Fetched ([\d,.]+) ([kMG]?B) in (?:(\d+)min )?(\d+(?:\.\d+)?)s\b", re.M)
_UNITS = {"B": 1, "kB": 1000, "MB": 1000**2, "GB": 1000**3}


def fetched(apt_output: str) -> tuple[int, float] | None:
    """(bytes, seconds) from apt's "Fetched 6,421 kB in 2s (3,210 kB/s)" line, if any."""
    m = _FETCHED.search(apt_output)
    if m is None:
        return None
    amount = float(m.group(1).replace(",", ""))
    seconds = float(m.group(4)) + 60 * float(m.group(3) or 0)
    return int(amount * _UNITS[m.group(2)]), seconds


_DPKG_ERROR = re.compile(
    r"^(dpkg: error processing .*|dpkg: error: .*|update-alternatives: error: .*"
    r"|.*returned error exit status \d+|Errors were encountered while processing:.*)$"
)


def dpkg_errors(apt_output: str, most: int = 4) -> str | None:
    """What dpkg said went wrong (which package, which script, why), on one line."""
    found: list[str] = []
    for raw in apt_output.splitlines():
        line = raw.strip()
        if _DPKG_ERROR.match(line) and line not in found:
            found.append(line)
    return " | ".join(found[:most])[:600] if found else None


def tail(data: bytes, lines: int = 3) -> str:
    """The last lines of a command's output, on one line."""
    text = data.decode("utf-8", "replace").strip().splitlines()
    return " | ".join(text[-lines:])
