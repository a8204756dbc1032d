"""VMs across the mesh: the node extension that serves and coordinates requests.

At start the service (``service``) chooses what VMs run on (QEMU with the
probed accelerator, the data directory's verified default base image), builds
the host's ``VmManager``, registers the local methods each host serves to its
peers (``local``: share, list, shutdown, exec, ssh on this host) and the mesh
methods the CLI calls (``mesh``, ``requests``), and publishes this host's
templates and VMs into gossip at every tick.  A host without a base image
still runs a node: it offers no slots, says why in its gossiped capacity, and
takes up an image that appears, with no restart.

A request goes this way: the CLI calls ``vm.request`` on its node;
``requests`` drives the pure coordinator (``placement``), calls the hosts it
names (``vm.share``, in parallel, this host through the same handlers) and
forwards their progress to the CLI.  Each host admits against its real free
capacity, atomically: gossip may be stale, so a refused or failed share is
simply placed again in the next wave, and the report says so.  The mesh
methods fan out over every host gossip says is not down; a host that does not
answer is reported as an error line, never silently left out.

May import: vmmesh.api, vmmesh.extension, vmmesh.gossip, vmmesh.host,
vmmesh.hypervisor, vmmesh.net, vmmesh.placement, vmmesh.progress, vmmesh.vm.
"""

from vmmesh.vmservice.service import VmService as VmService
