"""Scuttlebutt anti-entropy gossip as a pure state machine (no sockets, no clock).

Theory of operation
-------------------
Each host is the only *author* of a small map ``key -> (version, value)``
about itself ("name", "addr", "capacity", "templates", "vms", "draining",
"crl").  Every write gets the next version of that host, so a host's state
grows along one version line and "what do you know about X" is summed up by
one number: the highest version of X you hold.  That number is the *digest*
entry (van Renesse et al., "Efficient reconciliation and flow control for
anti-entropy protocols", 2008).

The heartbeat ("hb", bumped by ``tick``) is versioned the same way but rides
in the digest itself, as a second number per host, instead of as a delta.
Every host's heartbeat changes every interval; as deltas they would fill every
message of a large mesh (N deltas per node per round, each ~35 bytes) and
crowd out real changes, while in the digest, which is sent in full anyway,
they cost a few bytes per entry and reach everyone without a budget.

A version is ``(generation, counter)``; the generation is given at start (the
node passes its start time in ms), so a host restarted with the same node id
supersedes everything its previous life said.  Internally a version is the
int ``generation << 32 | counter`` so that comparisons and digests are cheap;
on the wire it is the pair.

One exchange, initiated by A towards B::

    A -> B  Syn(digest and heartbeats of A)
    B -> A  Ack(deltas A lacks, request: where B lacks keys, newer heartbeats)
    A -> B  Ack2(deltas B requested)

Deltas of one host are always sent in ascending version order and cut only at
the tail, so the receiver's knowledge of each host stays *prefix closed*:
holding version v of X means holding every key of X whose latest write is at
most v.  Hence a delta at or below what we hold is a duplicate or stale and is
dropped, which makes any delivery order, duplication or loss safe: lost
deltas are simply offered again by the next exchange.  One message carries at
most ``max_deltas`` deltas; hosts are served most-stale first (largest version
gap, unknown hosts first), so a host starved in one exchange gets priority in
the next.

Liveness: a newer heartbeat of X, from whoever relays it, feeds X's phi
accrual detector (``detector.py``).  ``tick(now)`` turns silence into
"suspect", then "down", and ``forget_after`` seconds of down into forgetting
X.  A forgotten host leaves a tombstone (its last version) so that stale
copies still held by other hosts do not bring it back; only a newer version
(it came back, or restarted with a new generation) does.  A removed (revoked)
host is refused for good.

The node is the authority on itself: a delta or digest claiming a newer
version of *this* node than it holds is never applied; the node re-stamps its
own keys above that version so its real state wins everywhere.

Values are untrusted: the ``check`` given at construction (the node passes
``hoststate.check_value``) sees every delta before it is stored.  A refused
value is not stored, so it is never relayed, and the key counts as absent
for its host; the version still advances, so the bad delta is not asked for
again.  A ``REFUSED`` event names the host, the key, the peer it came through
and why.

The node learns what changed through ``drain_events()`` instead of polling.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from random import Random
from typing import Any

from vmmesh.api.gossip import (
    COUNTER_BITS,
    COUNTER_MASK,
    KEY_RE,
    Ack,
    Ack2,
    Delta,
    Syn,
    pack_version,
    unpack_version,
)
from vmmesh.api.names import check_hex_id
from vmmesh.errors import MalformedMessage, NotFound, Revoked, UsageError
from vmmesh.gossip.detector import DOWN, SUSPECT, UP, DetectorConfig, PhiAccrual, Status

HB = "hb"


@dataclass(frozen=True)
class GossipConfig:
    """Tuning of the gossip core (times in seconds)."""

    max_deltas: int = 256  # per message: bounds frame size and per-exchange work
    forget_after: float = 60.0  # down for this long -> forgotten
    tombstone_ttl: float = 600.0  # how long a forgotten host's last version is remembered
    down_probe: float = 0.1  # chance per round of also gossiping with one down host
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self) -> None:
        if self.max_deltas < 1:
            raise ValueError("max_deltas must be >= 1")
        if self.forget_after < 0 or self.tombstone_ttl < self.forget_after:
            raise ValueError("need 0 <= forget_after <= tombstone_ttl")
        if not 0 <= self.down_probe <= 1:
            raise ValueError("down_probe must be in [0, 1]")


# --- events and views -------------------------------------------------------


class EventKind(enum.StrEnum):
    JOINED = "joined"  # first state of a host arrived
    CHANGED = "changed"  # keys of a host changed (heartbeats alone are not reported)
    SUSPECT = "suspect"
    DOWN = "down"
    UP = "up"  # a suspect or down host is heard again
    FORGOTTEN = "forgotten"  # down for forget_after: its state is gone
    REFUSED = "refused"  # a value of a host failed its check; ``via`` relayed it


@dataclass(frozen=True)
class GossipEvent:
    kind: EventKind
    node_id: str
    keys: frozenset[str] = frozenset()
    reason: str = ""
    via: str = ""


@dataclass(frozen=True)
class Member:
    node_id: str
    status: Status
    last_heard: float
    state: dict[str, Any]


class _Peer:
    """What we hold about one host besides its two digest versions.

    ``keys`` is never mutated in place, only replaced, so one dict can be
    shared by many cores in the simulator.
    """

    __slots__ = ("det", "down_since", "keys", "status")

    def __init__(self, det: PhiAccrual | None) -> None:
        self.keys: dict[str, tuple[int, Any]] = {}
        self.det = det
        self.status: Status = UP
        self.down_since = 0.0


ValueCheck = Callable[[str, object, int], None]
"""``check(key, value, keys the host already holds)``: raise MalformedMessage to refuse."""


class GossipCore:
    """The gossip state of one node; every method is synchronous and pure."""

    def __init__(
        self,
        node_id: str,
        generation: int,
        *,
        config: GossipConfig | None = None,
        check: ValueCheck | None = None,
    ):
        self.node_id = check_hex_id(node_id, "node id")
        if not isinstance(generation, int) or not 0 <= generation < 1 << 63:
            raise UsageError(f"bad gossip generation: {generation!r}")
        self.config = config or GossipConfig()
        self._check = check
        self._next = pack_version(generation, 0)
        self._self = _Peer(None)
        self._peers: dict[str, _Peer] = {node_id: self._self}
        # Per host we hold anything of: highest key version (0: none yet) and
        # highest heartbeat.  Kept as flat dicts because every Syn copies them
        # and every on_syn scans them, O(N) each.
        self._digest: dict[str, int] = {}
        self._beats: dict[str, int] = {}
        self._ids: list[str] = []  # peers other than self, for O(1) random picks
        self._index: dict[str, int] = {}
        self._down: dict[str, None] = {}  # insertion ordered, so picks are reproducible
        self._tombstones: dict[str, tuple[int, int, float]] = {}  # id -> (keys, hb, expiry)
        self._removed: set[str] = set()
        self._events: list[GossipEvent] = []
        self._next_check = 0.0  # no liveness change can happen before this time

    # --- own state ---------------------------------------------------------

    def _bump(self, seen: int = 0) -> int:
        self._next = max(self._next, seen) + 1
        if self._next & COUNTER_MASK == 0:  # counter wrapped: move to the next generation
            self._next += 1
        return self._next

    @property
    def local_version(self) -> tuple[int, int]:
        """Highest version of our own keys."""
        return unpack_version(self._digest.get(self.node_id, 0))

    def set_local(self, key: str, value: Any) -> None:
        """Publish ``value`` under ``key`` (msgpack-able plain data)."""
        if key == HB or not KEY_RE.match(key):
            raise UsageError(f"bad gossip key: {key!r}")
        me = self._self
        old = me.keys.get(key)
        if old is not None and old[1] == value:
            return  # unchanged: do not make every peer fetch it again
        v = self._bump()
        me.keys = {**me.keys, key: (v, value)}
        self._digest[self.node_id] = v
        self._beats.setdefault(self.node_id, 0)

    def tick(self, now: float) -> None:
        """Bump the heartbeat and update liveness; call once per gossip interval."""
        self._beats[self.node_id] = self._bump()
        self._digest.setdefault(self.node_id, 0)
        if now >= self._next_check:
            self._sweep(now)

    def _reassert(self, seen: int) -> None:
        """Someone holds a newer version of *us* than we do (an older life of
        this node with a later clock, or a forgery): re-stamp all our keys
        above it so that our real state supersedes it everywhere."""
        me = self._self
        me.keys = {k: (self._bump(seen), val) for k, (_, val) in me.keys.items()}
        self._digest[self.node_id] = self._next
        self._beats[self.node_id] = self._bump(seen)

    # --- peers -------------------------------------------------------------

    def _add_peer(self, nid: str, now: float) -> _Peer:
        p = _Peer(PhiAccrual(self.config.detector, now))
        self._peers[nid] = p
        self._digest[nid] = 0
        self._beats[nid] = 0
        self._index[nid] = len(self._ids)
        self._ids.append(nid)
        self._next_check = min(self._next_check, now + self.config.detector.first_interval)
        return p

    def _drop_peer(self, nid: str) -> tuple[int, int] | None:
        if self._peers.pop(nid, None) is None:
            return None
        i = self._index.pop(nid)
        last = self._ids.pop()
        if last != nid:
            self._ids[i] = last
            self._index[last] = i
        self._down.pop(nid, None)
        return self._digest.pop(nid), self._beats.pop(nid)

    def learn(self, node_id: str, now: float) -> None:
        """A host seen by discovery or given as a seed: gossip with it even
        before any of its state has arrived."""
        check_hex_id(node_id, "node id")
        if node_id in self._peers or node_id in self._removed or node_id in self._tombstones:
            return  # a forgotten host comes back through its own newer gossip only
        self._add_peer(node_id, now)

    def preload(
        self, node_id: str, hb_version: int, keys: dict[str, tuple[int, Any]], now: float
    ) -> None:
        """Install a host's state as already known, sharing ``keys`` (which the
        caller must not mutate).  The simulator starts converged meshes with it."""
        p = self._peers.get(node_id) or self._add_peer(node_id, now)
        p.keys = keys
        self._digest[node_id] = max((v for v, _ in keys.values()), default=0)
        self._beats[node_id] = hb_version

    def forget(self, node_id: str, now: float) -> None:
        """Drop a host's state; only a newer version than the ones we held
        brings it back."""
        if node_id == self.node_id:
            raise UsageError("a node cannot forget itself")
        held = self._drop_peer(node_id)
        if held is not None:
            self._tombstones[node_id] = (*held, now + self.config.tombstone_ttl)

    def remove(self, node_id: str) -> None:
        """A revoked host: drop its state and refuse anything about it or from it."""
        if node_id == self.node_id:
            raise UsageError("a node cannot remove itself")
        self._drop_peer(node_id)
        self._tombstones.pop(node_id, None)
        self._removed.add(node_id)

    def _check_sender(self, sender: str) -> None:
        if sender in self._removed:
            raise Revoked(f"host {sender} has been removed from the mesh")

    def _sweep(self, now: float) -> None:
        """Move silent hosts to suspect/down, forget long-down ones, expire
        tombstones, and note when the next of these can happen."""
        forget_after = self.config.forget_after
        events = self._events
        to_forget = []
        next_check = now + forget_after
        for nid in self._ids:
            p = self._peers[nid]
            det = p.det
            assert det is not None
            if p.status == DOWN:
                if now - p.down_since >= forget_after:
                    to_forget.append(nid)
                else:
                    next_check = min(next_check, p.down_since + forget_after)
                continue
            suspect_at = det.suspect_at
            if now < suspect_at:
                next_check = min(next_check, suspect_at)
                continue
            down_at = det.down_at
            new = SUSPECT if now < down_at else DOWN
            next_check = min(next_check, down_at if new == SUSPECT else now + forget_after)
            if new != p.status:
                p.status = new
                if new == DOWN:
                    p.down_since = now
                    self._down[nid] = None
                    events.append(GossipEvent(EventKind.DOWN, nid))
                else:
                    events.append(GossipEvent(EventKind.SUSPECT, nid))
        for nid in to_forget:
            self.forget(nid, now)
            events.append(GossipEvent(EventKind.FORGOTTEN, nid))
        if self._tombstones:
            expired = [n for n, (_, _, exp) in self._tombstones.items() if exp <= now]
            for nid in expired:
                del self._tombstones[nid]
            next_check = min([next_check, *(exp for _, _, exp in self._tombstones.values())])
        self._next_check = next_check

    def _heard(self, nid: str, hb: int, now: float) -> None:
        """A newer heartbeat of ``nid`` arrived, from whoever relayed it."""
        self._beats[nid] = hb
        p = self._peers[nid]
        det = p.det
        assert det is not None
        if p.status == UP:
            det.heartbeat(now)
        else:
            det.reset(now)  # back after silence: do not learn the gap as normal
            p.status = UP
            self._down.pop(nid, None)
            self._next_check = min(self._next_check, det.suspect_at)
            self._events.append(GossipEvent(EventKind.UP, nid))

    def pick_targets(self, rng: Random, fanout: int) -> list[str]:
        """Up to ``fanout`` random hosts that are not down, plus now and then
        one down host so that a healed partition reconverges."""
        ids = self._ids
        down = self._down
        chosen: list[str] = []
        if len(ids) <= 4 * fanout:
            live = [n for n in ids if n not in down]
            chosen = rng.sample(live, min(fanout, len(live)))
        else:  # large mesh: rejection sampling keeps this O(fanout)
            for _ in range(4 * fanout):
                nid = ids[rng.randrange(len(ids))]
                if nid not in chosen and nid not in down:
                    chosen.append(nid)
                    if len(chosen) == fanout:
                        break
        if down and rng.random() < self.config.down_probe:
            chosen.append(rng.choice(list(down)))
        return chosen

    # --- reconciliation ------------------------------------------------------

    def make_syn(self) -> Syn:
        return Syn(self.node_id, dict(self._digest), dict(self._beats))

    def _wanted(self, nid: str, theirs: int, hb: int) -> bool:
        """Is a host we hold nothing of worth asking for?  Not if it was
        removed, nor if it was forgotten and this is no newer than what we had."""
        if nid in self._removed:
            return False
        tomb = self._tombstones.get(nid)
        return tomb is None or theirs > tomb[0] or hb > tomb[1]

    def on_syn(self, syn: Syn, sender: str, now: float) -> Ack:
        """Answer a Syn with what the sender lacks and what we lack."""
        self._check_sender(sender)
        held = self._digest
        beats = self._beats
        their_beats = syn.beats
        me = self.node_id
        ahead: list[tuple[int, str, int]] = []  # (gap, node id, their version)
        request: dict[str, int] = {}
        newer_beats: dict[str, int] = {}
        found = 0
        for nid, theirs in syn.digest.items():
            their_hb = their_beats.get(nid, 0)
            mine = held.get(nid)
            if mine is None:
                if nid == me:
                    self._reassert(max(theirs, their_hb))
                    ahead.append((held[me], me, 0))
                elif self._wanted(nid, theirs, their_hb):
                    self._tombstones.pop(nid, None)
                    self._add_peer(nid, now)
                    request[nid] = 0
                    if their_hb:
                        self._heard(nid, their_hb, now)
                continue
            found += 1
            if mine != theirs:
                if mine > theirs:
                    ahead.append((mine - theirs, nid, theirs))
                elif nid == me:
                    self._reassert(theirs)
                    ahead.append((held[me] - theirs, me, theirs))
                else:
                    request[nid] = mine
            my_hb = beats[nid]
            if their_hb > my_hb:
                if nid == me:
                    self._reassert(their_hb)
                    newer_beats[me] = beats[me]
                else:
                    self._heard(nid, their_hb, now)
            elif my_hb > their_hb:
                newer_beats[nid] = my_hb
        if found < len(held):
            digest = syn.digest
            for nid, v in held.items():
                if nid not in digest:
                    if v:
                        ahead.append((v, nid, 0))
                    if beats[nid]:
                        newer_beats[nid] = beats[nid]
        return Ack(me, self._select(ahead), request, newer_beats)

    def on_ack(self, ack: Ack, sender: str, now: float) -> Ack2:
        """Apply an Ack and send back the keys it requested."""
        self._check_sender(sender)
        beats = self._beats
        me = self.node_id
        for nid, hb in ack.beats.items():  # first, so that a host heard again may be revived
            mine = beats.get(nid)
            if mine is None:
                if nid != me and self._wanted(nid, 0, hb):
                    self._tombstones.pop(nid, None)
                    self._add_peer(nid, now)
                    self._heard(nid, hb, now)
            elif hb > mine:
                if nid == me:
                    self._reassert(hb)
                else:
                    self._heard(nid, hb, now)
        self._apply(ack.deltas, now, sender)
        held = self._digest
        ahead = []
        for nid, theirs in ack.request.items():
            mine = held.get(nid)
            if mine is not None and mine > theirs:
                ahead.append((mine - theirs, nid, theirs))
        return Ack2(me, self._select(ahead))

    def on_ack2(self, ack2: Ack2, sender: str, now: float) -> None:
        self._check_sender(sender)
        self._apply(ack2.deltas, now, sender)

    def _select(self, ahead: list[tuple[int, str, int]]) -> tuple[Delta, ...]:
        """Deltas for the most stale hosts first, each host's in ascending
        version order and cut only at the tail, at most ``max_deltas``."""
        budget = self.config.max_deltas
        if len(ahead) > budget:
            ahead = heapq.nlargest(budget, ahead)
        else:
            ahead.sort(reverse=True)
        out: list[Delta] = []
        peers = self._peers
        for _, nid, after in ahead:
            mine = [Delta(nid, k, v, val) for k, (v, val) in peers[nid].keys.items() if v > after]
            mine.sort(key=itemgetter(2))
            out.extend(mine[: budget - len(out)])
            if len(out) >= budget:
                break
        return tuple(out)

    def _apply(self, deltas: tuple[Delta, ...], now: float, via: str) -> None:
        peers = self._peers
        held = self._digest
        me = self.node_id
        removed = self._removed
        tombs = self._tombstones
        revived: set[str] = set()
        if tombs:
            revived = {
                d.node_id for d in deltas if d.node_id in tombs and d.version > tombs[d.node_id][0]
            }
        changed: dict[str, set[str]] = {}
        for nid, key, ver, val in deltas:
            if key == HB:
                continue  # heartbeats travel in digests, never as deltas
            if nid == me:
                if ver > held.get(me, 0):
                    self._reassert(ver)
                continue
            p = peers.get(nid)
            if p is None:
                if nid in removed or (nid in tombs and nid not in revived):
                    continue
                tombs.pop(nid, None)
                p = self._add_peer(nid, now)
            mine = held[nid]
            if ver <= mine:
                continue  # duplicate or stale: we hold this prefix already
            keys = changed.get(nid)
            if keys is None:
                keys = changed[nid] = set()
                if mine and ver >> COUNTER_BITS > mine >> COUNTER_BITS:
                    keys.update(p.keys)  # a new life of that host: its old keys are void
                    p.keys = {}
                else:
                    p.keys = dict(p.keys)  # copy on write: the dict may be shared
                if not mine:
                    self._events.append(GossipEvent(EventKind.JOINED, nid))
            elif ver >> COUNTER_BITS > mine >> COUNTER_BITS:
                keys.update(p.keys)
                p.keys = {}
            held[nid] = ver
            keys.add(key)
            if self._check is not None and not self._accept(p, nid, key, val, via):
                continue
            p.keys[key] = (ver, val)
        for nid, keys in changed.items():
            self._events.append(GossipEvent(EventKind.CHANGED, nid, frozenset(keys)))

    def _accept(self, p: _Peer, nid: str, key: str, val: object, via: str) -> bool:
        """Run the value check; a refused value removes the key and is reported."""
        assert self._check is not None
        try:
            self._check(key, val, len(p.keys) - (key in p.keys))
        except MalformedMessage as exc:
            p.keys.pop(key, None)
            self._events.append(
                GossipEvent(EventKind.REFUSED, nid, frozenset({key}), str(exc), via)
            )
            return False
        return True

    # --- views -------------------------------------------------------------

    def drain_events(self) -> list[GossipEvent]:
        events, self._events = self._events, []
        return events

    def version_of(self, node_id: str) -> tuple[int, int] | None:
        """Highest key version held of a host, or None if it is unknown."""
        v = self._digest.get(node_id)
        return None if v is None else unpack_version(v)

    def state_of(self, node_id: str) -> dict[str, Any]:
        p = self._peers.get(node_id)
        if p is None:
            raise NotFound(f"no gossip state for host {node_id}")
        return {k: val for k, (_, val) in p.keys.items()}

    def status(self, node_id: str, now: float) -> Status:
        if node_id == self.node_id:
            return UP
        p = self._peers.get(node_id)
        if p is None or p.det is None:
            raise NotFound(f"no gossip state for host {node_id}")
        return p.det.status(now)

    def members(self, now: float) -> list[Member]:
        """Every host we hold, ourselves included, in node id order."""
        out = []
        for nid in sorted(self._peers):
            p = self._peers[nid]
            last = now if p.det is None else p.det.last
            out.append(Member(nid, self.status(nid, now), last, self.state_of(nid)))
        return out
