"""Field specs and the ``Record``/``Message`` bases: typed bodies, checked at the edge.

Theory of operation
-------------------
A body is a frozen dataclass whose fields are declared with ``wire(SPEC)``.
The spec says what the field may hold on the wire (type, bounds, length,
pattern) and how it looks there; ``to_wire`` and ``from_wire`` walk the
fields.  So the rules for a field are written once, next to the field, and
hold for both ends: the node that receives a body and the CLI or peer that
builds it.

``from_wire`` is where a peer's map becomes a typed value.  Anything that is
not what the spec allows raises ``MalformedMessage`` naming the field
(``ShareRequest.count: 0 is not in 1..1000``), which is the "peer misbehaved"
error; past this point code trusts its types.  ``checked()`` runs the same
check on a body built locally and raises ``UsageError`` instead, so the CLI
refuses bad user input with the same words before it sends anything.

A ``Message`` (a request, reply or streamed item) carries its version as
``v``; a ``Record`` (a part of a message, a gossip value) does not.  Keys a
reader does not know are ignored, so a newer peer may add fields with
defaults without a new version.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Mapping
from dataclasses import MISSING
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar

from vmmesh.errors import MalformedMessage, UnknownMessage, UsageError

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)


class WireType(Protocol):
    """Anything that converts itself to and from plain msgpack data."""

    def to_wire(self) -> Any: ...

    @classmethod
    def from_wire(cls, d: object) -> Self: ...


W = TypeVar("W", bound=WireType)


def _show(value: object) -> str:
    return f"{value!r:.60}"


class Spec(Generic[T]):
    """What one field may hold; ``load`` checks a wire value, ``dump`` makes one."""

    def load(self, value: object, where: str) -> T:
        raise NotImplementedError

    def dump(self, value: T) -> object:
        return value


class Int(Spec[int]):
    def __init__(self, lo: int = 0, hi: int = (1 << 63) - 1) -> None:
        self.lo, self.hi = lo, hi

    def load(self, value: object, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise MalformedMessage(f"{where}: {_show(value)} is not an integer")
        if not self.lo <= value <= self.hi:
            raise MalformedMessage(f"{where}: {value} is not in {self.lo}..{self.hi}")
        return value


class Float(Spec[float]):
    def __init__(self, lo: float = -math.inf, hi: float = math.inf) -> None:
        self.lo, self.hi = lo, hi

    def load(self, value: object, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MalformedMessage(f"{where}: {_show(value)} is not a number")
        number = float(value)
        if math.isnan(number) or not self.lo <= number <= self.hi:
            raise MalformedMessage(f"{where}: {number:g} is not in {self.lo:g}..{self.hi:g}")
        return number


class Bool(Spec[bool]):
    def load(self, value: object, where: str) -> bool:
        if not isinstance(value, bool):
            raise MalformedMessage(f"{where}: {_show(value)} is not true or false")
        return value


class Text(Spec[str]):
    """A string of at most ``max_len`` characters, matching ``pattern`` if given."""

    def __init__(self, max_len: int, pattern: str | None = None, what: str = "") -> None:
        self.max_len = max_len
        self.pattern = re.compile(pattern) if pattern else None
        self.what = what

    def load(self, value: object, where: str) -> str:
        if not isinstance(value, str):
            raise MalformedMessage(f"{where}: {_show(value)} is not a string")
        if len(value) > self.max_len:
            raise MalformedMessage(f"{where}: longer than {self.max_len} characters")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            what = f" {self.what}" if self.what else ""
            raise MalformedMessage(f"{where}: {_show(value)} is not a valid{what}")
        return value


class Bytes(Spec[bytes]):
    def __init__(self, max_len: int, min_len: int = 0) -> None:
        self.max_len, self.min_len = max_len, min_len

    def load(self, value: object, where: str) -> bytes:
        if not isinstance(value, bytes):
            raise MalformedMessage(f"{where}: {_show(value)} is not bytes")
        if len(value) > self.max_len:
            raise MalformedMessage(f"{where}: {len(value)} bytes is over {self.max_len}")
        if len(value) < self.min_len:
            raise MalformedMessage(f"{where}: {len(value)} bytes is under {self.min_len}")
        return value


class Choice(Spec[E]):
    """A member of a string-valued enum, by value."""

    def __init__(self, cls: type[E]) -> None:
        self.cls = cls

    def load(self, value: object, where: str) -> E:
        try:
            return self.cls(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in self.cls)
            raise MalformedMessage(f"{where}: {_show(value)} is not one of {allowed}") from None

    def dump(self, value: E) -> object:
        return value.value


class Optional(Spec[T | None]):
    def __init__(self, inner: Spec[T]) -> None:
        self.inner = inner

    def load(self, value: object, where: str) -> T | None:
        return None if value is None else self.inner.load(value, where)

    def dump(self, value: T | None) -> object:
        return None if value is None else self.inner.dump(value)


class ListOf(Spec[tuple[T, ...]]):
    """A list on the wire, a tuple in Python, at most ``max_items`` long."""

    def __init__(self, inner: Spec[T], max_items: int) -> None:
        self.inner, self.max_items = inner, max_items

    def load(self, value: object, where: str) -> tuple[T, ...]:
        if not isinstance(value, list | tuple):
            raise MalformedMessage(f"{where}: {_show(value)} is not a list")
        if len(value) > self.max_items:
            raise MalformedMessage(f"{where}: over {self.max_items} items")
        return tuple(self.inner.load(v, f"{where}[{i}]") for i, v in enumerate(value))

    def dump(self, value: tuple[T, ...]) -> object:
        return [self.inner.dump(v) for v in value]


class SetOf(Spec[frozenset[T]]):
    """A sorted list on the wire (so equal sets encode equally), a frozenset in Python."""

    def __init__(self, inner: Spec[T], max_items: int) -> None:
        self.inner, self.max_items = inner, max_items

    def load(self, value: object, where: str) -> frozenset[T]:
        return frozenset(ListOf(self.inner, self.max_items).load(value, where))

    def dump(self, value: frozenset[T]) -> object:
        return sorted(self.inner.dump(v) for v in value)  # type: ignore[type-var]


class MapOf(Spec[Mapping[str, T]]):
    """A map with string keys (checked by ``key``) and values checked by ``value``."""

    def __init__(self, key: Text, value: Spec[T], max_items: int) -> None:
        self.key, self.value, self.max_items = key, value, max_items

    def load(self, value: object, where: str) -> Mapping[str, T]:
        if not isinstance(value, dict):
            raise MalformedMessage(f"{where}: {_show(value)} is not a map")
        if len(value) > self.max_items:
            raise MalformedMessage(f"{where}: over {self.max_items} entries")
        return {
            self.key.load(k, f"{where} key"): self.value.load(v, f"{where}[{k!r:.20}]")
            for k, v in value.items()
        }

    def dump(self, value: Mapping[str, T]) -> object:
        return {k: self.value.dump(v) for k, v in value.items()}


class Nested(Spec[W]):
    """A record (or any ``WireType``) inside a body."""

    def __init__(self, cls: type[W]) -> None:
        self.cls = cls

    def load(self, value: object, where: str) -> W:
        try:
            return self.cls.from_wire(value)
        except MalformedMessage as exc:
            raise MalformedMessage(f"{where}: {exc}") from None

    def dump(self, value: W) -> object:
        return value.to_wire()


def wire(spec: Spec[Any], *, default: Any = MISSING, default_factory: Any = MISSING) -> Any:
    """Declare a body field with its spec (and optional default)."""
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={"spec": spec}
    )


_FIELDS: dict[type, tuple[tuple[str, Spec[Any], bool], ...]] = {}


def _fields(cls: type) -> tuple[tuple[str, Spec[Any], bool], ...]:
    known = _FIELDS.get(cls)
    if known is not None:
        return known
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("spec")
        if spec is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with wire()")
        optional = f.default is not MISSING or f.default_factory is not MISSING
        out.append((f.name, spec, optional))
    _FIELDS[cls] = tuple(out)
    return _FIELDS[cls]


class Record:
    """A typed body without a version of its own (a part of a message, a gossip value)."""

    def to_wire(self) -> dict[str, Any]:
        return {name: spec.dump(getattr(self, name)) for name, spec, _ in _fields(type(self))}

    @classmethod
    def from_wire(cls, d: object) -> Self:
        if not isinstance(d, dict):
            raise MalformedMessage(f"{cls.__name__}: {_show(d)} is not a map")
        cls._check_version(d)
        kwargs: dict[str, Any] = {}
        for name, spec, optional in _fields(cls):
            if name not in d:
                if optional:
                    continue
                raise MalformedMessage(f"{cls.__name__}: no {name!r}")
            kwargs[name] = spec.load(d[name], f"{cls.__name__}.{name}")
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as exc:  # a cross-field check in __post_init__
            raise MalformedMessage(f"{cls.__name__}: {exc}") from None

    @classmethod
    def _check_version(cls, d: dict[Any, Any]) -> None:
        return None

    def checked(self) -> Self:
        """This body as the receiver will see it; UsageError saying what is wrong if not."""
        try:
            return type(self).from_wire(self.to_wire())
        except MalformedMessage as exc:
            raise UsageError(str(exc)) from None


class Message(Record):
    """A request, reply or streamed item: a record that carries its version as ``v``."""

    VERSION: ClassVar[int] = 1

    def to_wire(self) -> dict[str, Any]:
        return {"v": self.VERSION, **super().to_wire()}

    @classmethod
    def _check_version(cls, d: dict[Any, Any]) -> None:
        version = d.get("v")
        if version != cls.VERSION:
            raise UnknownMessage(
                f"{cls.__name__} version {_show(version)} is not supported (we speak {cls.VERSION})"
            )


@dataclasses.dataclass(frozen=True)
class Empty(Message):
    """A body with nothing in it (a request without arguments, an acknowledgement)."""


R = TypeVar("R", bound=WireType)
P = TypeVar("P", bound=WireType)
I = TypeVar("I", bound=WireType)  # noqa: E741


@dataclasses.dataclass(frozen=True)
class Method(Generic[R, P]):
    """One RPC method: its name and the types of its request and reply.

    Both ends use the same ``Method`` object, so a field cannot mean one thing
    to the caller and another to the handler.
    """

    name: str
    request: type[R]
    reply: type[P]


@dataclasses.dataclass(frozen=True)
class StreamMethod(Method[R, P], Generic[R, P, I]):
    """A method whose handler streams items (progress, pieces) before its reply."""

    item: type[I] = dataclasses.field(kw_only=True)


__all__ = [
    "Bool",
    "Bytes",
    "Choice",
    "Empty",
    "Float",
    "Int",
    "ListOf",
    "MapOf",
    "Message",
    "Method",
    "Nested",
    "Optional",
    "Record",
    "SetOf",
    "Spec",
    "StreamMethod",
    "Text",
    "WireType",
    "wire",
]
