"""Who is in the mesh: identities, joining, removal, discovery, and the node's own
control methods.

A mesh is its CA (``pki``): ``vmmesh init`` makes the CA and a first host
certificate; a host is its key, and its node id is a hash of that key.  A new
host joins with a one-time token: ``invites`` keeps the tokens this host
issued in sqlite, ``join`` serves the join port, where the joiner pins the CA
by the token's fingerprint, trades the secret for a certificate and writes its
pki directory in one rename.  From then on a node finds the others by mDNS
(``discovery``, the only zeroconf user; records are untrusted LAN input,
checked field by field) or by static seeds, and the TLS handshake decides
whether what it found is really a member.

Removal is a new CRL (``revocation``).  The admin host signs it and gossip
carries it; every node adopts it only if the mesh CA signed it and it is newer
than the one it holds (``crl_to_adopt``), after which TLS refuses the host
from the next handshake on and the node cuts off what is still connected.
``service`` answers the CLI's status, peers, invite and remove.

What can fail, and who is told: a used, unknown or expired token is a
``TokenError`` at the joiner; an inviter whose CA does not match is an
``AuthError``; a gossiped CRL that does not verify is logged and ignored; a bad
mDNS record is logged once at WARNING, then at DEBUG.

May import: vmmesh.api, vmmesh.config, vmmesh.gossip.view, vmmesh.host.store,
vmmesh.net.
"""
