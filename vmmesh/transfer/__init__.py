"""Templates and base images travel peer to peer: one hop, from every holder at once.

Owns: the piece scheduler (``pieces``, pure: which piece from which holder,
faster holders get more, a failed holder's pieces go to the others), blobs
on disk (``blobfile``: piece tables and zero pieces on the holder, verified
pieces into a resumable staging file on the receiver), the trio glue that
fetches one blob from many holders (``fetcher``), and the node extension
(``service``) that serves blobs, decides fetch-or-install per template from
measured figures (``host.history``), fetches the base image a host lacks,
and keeps the template cache under the storage quota.

Protocol (``api.transfer``): ``blob.info`` (a blob's piece table) and
``blob.pieces`` (chunks of asked pieces, zstd where it pays) over the same
mutual-TLS links as everything else: no new port, no plain socket.

May import: ``api``, ``net``, ``host``, ``gossip``; ``vmservice`` only for
the VM service it serves (under TYPE_CHECKING).
"""
