"""Hypervisor backends behind one interface (``base.Hypervisor`` and ``base.Guest``).

The host layer asks and the backend does: make a disk (a base copy or a
linked-clone overlay), start a guest from a ``BootSpec``, wait for its guest
agent, run commands and move files through the agent, save and resume its RAM
(``savedstate`` says what shape a saved state needs), move it to another
host (``migration``), take crash-consistent increments of its disk for a
replica elsewhere (``replica``), power it off or kill it.
QEMU (``qemu``) runs each guest as its own process in its own session, so
guests outlive a node restart; the next node finds them again from their run
directory (``adopt``) after checking the pid is still that QEMU.  The monitor
and agent protocols are pure codecs (``qmp``, ``qga``) moved by thin trio
clients, one short connection per operation.  Before the first guest,
``accel`` decides KVM or TCG by running a tiny guest; ``qcow2`` reads a disk's
header without QEMU, so a crafted disk never makes QEMU open a host file.

What can fail, and who is told: QEMU and qemu-img failures are
``HypervisorError`` with QEMU's own words (``QMPError`` for the monitor,
``GuestAgentError`` for the agent, ``ImageError`` for a bad disk header), raised
to the caller in ``host``, which decides what it means for a VM or a template.
Guest output is untrusted and size-bounded.  Paths are built by callers from
validated ids; a backend never builds a path from a peer's string.  The fake
backend for unit tests lives in ``tests/fakehv.py`` and does not ship.

May import: vmmesh.errors.
"""
