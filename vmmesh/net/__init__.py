"""Connections: every byte between hosts, and between the CLI and its node, passes here.

A peer link is made in this order.  The address book (``peers``) says where
a node is, fed by mDNS, seeds, inbound connections and gossip, a more trusted
source never hidden by a less trusted one.  ``tls`` dials with mutual TLS 1.3
against the mesh CA and the current CRL, so a host of another mesh, an expired
or a revoked one fails in the handshake and no handler ever sees it.  Then
``rpc`` runs one reader and one writer over the stream and multiplexes typed
calls in both directions (``wire`` frames carrying ``api`` bodies).  The
control socket (``control``) speaks the same RPC over a Unix socket that only
root and the vmmesh group can open; ``addresses`` finds what this host
advertises.

What can fail, and who is told: a failed handshake drops the connection; a
bad frame or envelope gets a ``Fail`` on call id 0 and the link closes; a body
that does not fit its method gets a typed ``Fail`` and the link stays open, as
it does for an unknown method, so versions can differ.  Each refusal is
counted by cause and logged once per peer and kind per period
(``refusals``), which ``vmmesh status`` shows.  A handler's ``VmmeshError``
travels as a code and is raised at the caller as the same class; a link that
breaks fails the calls on it with ``PeerUnavailable``, and the next call dials
again.

May import: vmmesh.api, vmmesh.wire, vmmesh.mesh.pki.
"""
