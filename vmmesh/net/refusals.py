"""Log a repeated fault once per period, and count refusals by cause.

A broken or hostile peer must not flood the log, and an operator must still
learn of every distinct thing it does.  So a fault is keyed by (who, cause,
kind): the first of a key in a period (10 minutes) is logged at WARNING,
repeats at DEBUG; a new kind of fault from the same peer is logged at once.
The set of keys is bounded, so a peer cycling addresses cannot grow it.

``Refusals`` adds what ``vmmesh status`` shows: how many connections,
frames, messages and gossip values were refused, by cause.
"""

from __future__ import annotations

import enum
import logging
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

PERIOD = 600.0
MAX_KEYS = 4096


class Cause(enum.StrEnum):
    """What was refused (the counters of ``vmmesh status``)."""

    TLS = "tls"  # a handshake: unknown CA, expired, revoked, not TLS at all
    FRAMING = "framing"  # a frame over the limit or not msgpack: the connection closes
    MESSAGE = "message"  # an envelope or body of the wrong shape, an unknown kind
    GOSSIP = "gossip"  # a gossip value that failed its key's schema
    DISCOVERY = "discovery"  # an mDNS record that is not one of ours


class LogOnce:
    """Log ``key``'s message at WARNING once per ``period``, else at DEBUG."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        period: float = PERIOD,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._logger = logger
        self._period = period
        self._clock = clock
        self._max_keys = max_keys
        self._last: OrderedDict[tuple[str, ...], float] = OrderedDict()

    def __call__(self, key: tuple[str, ...], msg: str, *args: object) -> bool:
        """Log; True when this one went out at WARNING."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._period:
            self._last.move_to_end(key)
            self._logger.debug(msg, *args)
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self._max_keys:
            self._last.popitem(last=False)
        self._logger.warning(msg, *args)
        return True


class Refusals:
    """The node's record of what it refused: counted always, logged once per period."""

    def __init__(
        self, logger: logging.Logger, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.counts: Counter[Cause] = Counter()
        self._log = LogOnce(logger, clock=clock)

    def __call__(self, cause: Cause, peer: str, reason: str, kind: str = "") -> None:
        """Count one refusal of ``peer``; log it unless the same (cause, kind) was logged lately.

        ``reason`` is the readable text, never empty; ``kind`` tells faults of
        one cause apart (default: the reason with its numbers and quoted
        values blanked, so "frame of 2147483648 bytes" and "frame of
        4294967295 bytes" are one kind and "bad call id" another).
        """
        self.counts[cause] += 1
        kind = kind or fault_kind(reason)
        self._log((peer, cause.value, kind), "refused %s from %s: %s", cause.value, peer, reason)

    def snapshot(self) -> dict[str, int]:
        return {c.value: self.counts.get(c, 0) for c in Cause}


def fault_kind(reason: str) -> str:
    """What kind of fault a reason describes: its text without the particular values."""
    return _VALUES.sub("#", reason)[:100]


_VALUES = re.compile(r"'[^']*'|\"[^\"]*\"|\b[0-9a-f]{8,}\b|\d+")


def describe(exc: BaseException) -> str:
    """A readable reason for ``exc``: its text, or its class when the text is empty."""
    text = str(exc).strip()
    return text if text else type(exc).__name__
