"""Gossip: what every host knows of every other, and who is alive.

Owns: the pure Scuttlebutt core (``core``: versioned keys per host,
digest/delta exchanges, every value checked on arrival), the phi-accrual
failure detector (``detector``), the schema of a host's keys and its typed
form (``hoststate``), the typed view placement reads (``view``), a seeded
simulator of thousands of cores (``sim``) and the thin trio driver
(``driver``) that runs a core over the node's RPC links.

May import: ``api`` and ``errors``; ``driver`` also ``net`` (it is glue).
The core does no I/O and reads no clock: time is passed in.
"""
