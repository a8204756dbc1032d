"""Gossip: what every host knows of every other, and who is alive.

Every host is the only author of a few keys about itself (name, addresses,
capacity, templates, VMs, CRL; ``hoststate`` holds them as one typed record,
each field with its key and spec).  Each interval
the trio driver (``driver``) ticks the pure core (``core``): this host's
heartbeat goes up, and a phi-accrual detector per peer (``detector``) turns
silence into "suspect", then "down", then "forgotten".  Then the driver opens
an exchange with a few peers over the node's RPC links: digest out, the deltas
the other side lacks back, the ones it asked for out again (Syn, Ack, Ack2).
Deltas travel in version order, so loss, duplication and reordering are all
safe: what was lost is offered again by the next exchange.

What can fail, and who is told: every value that arrives is untrusted and
meets ``hoststate.check_value`` before it is stored; a refused value is
neither stored nor relayed, and the core emits a ``REFUSED`` event naming the
host, the key, the peer it came through and why.  A message whose sender is
not the node id of the peer's certificate is refused by the driver with
``ProtocolError``.  The node drains the core's events (joined, changed, down,
forgotten, refused) and hands them on: addresses to the address book, CRLs to
revocation, refusals to the refusal log, all of them to the extensions.

``view`` gives placement and the CLI typed hosts; ``sim`` runs thousands of
cores with a seeded RNG to measure spread.  The core does no I/O and reads no
clock: time is passed in.

Its successor, which the node runs by default (``gossip = "swim"``; issue 19;
``gossip = "scuttlebutt"`` keeps the core above): ``swim`` is a pure
SWIM core whose traffic grows with the news, not with the mesh.  Hosts probe
one member per interval (with indirect probes through others when an ack is
late); a member no one reaches is suspected, refutes with a higher
incarnation if it is alive, and is marked down everywhere once a suspicion
timeout (Lifeguard's, shortened by independent confirmations) runs out.
Writes spread as ``News`` ranges piggybacked on probes and on a little
gossip while there is news, a bounded number of times each; a host with a
gap pulls it from the relay, and a slow push-pull (``Sync``) repairs what
infection missed.  Versions, prefix-closed ranges, tombstones, revocation
and the value check are those of ``core``.  ``swim_wire`` holds its
messages; ``swim_sim`` runs ten thousand of them on a shared baseline, in
simulated seconds with loss and round trips.  ``swim_driver`` runs one core
with trio's clock over a datagram transport: it sleeps until the core's next
deadline, sends what the core returns, and refuses (counts, and logs once
per peer) bytes that are not a message and messages whose sender is not the
peer the transport authenticated.  ``swim_node`` gives the node the calls it
makes of ``core`` (``set_local``, ``learn``, ``remove``, ``drain_events``,
what ``view`` reads) over a core and its driver; the node's transport is its
peer links (``gossip.swim`` calls, each send in a task of its own), so SWIM
adds no port and every datagram is authenticated by TLS.

May import: vmmesh.api, vmmesh.net (from driver), vmmesh.wire (from swim_driver).
"""
