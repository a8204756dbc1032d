"""Which piece to ask of which holder: transfer bookkeeping without I/O.

A ``Scheduler`` knows the pieces of one blob that are still missing, the
pieces each holder is sending now, and what each holder delivered.  A
holder asks for its next batch when it finished the last one, so a faster
holder simply comes back sooner and gets more pieces; nothing is assigned
up front.  When a holder fails (its link broke, it sent a piece whose hash
is wrong, it no longer has the blob) it is dropped and what it was sending
goes back to the queue for the others.  When the queue is empty but pieces
are still out with a slow holder, an idle holder is given a copy of the
oldest outstanding piece (the "endgame" of BitTorrent), so one slow holder
cannot hold the whole transfer back; whichever copy arrives first counts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from vmmesh.errors import UsageError


@dataclass
class HolderStats:
    """What one holder did for this blob."""

    pieces: int = 0
    bytes: int = 0
    wire_bytes: int = 0
    seconds: float = 0.0
    dropped: str = ""

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Scheduler:
    """Pieces ``0..count-1`` of one blob; ``have`` are already here (a resumed transfer)."""

    count: int
    have: set[int] = field(default_factory=set)
    _queue: deque[int] = field(default_factory=deque, init=False)
    _out: dict[int, set[str]] = field(default_factory=dict, init=False)
    holders: dict[str, HolderStats] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.have = {i for i in self.have if 0 <= i < self.count}
        self._queue.extend(i for i in range(self.count) if i not in self.have)

    # --- holders ----------------------------------------------------------

    def add_holder(self, holder: str) -> None:
        self.holders.setdefault(holder, HolderStats())

    def live_holders(self) -> list[str]:
        return [h for h, s in self.holders.items() if not s.dropped]

    def drop(self, holder: str, reason: str) -> None:
        """``holder`` is out: what it was sending goes back to the queue."""
        stats = self.holders.setdefault(holder, HolderStats())
        stats.dropped = reason or "dropped"
        for index in sorted(self._out, reverse=True):
            senders = self._out[index]
            senders.discard(holder)
            if not senders:
                del self._out[index]
                self._queue.appendleft(index)

    # --- pieces -----------------------------------------------------------

    def next_batch(self, holder: str, size: int) -> list[int]:
        """Up to ``size`` pieces for ``holder`` to send next (empty: nothing for it now)."""
        stats = self.holders.get(holder)
        if stats is None or stats.dropped:
            raise UsageError(f"{holder} is not a live holder of this blob")
        batch: list[int] = []
        while self._queue and len(batch) < size:
            index = self._queue.popleft()
            if index in self.have:
                continue
            self._out.setdefault(index, set()).add(holder)
            batch.append(index)
        if not batch:  # endgame: help with a piece someone else is still sending
            for index, senders in self._out.items():
                if holder not in senders:
                    senders.add(holder)
                    batch.append(index)
                    break
        return batch

    def arrived(self, holder: str, index: int, size: int, wire: int, seconds: float) -> bool:
        """A verified piece from ``holder``; False if another copy came first (discard it)."""
        stats = self.holders.setdefault(holder, HolderStats())
        stats.seconds += seconds
        senders = self._out.pop(index, set())
        senders.discard(holder)
        if index in self.have:
            return False
        self.have.add(index)
        stats.pieces += 1
        stats.bytes += size
        stats.wire_bytes += wire
        return True

    def given_back(self, holder: str, indices: Iterable[int]) -> None:
        """``holder`` did not send these after all (its batch ended early): requeue."""
        for index in indices:
            senders = self._out.get(index)
            if senders is None or holder not in senders:
                continue
            senders.discard(holder)
            if not senders:
                del self._out[index]
                if index not in self.have:
                    self._queue.appendleft(index)

    @property
    def complete(self) -> bool:
        return len(self.have) == self.count

    @property
    def missing(self) -> int:
        return self.count - len(self.have)

    def stalled(self) -> bool:
        """No live holder is left and pieces are missing."""
        return not self.complete and not self.live_holders()
