"""Keep-alive: VMs requested with ``--keep-alive`` come back, and never run twice.

Theory of operation.  Keep-alive is opt-in per request (as HA resources are
in Proxmox): a keep-alive VM's row says so, with its generation and where it
came from (``api.vm.Lineage``).  ``service`` looks at the mesh once a second.
A keep-alive VM whose QEMU ends without an order (killed, crashed, powered
off inside) is started again on its own host once, from its own disk
(``vm.restart``); if that fails or it ends again, the next generation is made
from its template on another host and the old copy deleted.  A host marked
down keeps its last gossip (its ``keepalive`` list) for a while: after
``service.GRACE`` seconds, the one host the others agree on (``decide``: the
lowest node id among the up hosts, on the side with the quorum) makes each
of its keep-alive VMs again on a live host, as the next generation, with the
same name.

What can fail, and why nothing runs twice: a host that loses contact with
the majority of the mesh stops vouching for its keep-alive VMs, and its
watchdog process (``fence``, a process of its own, so a crashed or hung node
is covered too) kills them within ``fence.FENCE`` seconds, before the grace
period of the others ends.  Only the side with the quorum recovers.  A host
that comes back sees the VM's name run elsewhere in gossip and deletes its
old copy instead of starting it.  A mesh of one or two hosts cannot tell a
dead peer from a cut link, so it neither fences nor recovers on other hosts:
keep-alive there means restart on the same host only.  A VM whose host died
comes back from its template: what was on its own disk is lost.

May import: vmmesh.api, vmmesh.extension, vmmesh.gossip, vmmesh.host, vmmesh.net, vmmesh.vm,
vmmesh.vmservice (from service).
"""
