"""Who is in the mesh: identity and PKI (``pki``: mesh CA, host certificates, CRLs,
join tokens), invites and the join protocol (``invites``, ``join``), removal
(``revocation``), zero-configuration discovery (``discovery``, the only
zeroconf user) and the node's own control methods (``service``: status,
peers, invite, remove).

May import: ``api``, ``errors``, ``host.store`` (invites and revocations are
rows), ``gossip.view`` (the service reads the mesh) and ``net`` (``join``
speaks RPC on its own port; ``net.tls`` in turn builds on ``pki``).
"""
