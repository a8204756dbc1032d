"""VMs across the mesh: the node extension that serves and coordinates requests.

Owns: choosing what VMs run on and taking up a base image that appears
(``service``), the local methods each host serves to its peers (``local``:
share, list, shutdown, exec, ssh on this host), the mesh methods the CLI
calls (``mesh``: fan out over every host), and the request glue around the
pure coordinator (``requests``).

May import: everything below it (``api``, ``net``, ``host``, ``placement``,
``gossip``); nothing imports it but the node's entry point.  Admission
happens at the owning host, atomically: gossip may be stale, so a refused
share simply moves on.
"""

from vmmesh.vmservice.service import VmService as VmService
