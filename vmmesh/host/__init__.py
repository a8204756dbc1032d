"""This host's machine: its state, base images, templates and warm states, capacity,
and what makes each guest itself; the VM lifecycle that uses them is ``vmmesh.vm``.

Everything lives in the data directory and in a versioned sqlite database
(``store``, ``schema``).  At node start each manager reconciles first: rows
are made to agree with QEMU and the disk, a guest no row accounts for is
adopted and killed (``reconcile``), half-made files go.  A request reaches this
host through ``vmservice``, ``transfer`` or ``jobs``, never from the network
directly, and ``vmmesh.vm`` runs it in this order: admission against real free
capacity (``capacity`` computes it); a template holding the packages
(``templates``: reused, fetched by the transfer service when its estimate is
faster, or built as a new qcow2 delta over the nearest parent, with the guest's
part in ``build``, apt's text in ``apt`` and the measured figures in
``history``); per VM a linked clone, resumed from the template's warm state
(``warm``) when the shapes match, booted cold otherwise; then the guest becomes
itself (``persona``, ``sshkeys``) and gets its custom zip (``customzip``).  Base
images are kept by content (``images``; ``imagebuild`` makes the default one).

Every change is crash-safe: a row committed first, files written under a
temporary name and renamed, so a killed node leaves only what reconcile
removes.  What can fail, and who is told: a template build that fails says
which kind of failure it was (``PackageInstallError`` when no host would do
better; ``PackageSourceError`` when another might; ``HypervisorError``) to the
VM lifecycle, which reports it to the coordinating node; a warm state that
does not resume is deleted and its VMs boot cold.

May import: vmmesh.api, vmmesh.config, vmmesh.hypervisor.
"""
