"""Typed bodies of every RPC and control method, one definition for both ends.

Each method family has one module (``node``, ``vm``, ``join``, ``transfer``,
``jobs``) listing its ``Method`` objects beside their frozen dataclasses;
``host`` holds what hosts gossip about themselves, ``names`` the ids and
names, ``common`` the progress items every family streams, ``figures`` the
numbers the node's extensions publish (``vmmesh status``, the page, metrics).  A field is
declared once with its spec (``codec``: type, bounds, length, pattern).  The
node's handlers take and return these types, the CLI builds and prints them,
and gossip values are records of the same kind.

Every path runs in the same order.  The sender builds a body and ``to_wire``
makes it a plain map; the receiver's ``from_wire`` walks the fields and either
returns a typed value or raises ``MalformedMessage`` naming the field, which
the RPC layer (``net.rpc``) returns to the peer as a ``Fail`` and counts as a
refusal.  Past ``from_wire`` code trusts its types.  The CLI runs the same
check on what the user asked for (``checked()``) and gets ``UsageError`` with
the same words, before anything is sent.  Keys a reader does not know are
ignored, so a newer peer may add fields with defaults; a message carries its
version as ``v``.

May import: vmmesh.errors.
"""
