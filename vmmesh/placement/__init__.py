"""Where VMs go: the planner and the request coordinator, both pure.

Owns: ranking hosts by template affinity and filling them (``planner``), and
driving one mesh request through waves of asks to its report
(``coordinator``).  Same input, same output: a dry run shows exactly what a
real request does, and tests need no network.

May import: ``vmmesh.api``, ``vmmesh.gossip.hoststate`` (the view it plans
over) and ``vmmesh.errors``.  No I/O, no clock, no trio.
"""
