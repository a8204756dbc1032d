"""The RPC envelope: what travels in each frame between two peers.

Every frame carries one envelope, a msgpack map with a version ``v``, a kind
``k`` and a call ``id``.  Calls are multiplexed by id over one stream, so a
slow delta transfer does not hold up a gossip exchange.  A call is answered
by exactly one ``Reply`` or ``Fail``, or by any number of ``Item``s closed by
``End`` (streamed replies: progress, delta chunks).  ``Cancel`` tells the
callee the caller gave up.  Id 0 is reserved for errors about the connection
itself (a ``Fail`` with id 0 precedes a close).

``decode`` is the one place a peer's map becomes a typed value: shape errors
raise MalformedMessage, an unknown kind or version UnknownMessage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vmmesh.errors import MalformedMessage, UnknownMessage

VERSION = 1
MAX_ID = (1 << 63) - 1
METHOD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}(\.[a-z][a-z0-9_]{0,31}){0,3}$")
_MAX_CODE = 64
_MAX_TEXT = 4096

Body = dict[str, Any]


@dataclass(frozen=True)
class Call:
    id: int
    method: str
    body: Body
    v: int = VERSION


@dataclass(frozen=True)
class Reply:
    id: int
    body: Body
    v: int = VERSION


@dataclass(frozen=True)
class Fail:
    """An error answer; ``code`` is the error's wire name, an ``ErrorCode`` (e.g. "token")."""

    id: int
    code: str
    message: str
    v: int = VERSION


@dataclass(frozen=True)
class Item:
    """One element of a streamed reply."""

    id: int
    body: Body
    v: int = VERSION


@dataclass(frozen=True)
class End:
    """The end of a streamed reply."""

    id: int
    v: int = VERSION


@dataclass(frozen=True)
class Cancel:
    """The caller no longer wants the answer to call ``id``."""

    id: int
    v: int = VERSION


Envelope = Call | Reply | Fail | Item | End | Cancel


def check_method(value: object) -> str:
    """Return ``value`` if it is a well-formed method name like "gossip.syn"."""
    if not isinstance(value, str) or not METHOD_NAME.match(value):
        raise MalformedMessage(f"bad method name: {value!r:.80}")
    return value


def encode(msg: Envelope) -> dict[str, Any]:
    """The msgpack-able map for ``msg``."""
    out: dict[str, Any] = {"v": msg.v, "id": msg.id}
    match msg:
        case Call():
            out.update(k="call", m=msg.method, b=msg.body)
        case Reply():
            out.update(k="reply", b=msg.body)
        case Fail():
            out.update(k="fail", c=msg.code, e=msg.message)
        case Item():
            out.update(k="item", b=msg.body)
        case End():
            out["k"] = "end"
        case Cancel():
            out["k"] = "cancel"
    return out


def _id(obj: dict[Any, Any]) -> int:
    value = obj.get("id")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ID:
        raise MalformedMessage(f"bad call id: {value!r:.80}")
    return value


def _body(obj: dict[Any, Any]) -> Body:
    value = obj.get("b")
    if not isinstance(value, dict):
        raise MalformedMessage("message body is not a map")
    return value


def _text(obj: dict[Any, Any], key: str, limit: int) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise MalformedMessage(f"bad {key!r} field: {value!r:.80}")
    return value


def decode(obj: object) -> Envelope:
    """Check a map received from a peer and turn it into an envelope."""
    if not isinstance(obj, dict):
        raise MalformedMessage(f"envelope is not a map but {type(obj).__name__}")
    version = obj.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise MalformedMessage(f"bad envelope version: {version!r:.80}")
    if version != VERSION:
        raise UnknownMessage(f"envelope version {version} is not supported (we speak {VERSION})")
    kind = obj.get("k")
    match kind:
        case "call":
            return Call(_id(obj), check_method(obj.get("m")), _body(obj))
        case "reply":
            return Reply(_id(obj), _body(obj))
        case "fail":
            return Fail(_id(obj), _text(obj, "c", _MAX_CODE), _text(obj, "e", _MAX_TEXT))
        case "item":
            return Item(_id(obj), _body(obj))
        case "end":
            return End(_id(obj))
        case "cancel":
            return Cancel(_id(obj))
        case _:
            raise UnknownMessage(f"unknown message kind: {kind!r:.80}")
