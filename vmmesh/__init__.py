"""vmmesh: a peer-to-peer mesh of hosts that run on-demand QEMU VMs."""

__version__ = "0.1.0"
