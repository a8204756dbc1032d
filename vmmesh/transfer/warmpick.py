"""Whether to fetch a peer's warm state, and whose: pure (no sockets, no files).

A template fetched from a peer used to need a warm boot of its own here (a
cold boot, settle, save: about a minute of CPU under TCG) before its VMs
could resume, and the VMs of the request that fetched it booted cold
meanwhile.  A holder's warm state resumes here as well when its shape is
this host's (same QEMU, machine, accelerator, CPU model, memory, vCPUs,
devices, kernel) and its disk is the same chain, which a fetched template's
is byte for byte.  It is worth fetching when its bytes (the saved RAM, a
hundred-odd MB, and a small overlay) come faster than a warm boot here
takes: ``booting`` is what the boot took on this host (its base image's
state) or, lacking that, on the holder.

``choose`` groups the holders' manifests by content (holders that fetched the
same state from one another hold the same bytes, and are fetched from at
once), drops those whose shape differs, and takes the group with most
holders if fetching it beats booting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmmesh.api.transfer import WarmManifest
from vmmesh.hypervisor.savedstate import Shape
from vmmesh.transfer.fetcher import Holder


@dataclass(frozen=True)
class WarmChoice:
    """The state to fetch and from whom (``manifest`` None: none, and ``why``)."""

    manifest: WarmManifest | None
    holders: tuple[Holder, ...]
    why: str
    fetch_seconds: float = 0.0

    @property
    def size(self) -> int:
        m = self.manifest
        return 0 if m is None else m.state_size + m.disk_size


def choose(
    key: str,
    offers: Sequence[tuple[Holder, WarmManifest]],
    ours: Shape,
    fetch_seconds: Callable[[int], float],
    booting: float | None,
) -> WarmChoice:
    """The warm state of ``key`` to fetch from ``offers`` (holder, its manifest), for a
    host whose guests have shape ``ours``; ``fetch_seconds(bytes)`` estimates a fetch,
    ``booting`` a warm boot here (None: unknown, the holder's own figure is used)."""
    groups: dict[tuple[str, str], list[tuple[Holder, WarmManifest]]] = {}
    misfits: list[str] = []
    for holder, m in offers:
        if m.key != key:
            misfits.append(f"{holder.name} described another state")
            continue
        differs = Shape.of(m.shape).differs(ours)
        if differs:
            misfits.append(f"{holder.name}'s is for another guest shape ({differs})")
            continue
        groups.setdefault((m.state_sha256, m.disk_sha256), []).append((holder, m))
    if not groups:
        return WarmChoice(None, (), "; ".join(misfits) or "no holder has one")
    best = max(groups.values(), key=len)
    manifest = best[0][1]
    size = manifest.state_size + manifest.disk_size
    fe = fetch_seconds(size)
    boot = booting if booting else manifest.made_seconds
    names = ", ".join(h.name for h, _ in best)
    holders = tuple(h for h, _ in best)
    if boot and fe >= boot:
        why = f"a warm boot here (~{boot:.0f} s) beats fetching {size / 1e6:.0f} MB ({fe:.0f} s)"
        return WarmChoice(None, holders, why, fe)
    why = f"fetching {size / 1e6:.0f} MB from {names} ({fe:.0f} s) beats a warm boot ({boot:.0f} s)"
    return WarmChoice(manifest, holders, why, fe)
