"""The mesh on a web page: an HTTPS listener on every node, Prometheus metrics and service
discovery, the API's typed bodies as JSON, all behind the mesh's own certificates.

Theory of operation.  Each node listens on its own port (``web_port``, by
default the peer port + 2) with TLS that asks for a client certificate of the
mesh CA (``server``): one of another CA, or revoked, is refused in the
handshake and counted.  The certificate's OU is its role (``vmmesh cert
issue --role viewer|metrics``, signed on the host holding the CA key):
``metrics`` may read ``/metrics`` and ``/sd``, ``viewer`` everything; anything
else gets 403 (``app``).  A browser may come without a certificate: ``vmmesh
web`` prints a single-use login link, which sets a session cookie worth a
viewer (``login``, in this node's memory only); a request with neither
certificate nor session gets 401.  Requests are HTTP/1.1 through h11, one
after another on a kept-alive connection.  Every answer is made when it is
asked for, from what the node already holds (``service``): ``/metrics`` is
the status reply (the figures the node and its extensions publish,
``api.figures``: gossip, transfers, migrations, jobs), the gossip view and
this host's VM rows renamed into metric families (``metrics``), and each
VM's CPU, memory and disk figures, which a sampler task reads from ``/proc``
and QMP every few seconds (``vmstats``) so that no scrape waits on QEMU;
``/sd`` lists every up host's page, ``/api/v1/{status,hosts,vms}`` are the
CLI's ``--json`` bodies.  ``/`` is a fixed page (``page``) whose script
draws the snapshots that ``/events`` streams (server-sent events: the same
bodies, the work under way and the task log of ``events``) on every change
and every 2 s.
Every host shows the whole mesh as its gossip knows it, so a host that died
is still shown, as down, by the others; each host gossips its fetches,
migrations and jobs under way (key ``work``, rounded and sent at most every
2 s by ``work``), so every page draws every host's bars.

The server certificate (``certs``): browsers and Prometheus check a page's
certificate against the address they dialled, and a host certificate names
only its node id.  What every host has is its own key, the CA certificate
and mutual TLS to the other hosts; only the host that ran ``vmmesh init``
holds the CA key, and the CA certificate names that host (its O).  So a node
asks that host (then any other up host) over the mesh for a certificate of
its own key naming its addresses (``web.certify``); the signer checks the
key is the calling host's, proven by the link's TLS.  Until one arrives, and
when the CA host cannot be reached, the page serves the host certificate,
which clients that check names refuse: the failure says so, and the node
asks again every 5 s and whenever a host comes up.  The certificate is kept
in ``<data_dir>/web/`` and renewed when the host's addresses change or a
month before it expires.

May import: vmmesh.api, vmmesh.extension, vmmesh.gossip, vmmesh.mesh.pki, vmmesh.net.
"""
