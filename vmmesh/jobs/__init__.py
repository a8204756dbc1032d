"""Jobs: running people's commands in VMs that carry the software they need.

Owns: the job session protocol's node side (``service``: place VMs, hold
them while the caller's ``job.open`` call lasts, files in and out, the
command with its output streamed, leases so no VM outlives its owner), the
guest side of a job (``guestjob``, through the agent only), the caller's
side shared by ``vmmesh run`` and ``vmmesh-condor`` (``client``), a bag of
tasks as a pure state machine (``bag``), and HTCondor's argument syntax
(``condor``).

May import: ``api``, ``net``, ``host``, ``hypervisor``; ``vmservice`` only
under TYPE_CHECKING.  Files on the caller's side are read and written by the
caller (``client``); the node never opens a path a user gave.
"""
