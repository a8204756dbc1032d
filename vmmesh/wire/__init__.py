"""Bytes on the wire, without I/O: length-prefixed msgpack frames (``framing``) and the
RPC envelope each frame carries (``envelope``: call, reply, fail, item, end,
cancel).

Owns: the safety limits every peer link and the control socket rely on (frame
size checked from the prefix, msgpack unpacked with limits, no ext types).
May import: ``vmmesh.errors`` only; everything is plain synchronous code
tested from bytes.
"""
