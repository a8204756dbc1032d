"""This host's HTTPS certificate: which names it needs, when to ask again, whom to ask.

The certificate is the host's own key certified by the mesh CA for the
host's addresses (``pki.sign_web_server``), kept in ``<data_dir>/web/``.
Only a host holding the CA key can sign, and every host can tell which one
that is: the CA certificate, which every host has, names the host that made
the mesh in its O, so that host is asked first (then any other up host, in
case the key moved).  ``needs_renewal`` is pure: no certificate, names that
changed (a new address) or under ``RENEW_BEFORE`` left.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from vmmesh.gossip.hoststate import HostView

CERT_FILE = "server.crt"
RENEW_BEFORE = dt.timedelta(days=30)


def wanted_names(addresses: Sequence[str], host_name: str) -> list[str]:
    """What the certificate names: the host's addresses (IPs), its name, localhost."""
    out = [a for a in addresses if a and a not in ("0.0.0.0", "::")]
    out += [host_name, "localhost", "127.0.0.1"]
    return list(dict.fromkeys(out))


def cert_names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} | set(
        san.get_values_for_type(x509.DNSName)
    )


def needs_renewal(
    cert: x509.Certificate | None, names: Sequence[str], now: dt.datetime
) -> str | None:
    """Why a new certificate is needed, or None if ``cert`` will do."""
    if cert is None:
        return "none yet"
    if cert_names(cert) != set(names):
        return "its names changed"
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return "it expires soon"
    return None


def load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None


def ca_holder_name(ca_cert_path: Path) -> str:
    """The name of the host that made the mesh (the CA certificate's O)."""
    cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    attrs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else ""


def signers(hosts: Sequence[HostView], me: str, holder: str) -> list[str]:
    """Node ids to ask for a certificate, best first: the CA's maker, then the other up hosts."""
    up = [h for h in hosts if h.node_id != me and h.status == "up"]
    return [h.node_id for h in sorted(up, key=lambda h: (h.name != holder, h.name, h.node_id))]


def write_cert(path: Path, pem: bytes) -> None:
    """Temp file + fsync + rename: a crash leaves the old or the new certificate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
