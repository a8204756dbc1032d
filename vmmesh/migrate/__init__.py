"""VMs that outlive their host's plans: live and offline migration between hosts.

Theory of operation.  ``vmmesh migrate VM`` reaches the local node, which
hands the move to the host that runs the VM (the *source*, ``service``).
The source marks the VM ``migrating`` (``vm.state``), asks the *target* to
``prepare`` (same QEMU and machine shape, same base image, a free slot, the
template chain fetched if it lacks it, an ``incoming`` row), sends the one
layer of its own the overlay may sit on (a warm state's disk), and then
moves the guest (``source``): live, the target's QEMU waits with
``-incoming defer`` while the overlay's clusters are mirrored over NBD and
the RAM stream iterates; the guest pauses only for the switchover, after
the mirror has completed.  Offline, the guest is paused and saved, and the
overlay and the state travel as files.  Every byte goes through *pipes*
(``pipes``) over a mutual-TLS connection of its own between the two nodes:
no new port, no QEMU or NBD socket on the network (both are Unix sockets in
the VM's run directory).  The source's ``commit`` makes the target run the
guest (``target``); only after that does the source delete its copy.

What can fail and who is told: anything before the commit aborts the
target (its QEMU killed, its row and files deleted) and the guest resumes
on the source (``MIGRATE_FAILED``); the user gets the one-line reason.  A
commit whose answer is lost is settled by asking the target to abort: a
target that already runs the VM says so and the source's copy goes; a
target that cannot be reached leaves the source's guest paused, never run
twice.  The source notices a target gone silent by a beat on the mesh's
shared connection, and keeps a note of each migration in the VM's run
directory until the target has answered for it: what did not end (a node
killed, a link cut, the node restarted) is settled from that note every few
seconds, from the node's start, by the same question (``source.settle``).
A target whose source goes silent aborts after ``IDLE`` seconds, unless its
guest already runs (the switchover happened): then it keeps it.  Failpoints
for the tests that cut a migration at each step: ``faults``.

May import: vmmesh.api, vmmesh.extension, vmmesh.gossip, vmmesh.host, vmmesh.hypervisor,
vmmesh.net, vmmesh.vm, vmmesh.vmservice (from service).
"""
