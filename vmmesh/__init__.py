"""vmmesh: a peer-to-peer mesh of hosts that run on-demand QEMU VMs carrying the software
a job needs.

The packages, from the wire up: ``wire`` (frames, envelopes), ``api`` (typed
bodies), ``net`` (TLS, RPC, peers, control socket), ``mesh`` (identity,
join, discovery), ``gossip`` (state, failure detection), ``placement``
(planner, request coordinator), ``hypervisor`` (QEMU), ``host`` (state,
images, templates, VMs), ``vmservice`` (VMs across the mesh); ``node`` wires
them into one process.  Each package's docstring says what it owns and what
it may import.
"""

__version__ = "0.1.0"
