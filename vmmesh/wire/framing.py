"""Length-prefixed msgpack frames, without I/O (h11 style).

Theory of operation: a frame is a 4-byte big-endian length followed by that
many bytes of msgpack.  The decoder is fed whatever the transport delivered
(``feed``) and hands out whole messages (``next_message``).  Its two safety
properties are the point of the module:

* the length prefix is checked against ``max_frame`` as soon as its four
  bytes are in, so a peer cannot make us buffer a huge body first;
* the body is unpacked with every msgpack size limit set to the frame size,
  map keys restricted to strings, and ext types (timestamps included)
  refused, so a peer cannot make us allocate more than a frame's worth or
  build objects we do not expect.

A frame holding msgpack nil is malformed: ``None`` is how
``next_message`` says "need more bytes", and no message is nil.

After an error the decoder stays broken: the byte stream has lost its
framing and the only sane reaction is closing the connection.
"""

from __future__ import annotations

import struct
from typing import NoReturn

import msgpack

from vmmesh.errors import FrameTooLarge, MalformedMessage

DEFAULT_MAX_FRAME = 4 << 20
_PREFIX = struct.Struct(">I")


def encode_frame(obj: object, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Pack ``obj`` into one frame.

    Raises FrameTooLarge if the body is over ``max_frame``: sending it would
    only make the peer drop the connection, so the sender learns it here.
    """
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    if len(body) > max_frame:
        raise FrameTooLarge(f"outgoing frame of {len(body)} bytes is over {max_frame}")
    return _PREFIX.pack(len(body)) + body


_WHY = {
    "StackError": "nested too deep",
    "FormatError": "a byte that starts no msgpack value",
    "ExtraData": "bytes after the message",
    "OutOfData": "the frame ends inside a value",
}


def _why(exc: Exception) -> str:
    """msgpack's errors often have no text: name what went wrong instead."""
    name = type(exc).__name__
    text = str(exc).strip()
    return text or _WHY.get(name, name)


def unpack(body: bytes | memoryview, limit: int, what: str = "frame") -> object:
    """msgpack from a peer: every length bounded by ``limit``, no extension types, map
    keys that are strings or numbers; anything else is MalformedMessage naming ``what``."""
    try:
        obj: object = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=0,
            ext_hook=_refuse_ext,
        )
    except MalformedMessage:
        raise
    except RecursionError:
        raise MalformedMessage(f"{what} is not valid msgpack: nested too deep") from None
    except Exception as exc:  # msgpack raises ValueError, TypeError, its own classes
        raise MalformedMessage(f"{what} is not valid msgpack: {_why(exc)}") from None
    return obj


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise MalformedMessage(f"msgpack ext type {code} is not allowed")


class FrameDecoder:
    """Turns a byte stream into messages, one frame at a time."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._body_len: int | None = None
        self._error: Exception | None = None

    def feed(self, data: bytes | bytearray) -> None:
        """Append bytes received from the transport."""
        if self._error is not None:
            raise self._error
        self._buffer += data

    def next_message(self) -> object | None:
        """Return the next complete message, or None if more bytes are needed.

        Raises FrameTooLarge or MalformedMessage when the peer broke the
        protocol; every later call raises the same error.
        """
        if self._error is not None:
            raise self._error
        if self._body_len is None:
            if len(self._buffer) < _PREFIX.size:
                return None
            (length,) = _PREFIX.unpack_from(self._buffer)
            if length > self.max_frame:
                self._fail(FrameTooLarge(f"frame of {length} bytes is over {self.max_frame}"))
            del self._buffer[: _PREFIX.size]
            self._body_len = length
        if len(self._buffer) < self._body_len:
            return None
        length = self._body_len
        try:
            with memoryview(self._buffer) as view, view[:length] as body:
                obj = self._unpack(body)  # in place: no copy of a large body
        except MalformedMessage as exc:
            self._fail(exc)
        del self._buffer[:length]
        self._body_len = None
        return obj

    def _unpack(self, body: memoryview) -> object:
        obj = unpack(body, self.max_frame)
        if obj is None:
            # None means "need more bytes" to our caller; no message is nil.
            raise MalformedMessage("frame carries nil")
        return obj

    def _fail(self, exc: Exception) -> NoReturn:
        self._error = exc
        self._buffer.clear()
        raise exc
