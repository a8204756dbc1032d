"""Saved states: a guest's RAM and device state in a file, and the shape it fits.

A saved state can only be resumed by a QEMU that builds the same virtual
machine: the same QEMU version and machine type, the same accelerator and
CPU model, the same memory and vCPUs, the same devices (``DEVICES`` names
the device set ``qemu_argv`` builds; it changes whenever that does) and the
same kernel booted.  ``Shape`` records these next to the state when it is
made; before resuming, the shape the new guest would have is compared with
it, and any difference means a cold boot instead, with the difference as the
reason.  Warm starts use this, and migration (later) will too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

DEVICES = "virtio-blk,virtio-serial+qga,virtio-net(user),vmgenid,ringbuf-serial:1"


@dataclass(frozen=True)
class Shape:
    """What a saved state needs of the guest that resumes it."""

    fields: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, values: Mapping[str, object]) -> Shape:
        return cls(tuple(sorted((k, str(v)) for k, v in values.items())))

    def to_json(self) -> dict[str, str]:
        return dict(self.fields)

    @classmethod
    def from_json(cls, raw: object) -> Shape | None:
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
        ):
            return None
        return cls.of(raw)

    def differs(self, other: Shape) -> str:
        """Why a state of shape ``self`` cannot resume as ``other`` ("" when it can)."""
        mine, theirs = dict(self.fields), dict(other.fields)
        diffs = [
            f"{key} {mine.get(key, '-')} != {theirs.get(key, '-')}"
            for key in sorted(set(mine) | set(theirs))
            if mine.get(key) != theirs.get(key)
        ]
        return "; ".join(diffs)
