"""Where VMs go: the planner and the request coordinator, both pure.

Any node may coordinate ``vmmesh request NAME COUNT PKG...``.  The
coordinator's ``start`` has the planner (``planner``) rank the hosts of the
gossiped view (best template match first, healthy before suspect, warm before
cold, load spread among equals by a stable hash) and fill them in that order
up to their free slots; it returns the first wave, one ask per chosen host.
The trio glue (``vmservice.requests``) calls those hosts and feeds each answer
back: made (perhaps fewer than asked, since gossip was stale and admission
happens at the owner), failed, or cannot install a package.  When a wave is
answered, ``next_wave`` re-plans what was not made, until the request is
placed, nothing more fits, or ``max_rounds`` waves were tried.

What can fail, and who is told: a host that fails is not asked again for this
request, its share goes elsewhere and the report notes it; a package that no
host that tried could install, with nothing made, ends the request with
``PackageInstallError``.  What could not be placed, and why, is in the report
the CLI prints.  Same input, same output: a dry run shows exactly what a real
request does, and tests need no network, no clock and no trio.

May import: vmmesh.api, vmmesh.gossip.hoststate.
"""
