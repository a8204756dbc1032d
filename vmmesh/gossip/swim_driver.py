"""Thin trio glue: run one SwimCore over a datagram transport.

Theory of operation
-------------------
The core (``swim``) decides everything and keeps every timer; this module
only keeps time, moves bytes and reports.  ``run`` holds two tasks.  The
timer task sleeps until the core's ``next_deadline``, calls ``tick`` with
trio's clock and queues what it returns.  The sender task takes queued
datagrams one by one and hands them to the transport's ``send``, so a slow
send never holds up the timers; the queue is bounded, and a datagram that
does not fit is dropped and counted, as a full socket buffer would drop it
(loss is what SWIM is built for).  Received datagrams are pushed in by the
transport with ``deliver(peer_id, data)``: synchronous, never blocking, so
a UDP loop and an RPC handler can both call it.

``deliver`` is the one place where peer bytes enter SWIM, and they are
untrusted: msgpack with bounded lengths, then ``swim_wire.decode``, then
the claim check: the ``sender`` inside the message must equal ``peer_id``,
the identity the transport authenticated (the TLS certificate's node id on
the real mesh).  What fails is refused, never raised: bytes that are not a
message (``MALFORMED``), a sender that is not the peer (``FORGED``), a
removed host (``REVOKED``).  Each refusal is counted in ``stats`` and logged
at WARNING the first time for that (peer, cause), at DEBUG after, so a
hostile peer cannot flood the log.  A refused message changes nothing in
the core.  A send that fails (peer unreachable, socket error) is counted
apart and logged the same way; the core hears of it as loss.

Whatever changes the core from outside (a received message, ``set_local``,
``join``, ``remove``) can bring its next deadline forward (news to gossip,
a Want to answer), so each pulls the timer task's wake-up earlier.  The
core's events go to ``on_event`` at once, in order, after each call into
the core; the callback must not block or raise.  Bytes and messages each
way are counted as sent and received, bodies as msgpack (what the lab
measures on real sockets adds only framing).
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import trio

from vmmesh.errors import MalformedMessage, Revoked, VmmeshError
from vmmesh.gossip.core import GossipEvent
from vmmesh.gossip.swim import Outgoing, SwimCore
from vmmesh.gossip.swim_wire import decode
from vmmesh.wire.framing import unpack

log = logging.getLogger(__name__)

MAX_DATAGRAM = 4 << 20  # a Sync of 10,000 hosts is ~0.5 MB
OUTBOX = 1024  # datagrams waiting for the sender task
MAX_LOGGED = 4096  # (peer, cause) pairs remembered as logged
MIN_SLEEP = 0.001  # a core that asks to be woken in the past does not make us spin


class SwimTransport(Protocol):
    async def send(self, node_id: str, data: bytes) -> None:
        """Send one datagram to ``node_id``; it may be lost.  Raise a VmmeshError
        or OSError if it cannot be sent at all."""
        ...


class Refusal(enum.StrEnum):
    MALFORMED = "malformed"  # not msgpack, not a SWIM message, or over the size limit
    FORGED = "forged"  # the sender inside is not the peer the transport authenticated
    REVOKED = "revoked"  # the sender has been removed from the mesh


@dataclass
class DriverStats:
    """What one driver moved and refused since it started."""

    messages_in: int = 0
    messages_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: int = 0  # outgoing datagrams the full queue did not take
    send_failures: int = 0  # datagrams the transport could not send
    refused: Counter[Refusal] = field(default_factory=Counter)


def _unpack(data: bytes) -> object:
    if len(data) > MAX_DATAGRAM:
        raise MalformedMessage(f"datagram of {len(data)} bytes is over the limit")
    return unpack(data, len(data), "datagram")


class SwimDriver:
    """Runs ``core`` over ``transport`` with trio's clock; see the module docstring."""

    def __init__(
        self,
        core: SwimCore,
        transport: SwimTransport,
        *,
        on_event: Callable[[GossipEvent], None] | None = None,
        outbox: int = OUTBOX,
    ) -> None:
        self.core = core
        self.stats = DriverStats()
        self._transport = transport
        self._on_event = on_event
        self._send_q, self._recv_q = trio.open_memory_channel[tuple[str, bytes]](outbox)
        self._wake: trio.CancelScope | None = None  # the timer task's sleep
        self._running = False
        self._logged: set[tuple[str, str]] = set()

    # --- from outside ---------------------------------------------------------

    def set_local(self, key: str, value: Any) -> None:
        """Publish ``value`` under this host's ``key``."""
        self.core.set_local(key, value)
        self._after_core_call([])

    def join(self, node_id: str) -> None:
        """A seed or a host found by discovery: probe and sync with it."""
        self.core.join(node_id, trio.current_time())
        self._after_core_call([])

    def remove(self, node_id: str) -> None:
        """A revoked host: the core drops it and refuses it from now on."""
        self.core.remove(node_id)
        self._after_core_call([])

    def deliver(self, peer_id: str, data: bytes) -> None:
        """One datagram from ``peer_id`` (as the transport authenticated it)."""
        if not self._running:
            return
        self.stats.messages_in += 1
        self.stats.bytes_in += len(data)
        try:
            msg = decode(_unpack(data))
        except MalformedMessage as exc:
            self._refuse(peer_id, Refusal.MALFORMED, str(exc))
            return
        if msg.sender != peer_id:
            self._refuse(peer_id, Refusal.FORGED, f"message claims to come from {msg.sender}")
            return
        try:
            out = self.core.receive(msg, trio.current_time())
        except Revoked as exc:
            self._refuse(peer_id, Refusal.REVOKED, str(exc))
            return
        except MalformedMessage as exc:  # e.g. a message that claims to be from us
            self._refuse(peer_id, Refusal.MALFORMED, str(exc))
            return
        self._after_core_call(out)

    # --- the tasks ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``deliver`` is refused before and after."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender)
                self._running = True
                task_status.started()
                await self._timers()
        finally:
            self._running = False
            self._wake = None

    async def _timers(self) -> None:
        while True:
            deadline = max(self.core.next_deadline(), trio.current_time() + MIN_SLEEP)
            with trio.CancelScope(deadline=deadline) as self._wake:
                await trio.sleep_forever()
            self._wake = None
            self._after_core_call(self.core.tick(trio.current_time()))

    async def _sender(self) -> None:
        async for node_id, data in self._recv_q:
            try:
                await self._transport.send(node_id, data)
            except (VmmeshError, OSError) as exc:
                self.stats.send_failures += 1
                self._log_once(node_id, "cannot send to", str(exc) or type(exc).__name__)

    # --- helpers --------------------------------------------------------------

    def _after_core_call(self, out: Outgoing) -> None:
        stats = self.stats
        for node_id, msg in out:
            data = msgpack.packb(msg.to_wire(), use_bin_type=True)
            assert isinstance(data, bytes)
            try:
                self._send_q.send_nowait((node_id, data))
            except trio.WouldBlock:
                stats.dropped += 1
                continue
            stats.messages_out += 1
            stats.bytes_out += len(data)
        if self.core.has_events:
            events = self.core.drain_events()
            if self._on_event is not None:
                for ev in events:
                    self._on_event(ev)
        wake = self._wake
        if wake is not None:
            wake.deadline = min(wake.deadline, self.core.next_deadline())

    def _refuse(self, peer_id: str, cause: Refusal, reason: str) -> None:
        self.stats.refused[cause] += 1
        self._log_once(peer_id, f"{cause.value} message from", reason)

    def _log_once(self, peer_id: str, what: str, reason: str) -> None:
        """WARNING the first time for (peer, what), DEBUG after."""
        key = (peer_id, what)
        if key in self._logged:
            log.debug("gossip: %s %s: %s", what, peer_id, reason)
            return
        if len(self._logged) >= MAX_LOGGED:
            self._logged.clear()
        self._logged.add(key)
        log.warning("gossip: %s %s: %s", what, peer_id, reason)
