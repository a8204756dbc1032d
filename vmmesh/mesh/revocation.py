"""Revoked hosts: the CRL this host holds, newer CRLs from gossip, and cutting hosts off.

A revocation is a new CRL signed by the mesh CA (``pki.revoke``, on the
admin host).  It travels as the ``crl`` gossip key; every node verifies a
gossiped CRL against the CA, installs it when its number is newer than the
one it holds (so TLS refuses the host from the next handshake on), records
the revoked node ids in sqlite and has the node cut off what is still
connected (``on_revoked``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from vmmesh.errors import AuthError, UsageError
from vmmesh.host.store import Store
from vmmesh.mesh import pki

log = logging.getLogger("vmmesh.node")


def crl_to_adopt(ca_cert: x509.Certificate, pem: bytes, held: int) -> int | None:
    """The number of a gossiped CRL this host should adopt, or None to keep its own.

    Adopt only a CRL signed by the mesh CA (else ``AuthError``: a host of another
    mesh, or a forgery) whose number is above the one held: an older or equal one
    is news this host already has.  Pure: the caller reads the CA and installs.
    """
    number, _ = pki.verify_crl(ca_cert, pem)
    return number if number > held else None


class Revocations:
    def __init__(
        self,
        pki_dir: Path,
        store: Store,
        self_id: str,
        on_revoked: Callable[[str], None],
    ) -> None:
        self._pki_dir = pki_dir
        self._store = store
        self._self_id = self_id
        self._on_revoked = on_revoked
        self.number = 0
        self.revoked: frozenset[str] = frozenset()

    def load(self) -> None:
        """The CRL of the pki directory (at start)."""
        self._install(pki.current_crl(self._pki_dir))

    def current(self) -> bytes:
        return pki.current_crl(self._pki_dir)

    def consider(self, pem: bytes, source: str) -> bool:
        """A CRL some host gossips: install it if it verifies and is newer."""
        try:
            number = crl_to_adopt(pki.load_ca_cert(self._pki_dir), pem, self.number)
        except AuthError as exc:
            log.warning("host %s gossips a CRL that does not verify: %s", source, exc)
            return False
        if number is None:
            return False
        pki.install_crl(self._pki_dir, pem)
        self._install(pem)
        log.info("installed CRL #%d from %s", number, source)
        return True

    def revoke(self, node_id: str) -> bytes:
        """Sign a new CRL naming ``node_id`` (admin host only); returns it."""
        pem = pki.revoke(self._pki_dir, node_id)
        self._install(pem)
        return pem

    def revoke_client(self, serial: int) -> bytes:
        """Sign a new CRL naming a client certificate (admin host only); returns it.
        Every page reads the CRL at each TLS handshake, so the holder is refused there."""
        if pki.is_node_serial(serial):
            raise UsageError("that serial is a host's certificate: remove the host instead")
        pem = pki.revoke_serial(self._pki_dir, serial)
        self._install(pem)
        return pem

    def _install(self, pem: bytes) -> None:
        number, serials = pki.verify_crl(pki.load_ca_cert(self._pki_dir), pem)
        self.number = number
        revoked = pki.revoked_node_ids(serials)
        new = revoked - self.revoked
        self.revoked = revoked
        now = time.time()
        with self._store.transaction() as db:
            for nid in revoked:
                db.execute(
                    "INSERT OR IGNORE INTO revocations (node_id, serial, revoked_at) "
                    "VALUES (?, ?, ?)",
                    (nid, str(pki.serial_of_node(nid)), now),
                )
        for nid in sorted(new):
            if nid == self._self_id:
                log.error("this host has been removed from the mesh (CRL #%d)", number)
                continue
            self._on_revoked(nid)
