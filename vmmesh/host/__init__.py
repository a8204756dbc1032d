"""This host's machine: local state (``store`` and its versioned ``schema``), capacity
(``capacity``), base images (``images``, ``imagebuild``), templates as qcow2
delta chains (``templates``, with the guest side of a build in ``build`` and
apt's text in ``apt``), VMs (``vms``) and what makes each guest itself
(``persona``, ``customzip``, ``sshkeys``).

May import: ``api``, ``errors``, ``config``, ``hypervisor``.  Never the
network: what the mesh wants of this host arrives through ``vmservice`` (and
later ``transfer`` and ``jobs``).  Every change is crash-safe: sqlite
transactions and temp file + rename, undone by ``reconcile`` at start.
"""
