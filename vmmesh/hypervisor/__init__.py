"""Hypervisor backends behind one interface (``base.Hypervisor`` and ``base.Guest``).

Owns: QEMU (``qemu``: qemu-img for disks, one qemu-system process per guest
in its own session, adopted again after a node restart), its monitor and
guest-agent protocols as pure codecs (``qmp``, ``qga``), the KVM-or-TCG
probe (``accel``) and a fake for unit tests of callers (``fake``).  Other
backends (VirtualBox as in the thesis, libvirt) fit behind the same
interface.

May import: ``errors`` only.  Paths it is given were built by callers from
validated ids; it never builds a path from a peer's string.
"""
