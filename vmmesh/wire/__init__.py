"""Bytes on the wire, without I/O: length-prefixed msgpack frames (``framing``) and the
RPC envelope each frame carries (``envelope``).

Inbound, a transport (``net.rpc``) feeds whatever bytes arrived to a
``FrameDecoder``.  The decoder checks each four-byte length prefix against the
frame limit before it buffers the body, so a peer cannot make us hold a huge
frame; then it unpacks the body with every msgpack limit set to the frame size,
string keys only and no ext types, and hands out whole messages.
``envelope.decode`` turns each message into one typed envelope (call, reply,
fail, item, end or cancel) with its version, kind and call id.  Outbound, the
same two steps run the other way.

What can fail, and who is told: a bad frame (too long, not msgpack, nil)
raises from the decoder and leaves it broken, because the stream has lost its
framing; a map of the wrong shape raises ``MalformedMessage``, an unknown kind
or version ``UnknownMessage``.  This package only raises: ``net.rpc`` decides
what the peer hears (a ``Fail`` on call id 0, then the close) and counts the
refusal.  Everything here is synchronous code tested from bytes.

May import: vmmesh.errors.
"""
