"""What each VM of this host uses: CPU, memory and disk, sampled in the background.

A scrape must not wait on QEMU: a monitor that is busy (a migration holds
it for its whole run) or slow would stall ``/metrics`` and every other
request of the page.  So ``Sampler.run`` looks at every running guest every
``SAMPLE_EVERY`` seconds, each look bounded by ``LOOK_TIMEOUT``, and keeps
the latest figures in ``latest``; ``/metrics`` and the page read that dict
and never call QEMU.

Where each figure comes from:

* CPU seconds and resident memory: ``/proc/<QEMU pid>/stat`` (utime + stime,
  rss), the QEMU process as a whole, so they include QEMU's own threads (I/O,
  migration), as Proxmox and libvirt's ``cpu.time`` do;
* disk bytes and operations: QMP ``query-blockstats``, summed over the
  guest's drives;
* network bytes are not given: a guest on user-mode networking (vmmesh's
  default) has no host interface whose counters could be read
  (``/proc/<pid>/net/dev`` is the host namespace's interfaces, not the
  guest's), and QEMU's QMP has no per-netdev byte counters.

The counters are those of the QEMU process: a VM that was migrated or resumed
from its warm state is a new process, and its counters start again from 0
(a counter reset, which Prometheus's ``rate`` handles).  A guest that cannot
be asked (a fake hypervisor's, one without a pid) is not sampled.  A look
that fails keeps that VM's previous disk figures, so a counter does not
fall to 0 because one look timed out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import trio

from vmmesh.errors import VmmeshError

log = logging.getLogger("vmmesh.web")

SAMPLE_EVERY = 5.0  # seconds between looks at the guests
LOOK_TIMEOUT = 2.0  # seconds one guest's look may take


@runtime_checkable
class Monitored(Protocol):
    """A guest whose QEMU process and monitor can be asked (``QemuGuest``)."""

    pid: int

    async def qmp(self, execute: str, arguments: dict[str, Any] | None = None) -> Any: ...


@dataclass(frozen=True)
class VmUsage:
    """One VM's figures at one look."""

    vm: str  # its name
    pid: int = 0  # its QEMU process
    cpu_seconds: float = 0.0
    rss_bytes: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    read_ops: int = 0
    write_ops: int = 0


def parse_proc_stat(text: str, clock_ticks: int, page_size: int) -> tuple[float, int]:
    """CPU seconds (user + system) and resident bytes from a ``/proc/<pid>/stat`` line.

    The command name in parentheses may hold spaces and parentheses: the fields
    are counted from the last ``)``.  ValueError for a line that is not one.
    """
    _, paren, rest = text.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 22:
        raise ValueError("not a /proc/<pid>/stat line")
    utime, stime, rss = int(fields[11]), int(fields[12]), int(fields[21])
    return (utime + stime) / clock_ticks, max(0, rss) * page_size


def blockstats_totals(reply: object) -> tuple[int, int, int, int]:
    """Bytes read, bytes written, read and write operations, summed over the drives of
    a ``query-blockstats`` reply; ValueError if it is not one."""
    if not isinstance(reply, list):
        raise ValueError("query-blockstats did not answer a list")
    totals = [0, 0, 0, 0]
    keys = ("rd_bytes", "wr_bytes", "rd_operations", "wr_operations")
    for dev in reply:
        stats = dev.get("stats") if isinstance(dev, dict) else None
        if not isinstance(stats, dict):
            raise ValueError("a query-blockstats entry without stats")
        for i, key in enumerate(keys):
            value = stats.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"query-blockstats: {key} is not a count")
            totals[i] += value
    return totals[0], totals[1], totals[2], totals[3]


def read_proc(pid: int) -> tuple[float, int] | None:
    """CPU seconds and resident bytes of process ``pid``; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return parse_proc_stat(text, os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError):
        return None


class Sampler:
    """Keeps ``latest`` (VM name -> ``VmUsage``) for the guests ``guests()`` returns
    (VM name -> guest; a guest's own name is its run directory's, not the VM's)."""

    def __init__(
        self,
        guests: Callable[[], Mapping[str, object]],
        proc: Callable[[int], tuple[float, int] | None] = read_proc,
    ) -> None:
        self._guests = guests
        self._proc = proc
        self.latest: dict[str, VmUsage] = {}
        self.looks = 0  # rounds done (tests wait on it)

    def current(self) -> list[VmUsage]:
        """The last figures of the guests still here, with the same QEMU: a VM that
        left since the last round (moved, stopped) is not reported by two hosts."""
        here = self._guests()
        return [u for vm, u in self.latest.items() if getattr(here.get(vm), "pid", None) == u.pid]

    async def run(self) -> None:
        while True:
            await self.look()
            await trio.sleep(SAMPLE_EVERY)

    async def look(self) -> None:
        """One round: every monitored guest, at the same time, each bounded."""
        guests = {vm_id: g for vm_id, g in self._guests().items() if isinstance(g, Monitored)}
        found: dict[str, VmUsage] = {}
        async with trio.open_nursery() as nursery:
            for vm_id, guest in guests.items():
                nursery.start_soon(self._look_at, vm_id, guest, found)
        self.latest = found
        self.looks += 1

    async def _look_at(self, vm: str, guest: Monitored, found: dict[str, VmUsage]) -> None:
        before = self.latest.get(vm)
        same = before is not None and before.pid == guest.pid
        usage = before if same and before is not None else VmUsage(vm, guest.pid)
        proc = self._proc(guest.pid)
        if proc is None:
            return  # QEMU is gone: the VM is no longer running
        usage = replace(usage, cpu_seconds=proc[0], rss_bytes=proc[1])
        with trio.move_on_after(LOOK_TIMEOUT):
            try:
                rd, wr, rops, wops = blockstats_totals(await guest.qmp("query-blockstats"))
            except (VmmeshError, OSError, ValueError) as exc:
                log.debug("blockstats of %s: %s", vm, exc)
            else:
                usage = replace(
                    usage, read_bytes=rd, written_bytes=wr, read_ops=rops, write_ops=wops
                )
        found[vm] = usage
