"""Typed bodies of every RPC and control method, one definition for both ends.

Owns: the field specs and ``Record``/``Message`` bases (``codec``), names and
ids (``names``), what hosts say about themselves (``host``), and one module
per method family (``node``, ``vm``, later ``transfer`` and ``jobs``), each
listing its ``Method`` objects beside their bodies.

May import: ``vmmesh.errors`` only.  Everything else imports this package:
the node's handlers take and return these types, the CLI reads their fields,
and ``from_wire`` is the one place a peer's map becomes a typed value.
"""
