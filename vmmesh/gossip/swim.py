"""SWIM membership with infection-style dissemination, as a pure state machine.

Theory of operation
-------------------
This is the successor of ``core`` (Scuttlebutt with a heartbeat of every host
in every exchange), built so that traffic grows with the news and not with
the mesh (issue 19).  It reads no clock and opens no socket: the caller
passes ``now``, hands in each received message with ``receive`` and calls
``tick`` when ``next_deadline`` comes; both return ``(destination,
message)`` pairs to send.  Randomness comes from an injected ``Random``.

*Liveness* (SWIM, Das et al. 2002, with Lifeguard, Dadgar et al. 2018).
Every probe interval a host pings the next member of a shuffled ring.  No
ack within the probe timeout: it pings again and asks ``indirect_probes``
other members to ping the target for it (``PingReq``); they answer ``Ack``
if the target answers them and ``Nack`` otherwise.  No ack by the end of the
interval: the target is *suspected*, and the claim ``Suspect(node,
incarnation)`` spreads.  A suspected host that hears of it *refutes* by
raising its incarnation and spreading ``Alive``; a higher incarnation beats
any suspicion.  A suspicion that nobody refutes in time becomes ``Dead``,
which everyone accepts at once.  Lifeguard's two ideas: a *local health*
score rises when this host's own probes fail, nacks it expected do not come,
or it has to refute, and falls with each answered probe; probe interval and
timeout are stretched by ``1 + score``, so a slow or overloaded host does not
accuse healthy ones.  And the suspicion timeout starts long and shrinks, on
a log scale, as independent confirmations (suspicions of the same host by
other members) arrive: a host that is really dead is confirmed by every
prober that reaches for it, a falsely suspected one rarely is.  A refutation
spreads like any fact and can miss a host; so a ping to a host we suspect
carries our suspicion (Lifeguard's buddy system), an ack to a ping that
doubts the responder carries its current ``Alive``, and a suspicion that
runs out is not yet ``Dead``: the host first pings the suspect directly
``suspicion_asks`` times, ``probe_timeout`` apart (a real death is declared
that much later; a live suspect's ack ends the doubt).

*State* (kept from ``core``).  Each host is the only author of its keys;
every write takes the next version ``generation << 32 | counter``, so a
restarted host (a new generation) supersedes everything its previous life
said; incarnations are packed the same way, so its ``Alive`` wins too.  A
write becomes a ``News`` fact, the range ``(after, version]`` of that author.
A host holding ``after`` or more applies the range and stays prefix closed;
one holding less has a gap and pulls from the relay (``Want``/``Give``).
Values meet the injected ``check`` before they are stored; a refused value
is not stored, hence not relayed, and a ``REFUSED`` event says why.

*Dissemination*.  A fact that changed what this host holds is queued and
piggybacked on pings and acks, and sent to ``gossip_fanout`` random members
every ``gossip_interval`` while the queue holds a fact in its first
``retransmit_mult * ceil(log10(N + 1))`` sends (the eager burst, about half a
second), fewest-sent first.  Then the fact rides only on pings and acks, which
go out anyway, for ``piggyback_mult * ceil(log10(N + 1))`` more sends (some
seconds): a host that lost every copy of the burst meets it again long before
the next repair.  A burst of news costs O(log N) messages per host and a
quiet mesh costs only its probes.

*Repair*.  Infection can miss a host (loss, a partition, a late join).  Every
``sync_interval``, stretched with N as memberlist does, a host exchanges one
entry per host with one random member (``Sync``, ``SyncReply``, ``Give``);
liveness in an entry is merged as a fact, except that a remote ``Dead`` only
makes this host suspect (it runs its own timer: repair never spreads a down
it has not seen), and missing key ranges are sent both ways.

Dead hosts are forgotten after ``forget_after``; a tombstone keeps their last
incarnation and version for ``tombstone_ttl`` so stale copies do not bring
them back.  A removed (revoked) host is refused for good: its messages raise
``Revoked`` and facts about it are dropped.

What can fail: a peer can lie only about others in ways the merge rules
bound (a fact about *this* host that claims a newer incarnation or version
is refuted by re-stamping); values are checked; the core raises no error on
loss, duplication or reordering, since every fact is idempotent and ordered
by its incarnation or version.

Memory: members are immutable records in a read-only *baseline* mapping,
which the simulator shares among all cores of a converged mesh, plus this
core's own overrides; a core of a mesh that agrees costs O(1) beyond it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from random import Random
from typing import Any, NamedTuple

from vmmesh.api.gossip import COUNTER_BITS, KEY_RE, Delta
from vmmesh.api.names import check_hex_id
from vmmesh.errors import MalformedMessage, NotFound, Revoked, UsageError
from vmmesh.gossip.core import HB, EventKind, GossipEvent
from vmmesh.gossip.detector import Status
from vmmesh.gossip.swim_wire import (
    ALIVE,
    DEAD,
    GONE,
    SUSPECT,
    Ack,
    Alive,
    Dead,
    Entry,
    Fact,
    Give,
    Gossip,
    Message,
    Nack,
    News,
    Ping,
    PingReq,
    Suspect,
    Sync,
    SyncReply,
    Want,
)

Outgoing = list[tuple[str, Message]]
ValueCheck = Callable[[str, object, int], None]
_STATUS: tuple[Status, ...] = ("up", "suspect", "down", "down")
_INF = math.inf
_COUNTER_MASK = (1 << COUNTER_BITS) - 1


@dataclass(frozen=True)
class SwimConfig:
    """Tuning of the SWIM core (times in seconds)."""

    probe_interval: float = 0.5
    probe_timeout: float = 0.2  # direct ack; then indirect probes until the interval ends
    indirect_probes: int = 6  # 3 in memberlist; at 10 % loss 6 cuts false suspicions ~20x
    gossip_interval: float = 0.15  # one gossip per slot of this grid, at once, if news
    gossip_fanout: int = 3
    retransmit_mult: int = 4
    piggyback_mult: int = 8  # then this many times log10(N) more sends on pings and acks only
    max_facts: int = 16  # per message
    max_deltas: int = 256  # per Give or SyncReply
    suspicion_mult: float = 4.0  # min timeout: mult * log10(N) * gossip_interval
    suspicion_floor: float = 1.0
    suspicion_max_mult: float = 4.0  # the timeout starts at this times the minimum
    confirmations: int = 3  # independent suspicions that bring it down to the minimum
    max_health: int = 8  # Lifeguard's local health multiplier is 1 + score
    sync_interval: float = 30.0  # repair; stretched by log2(N / 32) + 1 above 32 hosts
    forget_after: float = 60.0
    tombstone_ttl: float = 600.0
    want_retry: float = 1.0  # do not ask for the same author's gap more often
    suspicion_asks: int = 3  # direct pings to a suspect whose timeout ran out, before Dead
    # every this often, stretched like sync_interval, a host down or forgotten here (its
    # tombstone kept) is sent a Sync, with the chance down / live others (Serf's
    # reconnect, every 30 s there): nobody probes a dead host, so without it the two
    # sides of a healed partition would stay dead to each other
    reconnect_interval: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.probe_timeout < self.probe_interval:
            raise ValueError("need 0 < probe_timeout < probe_interval")
        if self.gossip_interval <= 0 or self.gossip_fanout < 1 or self.retransmit_mult < 1:
            raise ValueError("gossip interval, fanout and retransmits must be positive")
        if self.piggyback_mult < 0 or self.suspicion_asks < 0:
            raise ValueError("piggyback sends and suspicion asks cannot be negative")
        if self.forget_after < 0 or self.tombstone_ttl < self.forget_after:
            raise ValueError("need 0 <= forget_after <= tombstone_ttl")


#: Named tunings, as Serf's ``profile`` and memberlist's Default*Config: ``lan`` (the
#: default: a home network, a probe every half second, a death known in a few
#: seconds) and ``wan`` (hosts behind a VPN or across homes: memberlist's WAN timing,
#: a probe every 5 s with 3 s for its ack, slower news and repair; fewer false
#: suspicions over a slow or lossy path, a death known in tens of seconds).
PROFILES: Mapping[str, SwimConfig] = {
    "lan": SwimConfig(),
    "wan": SwimConfig(
        probe_interval=5.0,
        probe_timeout=3.0,
        gossip_interval=0.5,
        gossip_fanout=4,
        suspicion_mult=6.0,
        suspicion_floor=6.0,
        sync_interval=60.0,
        reconnect_interval=30.0,
        forget_after=300.0,
        tombstone_ttl=1800.0,
        want_retry=3.0,
    ),
}


class Record(NamedTuple):
    """What a core holds of one host; immutable so that cores can share it."""

    incarnation: int
    state: int  # ALIVE, SUSPECT, DEAD, GONE
    version: int  # highest key version held (prefix closed)
    keys: Mapping[str, tuple[int, Any]]  # never mutated: replaced
    since: float  # when ``state`` was entered


class Baseline(NamedTuple):
    """A converged view shared by many cores: members, probe ring, live count."""

    members: Mapping[str, Record]
    ring: Sequence[str]
    alive: int


@dataclass
class _Probe:
    seq: int
    target: str
    indirect_at: float
    ends_at: float
    nacks_expected: int = 0
    nacks: int = 0
    acked: bool = False


@dataclass
class _Suspicion:
    started: float
    confirmers: set[str]
    deadline: float
    asks: int = 0  # direct pings sent since the timeout ran out


class _Item:
    __slots__ = ("fact", "key", "sent")

    def __init__(self, fact: Fact, key: tuple[str, int]) -> None:
        self.fact = fact
        self.key = key
        self.sent = 0


def _fact_key(fact: Fact) -> tuple[str, int]:
    """Facts with one key supersede each other in the queue: one liveness
    claim per host, one news per (author, after)."""
    if isinstance(fact, News):
        return fact.author, fact.after + 1
    return fact.node, -1


class SwimCore:
    """The membership and state of one host; every method is synchronous."""

    def __init__(
        self,
        node_id: str,
        generation: int,
        *,
        now: float,
        rng: Random,
        config: SwimConfig | None = None,
        check: ValueCheck | None = None,
        baseline: Baseline | None = None,
    ) -> None:
        self.node_id = check_hex_id(node_id, "node id")
        self.config = cfg = config or SwimConfig()
        self._rng = rng
        self._check = check
        self._base: Mapping[str, Record] = baseline.members if baseline else {}
        self._own: dict[str, Record | None] = {}
        self._ring: Sequence[str] = baseline.ring if baseline else []
        self._ring_owned = baseline is None
        # a shared ring is walked from a random start, so cores probe in different orders
        self._start = rng.randrange(len(self._ring)) if self._ring else 0
        self._pos = 0  # members probed in this walk of the ring
        self._alive = baseline.alive if baseline else 1  # members not down, ourselves included
        self._removed: set[str] = set()
        self._unringed: set[str] = set()  # dropped hosts whose ring entry remains
        self._inc = generation << COUNTER_BITS | 1
        self._version = generation << COUNTER_BITS
        mine = self._base.get(node_id)
        if mine is not None:  # the baseline knows us: start where it stands
            self._inc, self._version = mine.incarnation, mine.version
        keys = mine.keys if mine is not None else {}
        self._own[node_id] = Record(self._inc, ALIVE, self._version, keys, now)
        if mine is None and self._ring_owned:
            self._ring = [node_id]
        self._queue: list[_Item] = []
        self._queued: dict[tuple[str, int], _Item] = {}
        self._events: list[GossipEvent] = []
        self._seq = 0
        self._probe: _Probe | None = None
        self._health = 0
        self._suspicions: dict[str, _Suspicion] = {}
        self._relays: dict[int, tuple[str, int, float]] = {}  # our seq -> origin, its seq, nack at
        self._down: dict[str, float] = {}  # dead or gone host -> when to forget or drop
        self._wants: dict[str, float] = {}  # author -> when we last asked for its gap
        self._next_probe = now + rng.random() * cfg.probe_interval
        self._gossip_phase = now + rng.random() * cfg.gossip_interval
        self._next_sync = now + rng.random() * self._sync_interval()
        self._joining = False
        self._next_reconnect = now + cfg.reconnect_interval  # (no draw: seeded runs keep)
        self._reconnect_soon: list[str] = []  # down hosts seen again (``join``): sync first
        self._out: Outgoing = []
        if mine is None:  # a new life: say so, so that it beats what was said of the last one
            self._enqueue(Alive(node_id, self._inc))

    # --- the member table ----------------------------------------------------

    def _get(self, nid: str) -> Record | None:
        own = self._own
        if nid in own:
            return own[nid]
        return self._base.get(nid)

    def _set(self, nid: str, rec: Record) -> None:
        old = self._get(nid)
        was_up = old is not None and old.state < DEAD
        if rec.state < DEAD and not was_up:
            self._alive += 1
        elif rec.state >= DEAD and was_up:
            self._alive -= 1
        if old is None and nid not in self._unringed:
            self._ring_add(nid)
        self._unringed.discard(nid)
        self._own[nid] = rec

    def _drop(self, nid: str) -> None:
        old = self._get(nid)
        if old is not None:
            if old.state < DEAD:
                self._alive -= 1
            self._own[nid] = None
            self._unringed.add(nid)  # still in the ring, skipped there: not added twice
        self._suspicions.pop(nid, None)
        self._down.pop(nid, None)

    def _ring_add(self, nid: str) -> None:
        if not self._ring_owned:
            self._ring = list(self._ring)
            self._ring_owned = True
        ring = self._ring
        assert isinstance(ring, list)
        ring.insert(self._rng.randrange(len(ring) + 1), nid)

    def _ids(self) -> Iterator[str]:
        own = self._own
        yield from (n for n, r in own.items() if r is not None)
        yield from (n for n in self._base if n not in own)

    @property
    def alive_count(self) -> int:
        """Members not down, ourselves included: the N of the log N bounds."""
        return self._alive

    def _transmits(self) -> tuple[int, int]:
        """Sends of a fact in all, and how many of them in eager ``Gossip``."""
        cfg = self.config
        scale = math.ceil(math.log10(self._alive + 1))
        return (cfg.retransmit_mult + cfg.piggyback_mult) * scale, cfg.retransmit_mult * scale

    def _sync_interval(self) -> float:
        n = self._alive
        scale = 1.0 if n <= 32 else math.ceil(math.log2(n) - 5) + 1.0
        return self.config.sync_interval * scale

    def _suspicion_bounds(self) -> tuple[float, float, int]:
        cfg = self.config
        n = max(self._alive, 10)
        low = max(cfg.suspicion_floor, cfg.suspicion_mult * math.log10(n) * cfg.gossip_interval)
        k = cfg.confirmations if self._alive - 2 >= cfg.confirmations else 0
        return low, low * cfg.suspicion_max_mult, k

    # --- our own state ---------------------------------------------------------

    def set_local(self, key: str, value: Any) -> None:
        """Publish ``value`` under ``key`` (msgpack-able plain data)."""
        if key == HB or not KEY_RE.match(key):
            raise UsageError(f"bad gossip key: {key!r}")
        me = self._own[self.node_id]
        assert me is not None
        old = me.keys.get(key)
        if old is not None and old[1] == value:
            return
        # the first write of a life covers everything from nothing: no gap for anyone
        after = self._version if self._version & _COUNTER_MASK else 0
        self._version += 1
        keys = {**me.keys, key: (self._version, value)}
        self._own[self.node_id] = me._replace(version=self._version, keys=keys)
        self._enqueue(News(self.node_id, after, (Delta(self.node_id, key, self._version, value),)))

    @property
    def local_version(self) -> int:
        return self._version

    @property
    def incarnation(self) -> int:
        return self._inc

    def _refute(self, claimed: int) -> None:
        """Someone says we are suspect or dead at ``claimed``: rise above it."""
        self._inc = max(self._inc, claimed) + 1
        self._health = min(self._health + 1, self.config.max_health)
        me = self._own[self.node_id]
        assert me is not None
        self._own[self.node_id] = me._replace(incarnation=self._inc)
        self._enqueue(Alive(self.node_id, self._inc))

    def _reassert(self, seen: int) -> None:
        """Someone holds a newer version of our keys than we do (an older life
        with a later clock, or a forgery): re-stamp them all above it."""
        me = self._own[self.node_id]
        assert me is not None
        after = self._version = max(self._version, seen)
        deltas = []
        for k, (_, val) in sorted(me.keys.items()):
            self._version += 1
            deltas.append(Delta(self.node_id, k, self._version, val))
        keys = {d.key: (d.version, d.value) for d in deltas}
        self._own[self.node_id] = me._replace(version=self._version, keys=keys)
        self._enqueue(News(self.node_id, after, tuple(deltas)))

    # --- membership changes from outside -------------------------------------

    def join(self, node_id: str, now: float) -> None:
        """A host given as a seed or seen by discovery: probe it and sync with
        it even before any of its state has arrived."""
        check_hex_id(node_id, "node id")
        if node_id == self.node_id or node_id in self._removed:
            return
        held = self._get(node_id)
        if held is not None:
            if held.state >= DEAD and node_id not in self._reconnect_soon:
                # down or forgotten here, and found again: ask it at once
                self._reconnect_soon.append(node_id)
                self._next_reconnect = min(self._next_reconnect, now)
            return
        self._set(node_id, Record(0, ALIVE, 0, {}, now))
        self._next_sync = min(self._next_sync, now)
        self._joining = True  # sync every probe interval until a SyncReply arrives

    def remove(self, node_id: str) -> None:
        """A revoked host: drop it and refuse anything from it or about it."""
        if node_id == self.node_id:
            raise UsageError("a node cannot remove itself")
        self._drop(node_id)
        self._removed.add(node_id)
        for item in [i for i in self._queue if _fact_key(i.fact)[0] == node_id]:
            self._unqueue(item)

    # --- the queue of facts to spread ----------------------------------------

    def _enqueue(self, fact: Fact) -> None:
        key = _fact_key(fact)
        old = self._queued.get(key)
        if old is not None:
            self._queue.remove(old)
        item = _Item(fact, key)
        self._queued[key] = item
        self._queue.insert(0, item)

    def _unqueue(self, item: _Item) -> None:
        self._queue.remove(item)
        del self._queued[item.key]

    def _take(self, *, piggyback: bool = True) -> tuple[Fact, ...]:
        """Up to ``max_facts`` facts, least sent first; each counts one send.

        A ``Gossip`` message (``piggyback`` False) takes only facts still in
        their eager sends; pings and acks, which go out anyway, also carry
        facts in their later piggyback sends, so that a host whose copies of
        the eager burst were all lost still meets the fact over the next
        seconds, at the cost of bytes in messages already sent.
        """
        queue = self._queue
        if not queue:
            return ()
        queue.sort(key=lambda i: i.sent)
        limit, eager = self._transmits()
        chosen = queue[: self.config.max_facts]
        if not piggyback:
            chosen = [i for i in chosen if i.sent < eager]
        for item in chosen:
            item.sent += 1
            if item.sent >= limit:
                self._unqueue(item)
        return tuple(i.fact for i in chosen)

    def _has_eager(self) -> bool:
        eager = self._transmits()[1]
        return any(i.sent < eager for i in self._queue)

    @property
    def pending_facts(self) -> int:
        return len(self._queue)

    # --- applying facts -----------------------------------------------------------

    def _apply(self, fact: Fact, via: str, now: float) -> None:
        if isinstance(fact, News):
            if self._apply_news(fact, via, now):
                self._enqueue(fact)
        elif isinstance(fact, Alive):
            self._on_alive(fact, now)
        elif isinstance(fact, Suspect):
            self._on_suspect(fact.node, fact.incarnation, fact.by, now, fact)
        else:
            self._on_dead(fact, now)

    def _on_alive(self, fact: Alive, now: float) -> None:
        nid, inc = fact.node, fact.incarnation
        if nid == self.node_id:
            if inc > self._inc:
                self._refute(inc)  # a forged or older life's claim: out-number it
            return
        if nid in self._removed:
            return
        rec = self._get(nid)
        if rec is None:
            self._set(nid, Record(inc, ALIVE, 0, {}, now))
            self._events.append(GossipEvent(EventKind.JOINED, nid))
        elif inc > rec.incarnation:
            was = rec.state
            if was == GONE:  # a new life of a forgotten host: its old keys are void
                rec = Record(inc, ALIVE, rec.version, {}, now)
            self._set(nid, rec._replace(incarnation=inc, state=ALIVE, since=now))
            self._suspicions.pop(nid, None)
            self._down.pop(nid, None)
            if was != ALIVE:
                self._events.append(GossipEvent(EventKind.UP, nid))
        else:
            return
        self._enqueue(fact)

    def _on_suspect(self, nid: str, inc: int, by: str, now: float, fact: Fact | None) -> None:
        if nid == self.node_id:
            if inc >= self._inc:
                self._refute(inc)
            return
        rec = self._get(nid)
        if rec is None or nid in self._removed or inc < rec.incarnation or rec.state >= DEAD:
            return
        susp = self._suspicions.get(nid)
        if rec.state == SUSPECT and inc == rec.incarnation and susp is not None:
            if by in susp.confirmers:
                return
            susp.confirmers.add(by)
            susp.deadline = susp.started + self._suspicion_timeout(len(susp.confirmers) - 1)
        else:
            self._set(nid, rec._replace(incarnation=inc, state=SUSPECT, since=now))
            self._suspicions[nid] = _Suspicion(now, {by}, now + self._suspicion_timeout(0))
            self._events.append(GossipEvent(EventKind.SUSPECT, nid))
        self._enqueue(fact or Suspect(nid, inc, by))

    def _suspicion_timeout(self, confirmations: int) -> float:
        low, high, k = self._suspicion_bounds()
        if k < 1:
            return low
        frac = math.log(min(confirmations, k) + 1) / math.log(k + 1)
        return max(low, high - (high - low) * frac)

    def _on_dead(self, fact: Dead, now: float) -> None:
        nid, inc = fact.node, fact.incarnation
        if nid == self.node_id:
            if inc >= self._inc:
                self._refute(inc)
            return
        rec = self._get(nid)
        if rec is None or nid in self._removed or inc < rec.incarnation or rec.state >= DEAD:
            return
        self._mark_dead(nid, rec, inc, now)
        self._enqueue(fact)

    def _mark_dead(self, nid: str, rec: Record, inc: int, now: float) -> None:
        self._set(nid, rec._replace(incarnation=inc, state=DEAD, since=now))
        self._suspicions.pop(nid, None)
        self._down[nid] = now + self.config.forget_after
        self._events.append(GossipEvent(EventKind.DOWN, nid))

    def _apply_news(self, news: News, via: str, now: float) -> bool:
        """Apply a range of an author's writes; True if it is news to relay."""
        author = news.author
        last = news.last
        if author == self.node_id:
            if last > self._version:
                self._reassert(last)
            return False
        if author in self._removed:
            return False
        rec = self._get(author)
        if rec is None or (rec.state == GONE and last > rec.version):
            if rec is None:
                self._events.append(GossipEvent(EventKind.JOINED, author))
            rec = Record(rec.incarnation if rec else 0, ALIVE, 0, {}, now)
            self._set(author, rec)
            self._down.pop(author, None)
        held = rec.version
        if last <= held or rec.state == GONE:
            return False
        if news.after > held:  # a gap: ask the relay, who holds at least this range
            if now - self._wants.get(author, -_INF) >= self.config.want_retry:
                self._wants[author] = now
                self._out.append((via, Want(self.node_id, ((author, held),))))
            return True
        keys = dict(rec.keys)
        changed: set[str] = set()
        check = self._check
        refused = False
        for d in news.deltas:
            ver = d.version
            if ver <= held:
                continue
            if held and ver >> COUNTER_BITS > held >> COUNTER_BITS:
                changed.update(keys)  # a new life of that host: its old keys are void
                keys = {}
            held = ver
            changed.add(d.key)
            if check is not None:
                try:
                    check(d.key, d.value, len(keys) - (d.key in keys))
                except MalformedMessage as exc:
                    refused = True
                    keys.pop(d.key, None)
                    self._events.append(
                        GossipEvent(EventKind.REFUSED, author, frozenset({d.key}), str(exc), via)
                    )
                    continue
            keys[d.key] = (ver, d.value)
        self._own[author] = rec._replace(version=held, keys=keys)
        self._events.append(GossipEvent(EventKind.CHANGED, author, frozenset(changed)))
        return not refused  # news with a refused value is not relayed: others hear it elsewhere

    # --- time -----------------------------------------------------------------

    def next_deadline(self) -> float:
        """When ``tick`` has work next (it may be called earlier, harmlessly)."""
        t = min(self._next_probe, self._next_sync, self._next_reconnect)
        probe = self._probe
        if probe is not None and not probe.acked:
            t = min(t, probe.indirect_at, probe.ends_at)
        if self._queue and self._has_eager():
            t = min(t, self._gossip_phase)
        for s in self._suspicions.values():
            t = min(t, s.deadline)
        for _, _, at in self._relays.values():
            t = min(t, at)
        for at in self._down.values():
            t = min(t, at)
        return t

    def tick(self, now: float) -> Outgoing:
        """Run every timer that is due; return the messages to send."""
        probe = self._probe
        if probe is not None and not probe.acked:
            if probe.indirect_at <= now:
                probe.indirect_at = _INF
                self._indirect(probe)
            if probe.ends_at <= now:
                self._probe_failed(probe, now)
        if self._next_probe <= now:
            self._start_probe(now)
        if self._gossip_phase <= now:
            gi = self.config.gossip_interval
            self._gossip_phase += gi * (1 + (now - self._gossip_phase) // gi)
            if self._queue and self._has_eager():
                self._gossip()
        if self._next_sync <= now:
            self._next_sync = now + (
                self.config.probe_interval if self._joining else self._sync_interval()
            )
            self._start_sync()
        if self._next_reconnect <= now:
            self._next_reconnect = now + self.config.reconnect_interval * (
                self._sync_interval() / self.config.sync_interval
            )
            self._reconnect()
        self._timers(now)
        out, self._out = self._out, []
        return out

    def _timers(self, now: float) -> None:
        for nid, susp in [(n, s) for n, s in self._suspicions.items() if s.deadline <= now]:
            rec = self._get(nid)
            assert rec is not None
            if susp.asks < self.config.suspicion_asks:
                # its refutation may have missed only us: ask it, the suspicion attached
                susp.asks += 1
                susp.deadline = now + self.config.probe_timeout
                self._seq += 1
                self._out.append((nid, Ping(self.node_id, self._seq, self._facts_for(nid))))
                continue
            self._mark_dead(nid, rec, rec.incarnation, now)
            self._enqueue(Dead(nid, rec.incarnation, self.node_id))
        for seq in [s for s, (_, _, at) in self._relays.items() if at <= now]:
            origin, their_seq, _ = self._relays.pop(seq)
            self._out.append((origin, Nack(self.node_id, their_seq)))
        for nid in [n for n, at in self._down.items() if at <= now]:
            rec = self._get(nid)
            assert rec is not None
            if rec.state == DEAD:
                self._own[nid] = rec._replace(state=GONE, keys={}, since=now)
                self._down[nid] = now + self.config.tombstone_ttl - self.config.forget_after
                self._events.append(GossipEvent(EventKind.FORGOTTEN, nid))
            else:
                self._drop(nid)

    # --- probing --------------------------------------------------------------

    def _next_target(self) -> str | None:
        ring = self._ring
        for _ in range(len(ring)):
            if self._pos >= len(ring):  # a walk is done: the next goes in a new order
                ring = list(ring)
                self._rng.shuffle(ring)
                self._ring, self._ring_owned, self._pos, self._start = ring, True, 0, 0
            nid = ring[(self._start + self._pos) % len(ring)]
            self._pos += 1
            rec = self._get(nid)
            if nid != self.node_id and rec is not None and rec.state < DEAD:
                return nid
        return None

    def _start_probe(self, now: float) -> None:
        cfg = self.config
        stretch = 1 + self._health
        self._next_probe = now + cfg.probe_interval * stretch
        target = self._next_target()
        if target is None:
            return
        self._seq += 1
        self._probe = _Probe(self._seq, target, now + cfg.probe_timeout * stretch, self._next_probe)
        self._out.append((target, Ping(self.node_id, self._seq, self._facts_for(target))))

    def _facts_for(self, target: str) -> tuple[Fact, ...]:
        """Facts for a ping to ``target``; if we suspect it, our suspicion first
        (Lifeguard's buddy system: the suspect learns it from its prober and
        refutes at once, and its ack carries the refutation back)."""
        facts = self._take()
        rec = self._get(target)
        if rec is not None and rec.state == SUSPECT:
            facts = (Suspect(target, rec.incarnation, self.node_id), *facts)
        return facts

    def _indirect(self, probe: _Probe) -> None:
        """No direct ack in time: ping again and ask others to try."""
        out = self._out
        out.append((probe.target, Ping(self.node_id, probe.seq, self._facts_for(probe.target))))
        helpers = self._random_members(self.config.indirect_probes, exclude=probe.target)
        probe.nacks_expected = len(helpers)
        for h in helpers:
            out.append((h, PingReq(self.node_id, probe.seq, probe.target, self._take())))

    def _probe_failed(self, probe: _Probe, now: float) -> None:
        self._probe = None
        score = self._health + 1 + (probe.nacks < probe.nacks_expected)
        self._health = min(score, self.config.max_health)
        rec = self._get(probe.target)
        if rec is not None and rec.state < DEAD:
            self._on_suspect(probe.target, rec.incarnation, self.node_id, now, None)

    def _random_members(self, k: int, exclude: str) -> list[str]:
        """Up to ``k`` distinct random members that are not down."""
        ring = self._ring
        chosen: list[str] = []
        if not ring:
            return chosen
        for _ in range(4 * k + 4):
            nid = ring[self._rng.randrange(len(ring))]
            if nid in chosen or nid in (exclude, self.node_id):
                continue
            rec = self._get(nid)
            if rec is not None and rec.state < DEAD:
                chosen.append(nid)
                if len(chosen) == k:
                    break
        return chosen

    def _gossip(self) -> None:
        for target in self._random_members(self.config.gossip_fanout, exclude=self.node_id):
            facts = self._take(piggyback=False)
            if not facts:
                break
            self._out.append((target, Gossip(self.node_id, facts)))

    # --- repair ---------------------------------------------------------------

    def _entries(self) -> tuple[Entry, ...]:
        get = self._get
        out = []
        for nid in self._ids():
            r = get(nid)
            assert r is not None
            out.append(Entry(nid, r.incarnation, r.state, r.version))
        return tuple(out)

    def _start_sync(self) -> None:
        peers = self._random_members(1, exclude=self.node_id)
        if peers:
            self._out.append((peers[0], Sync(self.node_id, self._entries())))

    def _reconnect(self) -> None:
        """Sync with one host that is down or forgotten here: one seen again first, else
        (by chance, see ``reconnect_interval``) one at random.  If it is alive, it
        learns that we think it dead and refutes, and its reply brings it back here
        (and our refutation of what it thought of us brings us back there)."""
        target = None
        while self._reconnect_soon and target is None:
            nid = self._reconnect_soon.pop(0)
            rec = self._get(nid)
            if rec is not None and rec.state >= DEAD and nid not in self._removed:
                target = nid
        if target is None:
            down = [n for n in self._down if n not in self._removed]
            others = max(1, self._alive - 1)
            if not down or self._rng.random() >= len(down) / others:
                return  # the mesh as a whole sends about one such Sync per interval
            target = down[self._rng.randrange(len(down))]
        self._out.append((target, Sync(self.node_id, self._entries())))

    def _merge(self, entries: tuple[Entry, ...], via: str, now: float) -> set[str]:
        """Merge a peer's entries; return the hosts it holds that it lacks nothing of."""
        seen = set()
        for e in entries:
            nid = e.node
            seen.add(nid)
            if nid == self.node_id:
                if e.incarnation > self._inc or (e.state != ALIVE and e.incarnation >= self._inc):
                    self._refute(e.incarnation)
                if e.version > self._version:
                    self._reassert(e.version)
                continue
            if nid in self._removed:
                continue
            rec = self._get(nid)
            if e.state == ALIVE or (rec is None and e.state == SUSPECT):
                if rec is None or e.incarnation > rec.incarnation:
                    self._on_alive(Alive(nid, e.incarnation), now)
            elif e.state in (SUSPECT, DEAD):
                self._on_suspect(nid, e.incarnation, via, now, None)
        return seen

    def _news_for(self, theirs: Mapping[str, int], missing: bool) -> tuple[News, ...]:
        """Ranges the peer lacks: above ``theirs``, and (if ``missing``) of
        every host it did not list, in most-stale-first order within budget."""
        gaps: list[tuple[int, str, int]] = []
        for nid in self._ids() if missing else list(theirs):
            r = self._get(nid)
            if r is None or r.state == GONE or not r.version:
                continue
            have = theirs.get(nid)
            if have is None and not missing:
                continue
            have = have or 0
            if r.version > have:
                gaps.append((r.version - have, nid, have))
        gaps.sort(reverse=True)
        budget = self.config.max_deltas
        out = []
        for _, nid, have in gaps:
            r = self._get(nid)
            assert r is not None
            ds = sorted(
                (Delta(nid, k, v, val) for k, (v, val) in r.keys.items() if v > have),
                key=lambda d: d.version,
            )[:budget]
            if ds:
                out.append(News(nid, have, tuple(ds)))
                budget -= len(ds)
            if budget <= 0:
                break
        return tuple(out)

    # --- receiving --------------------------------------------------------------

    def receive(self, msg: Message, now: float) -> Outgoing:
        """Handle one message from a peer; return the messages to send."""
        sender = msg.sender
        if sender in self._removed:
            raise Revoked(f"host {sender} has been removed from the mesh")
        if sender == self.node_id:
            raise MalformedMessage("a message claims to come from this host")
        me = self.node_id
        out = self._out
        if isinstance(msg, Ping):
            self._apply_all(msg.facts, sender, now)
            facts = self._take()
            if any(isinstance(f, Suspect | Dead) and f.node == me for f in msg.facts):
                alive = Alive(me, self._inc)  # the prober doubts us: our ack says why not
                if alive not in facts:
                    facts = (alive, *facts)
            out.append((sender, Ack(me, msg.seq, facts)))
        elif isinstance(msg, Ack):
            self._apply_all(msg.facts, sender, now)
            self._on_ack(msg.seq)
        elif isinstance(msg, PingReq):
            self._apply_all(msg.facts, sender, now)
            self._seq += 1
            nack_at = now + self.config.probe_timeout * 0.8
            self._relays[self._seq] = (sender, msg.seq, nack_at)
            out.append((msg.target, Ping(me, self._seq, self._take())))
        elif isinstance(msg, Nack):
            if self._probe is not None and self._probe.seq == msg.seq:
                self._probe.nacks += 1
        elif isinstance(msg, Gossip):
            self._apply_all(msg.facts, sender, now)
        elif isinstance(msg, Sync):
            self._on_sync(msg, now)
        elif isinstance(msg, SyncReply):
            self._joining = False
            self._merge(msg.entries, sender, now)
            self._apply_all(msg.news, sender, now)
            theirs = {e.node: e.version for e in msg.entries}
            news = self._news_for(theirs, missing=True)
            if news:
                out.append((sender, Give(me, news)))
        elif isinstance(msg, Want):
            news = self._news_for(dict(msg.want), missing=False)
            if news:
                out.append((sender, Give(me, news)))
        else:
            self._apply_all(msg.news, sender, now)
        out, self._out = self._out, []
        return out

    def _apply_all(self, facts: tuple[Fact, ...], via: str, now: float) -> None:
        for f in facts:
            self._apply(f, via, now)

    def _on_ack(self, seq: int) -> None:
        probe = self._probe
        if probe is not None and probe.seq == seq:
            if not probe.acked:
                probe.acked = True
                self._health = max(self._health - 1, 0)
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            self._out.append((relay[0], Ack(self.node_id, relay[1], self._take())))

    def _on_sync(self, msg: Sync, now: float) -> None:
        self._merge(msg.entries, msg.sender, now)
        theirs = {e.node: e.version for e in msg.entries}
        news = self._news_for(theirs, missing=True)
        self._out.append((msg.sender, SyncReply(self.node_id, self._entries(), news)))

    # --- views -----------------------------------------------------------------

    def drain_events(self) -> list[GossipEvent]:
        events, self._events = self._events, []
        return events

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    def version_of(self, node_id: str) -> int | None:
        """Highest key version held of a host (packed), None if unknown."""
        rec = self._get(node_id)
        return None if rec is None or rec.state == GONE else rec.version

    def incarnation_of(self, node_id: str) -> int | None:
        rec = self._get(node_id)
        return None if rec is None else rec.incarnation

    def state_of(self, node_id: str) -> dict[str, Any]:
        rec = self._get(node_id)
        if rec is None or rec.state == GONE:
            raise NotFound(f"no gossip state for host {node_id}")
        return {k: val for k, (_, val) in rec.keys.items()}

    def since(self, node_id: str) -> float | None:
        """When this core's record of a host entered its state (None if unknown)."""
        rec = self._get(node_id)
        return None if rec is None else rec.since

    def status(self, node_id: str) -> Status:
        rec = self._get(node_id)
        if rec is None:
            raise NotFound(f"no gossip state for host {node_id}")
        return _STATUS[rec.state]

    def members(self) -> list[str]:
        """Every host held and not forgotten, ourselves included, sorted."""
        return sorted(n for n in self._ids() if (r := self._get(n)) and r.state != GONE)
