"""The VM lifecycle of this host: admitted, created, watched, stopped, lost, reconciled.

A VM lives as one row of the ``vms`` table (``rows``) whose state (``state``:
``creating``, ``running``, ``stopping``, ``lost``) moves only by an event through
the one table of legal transitions; an event a state does not take is a bug
(``InternalError``).  ``manager.VmManager`` is the facade the node, the VM
service, transfer and jobs hold; each concern is a module of its own.

In order: at node start ``reconcile`` makes rows agree with QEMU and the disk
(a running QEMU is adopted and watched again, a gone one makes its VM ``lost``,
half-made and half-stopped VMs are removed, orphan disks and QEMUs go).  A
request that reaches this host through the VM service or jobs is admitted
against real free capacity (``admission``: atomic, so two requests never both
take the last slot, and a warm boot's slot is given up to it at once); then
``creation`` makes sure a template holds the packages (``host.templates``), and
per VM commits a ``creating`` row, takes the warm spare (``spare``: the next VM of
the latest warm request's template, resumed ahead of time) or clones and resumes
the warm state or boots cold,
gives the guest its identity and custom zip, and moves the row to ``running``.
From then on ``lifecycle`` watches the QEMU: an ordered stop (``shutdown``)
kills it and deletes overlay, run directory and row; an exit without an order
makes the VM ``lost`` and calls ``on_unexpected_stop``.  In the background,
``warmsched`` makes each template's warm state in a slot of its own and drops
warm states the storage quota needs, and ``spare`` makes the next spare once the
host is idle (it gives its slot up to any request, as a warm boot does).

What can fail, and who is told: no free slot is a ``CapacityError`` to the
caller; a VM that fails half-way is killed, its overlay and row go
(``FAILED``), and the request reports it as not made, with the error's kind
(``PackageInstallError``, ``PackageSourceError``, ``HypervisorError``), to the
coordinating node, which spills it to another host.  A failed warm resume makes
the VM boot cold and deletes the state; a failed warm boot is only logged.
Migration (``migrating`` on the source, ``incoming`` on the target), the
keep-alive restart of a lost VM from its own disk (``restart``: ``restarting``)
and the deletion of a copy superseded by a newer generation elsewhere are
states and events of ``state.TRANSITIONS``, not paths beside it.

May import: vmmesh.api, vmmesh.host, vmmesh.hypervisor.
"""
