"""Figures: the numbers an extension publishes about this host, typed once.

An extension (transfers, migrations, jobs) says what it counts as ``Figure``
records (``NodeExtension.figures``); the node puts them in ``vmmesh status``'s
reply, and the web page and ``/metrics`` read them from that reply.  Nothing
is counted twice and no reader knows an extension's internals.  A figure's
``name`` is its Prometheus name without the ``vmmesh_`` prefix and, for a
counter, without ``_total``; its unit is in its name as Prometheus wants
(``_bytes``, ``_seconds``) and again in ``unit`` for the people who read
``vmmesh status``.  Several figures of one name differ in their ``labels``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from vmmesh.api.codec import Choice, Float, MapOf, Record, Text, wire

MAX_FIGURES = 256
FigureName = Text(64, r"[a-z][a-z0-9_]{0,63}", "figure name")
LabelName = Text(32, r"[a-z][a-z0-9_]{0,31}", "label name")


class Kind(enum.StrEnum):
    COUNTER = "counter"  # only goes up while the node runs (restarts at 0 with it)
    GAUGE = "gauge"  # goes up and down


class Unit(enum.StrEnum):
    NONE = ""
    BYTES = "bytes"
    SECONDS = "seconds"


@dataclass(frozen=True)
class Figure(Record):
    """One number about this host, e.g. ``transfer_received_bytes`` (a counter)."""

    name: str = wire(FigureName)
    kind: Kind = wire(Choice(Kind))
    help: str = wire(Text(300))
    value: float = wire(Float(0.0))
    unit: Unit = wire(Choice(Unit), default=Unit.NONE)
    labels: Mapping[str, str] = wire(MapOf(LabelName, Text(128), 8), default_factory=dict)


def counter(name: str, help: str, value: float, unit: Unit = Unit.NONE, **labels: str) -> Figure:
    return Figure(name, Kind.COUNTER, help, float(value), unit, labels)


def gauge(name: str, help: str, value: float, unit: Unit = Unit.NONE, **labels: str) -> Figure:
    return Figure(name, Kind.GAUGE, help, float(value), unit, labels)
