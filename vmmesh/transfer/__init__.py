"""Templates and base images travel peer to peer: one hop, from every holder at once.

Before the template manager builds a template it asks this package
(``service.TemplateFetcher``).  The hosts that gossip the template are grouped
by the delta chain they hold, the chain with most holders is chosen, and the
estimate to fetch the missing deltas (their bytes over the measured
throughput, plus the wait for a host still building it) is set against the
estimate to install (``host.history``); the faster wins.  A fetch asks each
holder for a blob's piece table (``blob.info``); then ``fetcher`` runs a few
tasks per holder, each asking for batches of pieces (``blob.pieces``) as the
pure scheduler (``pieces``) hands them out: a faster holder comes back sooner
and gets more.  ``blobfile`` checks each piece's hash and writes it into a
resumable staging file; ``packs`` keeps a blob's chunks compressed hard once,
so holders serve them as stored.  A host without a base image fetches one the
same way, and before fetching or building, the cache is cut back under the
storage quota.  A fetched template (or base image) brings a holder's warm
state with it when one fits this host's guests and comes faster than a warm
boot here (``warmpick``): the shape a saved state needs is compared as
``hypervisor.savedstate`` defines it, the only part of the hypervisor layer
this package reads.

What can fail, and who is told: a holder that breaks off, sends a bad piece or
lacks the blob is dropped and its pieces go to the others; a stopped transfer
resumes from the verified pieces on disk; a whole file whose hash is not its
name is thrown away.  Only a complete, verified chain becomes a template.
When every holder fails, ``TransferError`` goes to the template manager and
through it to the host's answer, so the coordinator places that share
elsewhere.  Everything travels over the mesh's mutual-TLS links: no new port.

May import: vmmesh.api, vmmesh.extension, vmmesh.gossip, vmmesh.host, vmmesh.net,
vmmesh.progress, vmmesh.hypervisor.savedstate (from service, warmpick).
"""
