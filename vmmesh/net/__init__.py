"""Connections: mutual TLS 1.3 between hosts (``tls``), typed calls over framed streams in
both directions (``rpc``), the per-peer connection pool and address book
(``peers``), the local control socket (``control``), this host's addresses
(``addresses``) and the one log-once helper with refusal counters
(``refusals``).

May import: ``wire``, ``api``, ``errors`` and ``mesh.pki`` (certificates).
Everything a peer sends enters here and is checked here: a bad frame closes
the link, a bad body gets a typed error, and each refusal is counted and
logged once per peer and kind per period.
"""
