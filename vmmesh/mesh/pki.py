"""Mesh identities: the mesh CA, host certificates, the CRL and join tokens.

Theory of operation: a mesh is its CA.  ``vmmesh init`` makes a CA key and
certificate and a first host certificate; the mesh id is the first 32 hex
digits of the CA certificate's sha256 fingerprint, so nobody can claim a
mesh id without holding that exact CA certificate.  A host is its key: the
node id is the first 32 hex digits of sha256 over the host's public key
(SubjectPublicKeyInfo DER) and is written as the certificate's CN and its
DNS SAN.  The host's human name is the subject's O, its role ("admin" or
"host") the OU.  Keys are ECDSA P-256, which every OpenSSL speaks in TLS 1.3.

Revocation: a host certificate's serial number *is* its node id read as a
128-bit integer, so a CRL entry names the node id it revokes without a
side table, and revoking a node id revokes every certificate ever issued for
that key (a removed host must make a new key to come back, which is what we
want: the key is what is no longer trusted).  The CRL is signed by the CA,
carries an increasing CRL number and is always present, empty at first,
because OpenSSL's leaf CRL check fails closed without one.

Files live in ``<data_dir>/pki/``: ca.crt, ca.key (admin hosts that made
the mesh only), host.crt, host.key, crl.pem.  Every write is temp file +
fsync + rename; keys are mode 0600.  A new pki directory (init, join) is
built next to the final one and renamed into place as a whole.

Join tokens carry what a new host needs to find and trust the mesh: the CA
fingerprint (pinned, since the joiner has no CA yet), a one-time 32-byte
secret (the inviter stores only its sha256), inviter addresses and an
expiry.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmmesh.errors import AuthError, NotInitialized, TokenError, UsageError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
HOST_CERT = "host.crt"
HOST_KEY = "host.key"
CRL = "crl.pem"

ROLE_ADMIN = "admin"
ROLE_HOST = "host"
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
NODE_ID = re.compile(r"^[0-9a-f]{32}$")
FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")

CA_DAYS = 3650
HOST_DAYS = 365
CRL_DAYS = 3650
# Backdating covers clock skew between hosts: a certificate or CRL made on a
# host whose clock runs ahead must not be "not yet valid" on its peers.
BACKDATE = dt.timedelta(days=1)

TOKEN_PREFIX = "vmm1-"
TOKEN_VERSION = 1
MAX_TOKEN_CHARS = 4096
MAX_ADDRESSES = 16


# --- identities --------------------------------------------------------------


def node_id_of_key(public_key: ec.EllipticCurvePublicKey) -> str:
    """The node id: 32 hex digits of sha256 over the SubjectPublicKeyInfo DER."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()[:32]


def fingerprint(cert: x509.Certificate) -> str:
    """sha256 over the certificate DER, lowercase hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def mesh_id_of(ca_cert: x509.Certificate) -> str:
    return fingerprint(ca_cert)[:32]


def serial_of_node(node_id: str) -> int:
    """The certificate serial of a node id (see "Revocation" above)."""
    if not NODE_ID.match(node_id):
        raise UsageError(f"bad node id: {node_id!r:.80}")
    return int(node_id, 16)


def node_of_serial(serial: int) -> str:
    return f"{serial:032x}"


def check_host_name(name: str) -> str:
    if not HOST_NAME.match(name):
        raise UsageError(
            f"bad host name {name!r:.80}: use letters, digits, '.', '_', '-' (at most 63)"
        )
    return name


@dataclass(frozen=True)
class Identity:
    """This host's place in a mesh, read from its pki directory."""

    node_id: str
    mesh_id: str
    name: str
    is_admin: bool
    ca_fingerprint: str
    pki_dir: Path

    @property
    def ca_cert_path(self) -> Path:
        return self.pki_dir / CA_CERT

    @property
    def ca_key_path(self) -> Path:
        return self.pki_dir / CA_KEY

    @property
    def host_cert_path(self) -> Path:
        return self.pki_dir / HOST_CERT

    @property
    def host_key_path(self) -> Path:
        return self.pki_dir / HOST_KEY

    @property
    def crl_path(self) -> Path:
        return self.pki_dir / CRL

    @property
    def holds_ca_key(self) -> bool:
        """Whether this host can sign certificates and CRLs (invite, remove)."""
        return self.ca_key_path.exists()


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def mesh_id(self) -> str:
        return mesh_id_of(self.cert)


def _name_attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    attrs = name.get_attributes_for_oid(oid)
    if len(attrs) != 1:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else None


def cert_node_id(cert: x509.Certificate) -> str:
    """The node id a host certificate names; AuthError if CN and SAN disagree."""
    cn = _name_attr(cert.subject, NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if cn is None or not NODE_ID.match(cn) or dns != [cn]:
        raise AuthError(f"certificate does not name a node id (CN={cn!r:.80}, SAN={dns!r:.80})")
    return cn


def cert_host_name(cert: x509.Certificate) -> str:
    return _name_attr(cert.subject, NameOID.ORGANIZATION_NAME) or ""


def cert_is_admin(cert: x509.Certificate) -> bool:
    return _name_attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME) == ROLE_ADMIN


# --- files ---------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AuthError(f"{path} is not an EC private key")
    return key


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _install_dir(pki_dir: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Create ``pki_dir`` with ``files`` (name -> (data, mode)) all at once."""
    if pki_dir.exists():
        raise UsageError(f"{pki_dir} already exists: this host is already in a mesh")
    pki_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=pki_dir.parent, prefix=f".{pki_dir.name}."))
    try:
        for name, (data, mode) in files.items():
            _write_atomic(tmp / name, data, mode)
        os.chmod(tmp, 0o700)
        os.rename(tmp, pki_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(pki_dir.parent)


# --- certificates ------------------------------------------------------------------


def _now(now: float | None) -> dt.datetime:
    return dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _make_ca(host_name: str, now: float | None) -> CertificateAuthority:
    key = _new_key()
    start = _now(now)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "vmmesh CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, host_name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(start + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert, key)


def make_key_and_csr(host_name: str) -> tuple[bytes, bytes]:
    """A new host key and a CSR naming its node id; returns (key_pem, csr_pem)."""
    check_host_name(host_name)
    key = _new_key()
    node_id = node_id_of_key(key.public_key())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, node_id),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, host_name),
                ]
            )
        )
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def sign_csr(
    ca: CertificateAuthority,
    csr_pem: bytes,
    admin: bool = False,
    days: int = HOST_DAYS,
    now: float | None = None,
) -> bytes:
    """Issue a host certificate for a CSR; returns the certificate PEM.

    Only the CSR's key and host name are used: the node id (CN, SAN, serial)
    is recomputed from the key, so a joiner cannot claim another host's id.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise AuthError(f"malformed certificate request: {exc}") from None
    if not csr.is_signature_valid:
        raise AuthError("certificate request signature does not verify")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise AuthError("certificate request key is not ECDSA P-256")
    host_name = check_host_name(_name_attr(csr.subject, NameOID.ORGANIZATION_NAME) or "")
    node_id = node_id_of_key(public_key)
    start = _now(now)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, node_id),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, host_name),
                    x509.NameAttribute(
                        NameOID.ORGANIZATIONAL_UNIT_NAME, ROLE_ADMIN if admin else ROLE_HOST
                    ),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(serial_of_node(node_id))
        .not_valid_before(start - BACKDATE)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return _cert_pem(cert)


# --- web certificates -----------------------------------------------------------------
#
# The HTTPS page (``vmmesh.web``) needs certificates that browsers and Prometheus
# check by name, which host certificates (named by node id) cannot pass.  Neither
# kind can stand in for a host: the CN is never a node id (``cert_node_id``
# refuses it), the extended key usage is only the one side of TLS each serves, and
# the serial is random, since a host certificate's serial (its node id) stays its own.

WEB_DAYS = 90
CLIENT_DAYS = 365
ROLE_WEB = "web"
CLIENT_ROLES = ("viewer", "metrics")


def _leaf(
    ca: CertificateAuthority,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    usage: x509.ObjectIdentifier,
    *,
    sans: Sequence[x509.GeneralName],
    days: int,
    now: float | None,
) -> bytes:
    start = _now(now)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(leaf_serial())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return _cert_pem(builder.sign(ca.key, hashes.SHA256()))


def host_public_key(identity: Identity) -> bytes:
    """This host's public key as SubjectPublicKeyInfo DER (what ``sign_web_server`` takes)."""
    cert = x509.load_pem_x509_certificate(identity.host_cert_path.read_bytes())
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def sign_web_server(
    ca: CertificateAuthority,
    public_key_der: bytes,
    node_id: str,
    host_name: str,
    *,
    names: Sequence[str],
    days: int = WEB_DAYS,
    now: float | None = None,
) -> bytes:
    """An HTTPS server certificate for host ``node_id``'s own key naming ``names``
    (IP addresses and DNS names); AuthError if the key is not that host's."""
    try:
        public_key = serialization.load_der_public_key(public_key_der)
    except ValueError:
        raise AuthError("malformed public key") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise AuthError("web certificate key is not ECDSA P-256")
    if node_id_of_key(public_key) != node_id:
        raise AuthError(f"that key is not the key of node {node_id}")
    if not names:
        raise UsageError("a web certificate needs at least one address or name")
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"vmmesh web {check_host_name(host_name)}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, host_name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ROLE_WEB),
        ]
    )
    sans = [_san(n) for n in dict.fromkeys(names)]
    return _leaf(
        ca, subject, public_key, ExtendedKeyUsageOID.SERVER_AUTH, sans=sans, days=days, now=now
    )


def issue_client(
    ca: CertificateAuthority,
    role: str,
    label: str,
    days: int = CLIENT_DAYS,
    now: float | None = None,
) -> tuple[bytes, bytes]:
    """A new key and a client certificate carrying ``role`` as its OU; (key_pem, cert_pem)."""
    if role not in CLIENT_ROLES:
        raise UsageError(f"role must be one of {', '.join(CLIENT_ROLES)}, not {role!r:.40}")
    key = _new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"vmmesh {role} {label}"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]
    )
    cert = _leaf(
        ca, subject, key.public_key(), ExtendedKeyUsageOID.CLIENT_AUTH, sans=[], days=days, now=now
    )
    return _key_pem(key), cert


def cert_role(cert: x509.Certificate) -> str | None:
    """The client role a certificate carries (its OU), or None if it carries none."""
    role = _name_attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    return role if role in CLIENT_ROLES else None


# --- CRL ------------------------------------------------------------------------------


def _make_crl(
    ca: CertificateAuthority, number: int, serials: Sequence[int], now: float | None
) -> bytes:
    start = _now(now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(start - BACKDATE)
        .next_update(start + dt.timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(start - BACKDATE)
            .build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def verify_crl(ca_cert: x509.Certificate, crl_pem: bytes) -> tuple[int, frozenset[int]]:
    """Check a CRL is signed by ``ca_cert``; return (CRL number, revoked serials)."""
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
    except ValueError as exc:
        raise AuthError(f"malformed CRL: {exc}") from None
    ca_key = ca_cert.public_key()
    if crl.issuer != ca_cert.subject or not (
        isinstance(ca_key, ec.EllipticCurvePublicKey) and crl.is_signature_valid(ca_key)
    ):
        raise AuthError("CRL is not signed by this mesh's CA")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        raise AuthError("CRL has no CRL number") from None
    return number, frozenset(entry.serial_number for entry in crl)


def leaf_serial() -> int:
    """A random serial for a client or page certificate: 159 bits with the top one
    set, so that it can never be read as a host's node id (128 bits)."""
    return x509.random_serial_number() | 1 << 158


def is_node_serial(serial: int) -> bool:
    """Host certificates carry their node id (128 bits) as serial; client and page
    certificates a larger one (``leaf_serial``)."""
    return 0 < serial < 1 << 128


def revoked_node_ids(serials: frozenset[int]) -> frozenset[str]:
    """The hosts a CRL revokes (client certificates' serials are not hosts)."""
    return frozenset(node_of_serial(s) for s in serials if is_node_serial(s))


def load_ca_cert(pki_dir: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate((pki_dir / CA_CERT).read_bytes())
    except FileNotFoundError:
        raise NotInitialized(f"no mesh identity in {pki_dir}") from None


def load_ca(pki_dir: Path) -> CertificateAuthority:
    """The CA with its key; AuthError on hosts that do not hold ca.key."""
    cert = load_ca_cert(pki_dir)
    try:
        key = _load_key(pki_dir / CA_KEY)
    except FileNotFoundError:
        raise AuthError("this host does not hold the mesh CA key (not the admin host)") from None
    return CertificateAuthority(cert, key)


def current_crl(pki_dir: Path) -> bytes:
    return (pki_dir / CRL).read_bytes()


def revoke(pki_dir: Path, node_id: str, now: float | None = None) -> bytes:
    """Add ``node_id`` to the CRL (admin hosts only); returns the new CRL PEM."""
    return revoke_serial(pki_dir, serial_of_node(node_id), now)


def revoke_serial(pki_dir: Path, serial: int, now: float | None = None) -> bytes:
    """Add the certificate ``serial`` to the CRL (admin hosts only); returns the new CRL
    PEM.  A serial already on it gives the same list under the next number."""
    ca = load_ca(pki_dir)
    number, serials = verify_crl(ca.cert, current_crl(pki_dir))
    crl_pem = _make_crl(ca, number + 1, sorted({*serials, serial}), now)
    _write_atomic(pki_dir / CRL, crl_pem, 0o644)
    return crl_pem


def install_crl(pki_dir: Path, crl_pem: bytes) -> bool:
    """Install a CRL heard from a peer if our CA signed it and it is newer.

    Returns whether it was installed; raises AuthError for a CRL our CA did
    not sign (a peer of another mesh, or forged).
    """
    ca_cert = load_ca_cert(pki_dir)
    number, _ = verify_crl(ca_cert, crl_pem)
    current, _ = verify_crl(ca_cert, current_crl(pki_dir))
    if number <= current:
        return False
    _write_atomic(pki_dir / CRL, crl_pem, 0o644)
    return True


# --- mesh setup ---------------------------------------------------------------------


def init_mesh(pki_dir: Path, host_name: str, now: float | None = None) -> Identity:
    """Create a new mesh: CA, this (admin) host's certificate and an empty CRL."""
    check_host_name(host_name)
    ca = _make_ca(host_name, now)
    key_pem, csr_pem = make_key_and_csr(host_name)
    cert_pem = sign_csr(ca, csr_pem, admin=True, now=now)
    _install_dir(
        pki_dir,
        {
            CA_CERT: (_cert_pem(ca.cert), 0o644),
            CA_KEY: (_key_pem(ca.key), 0o600),
            HOST_CERT: (cert_pem, 0o644),
            HOST_KEY: (key_pem, 0o600),
            CRL: (_make_crl(ca, 1, [], now), 0o644),
        },
    )
    return load_identity(pki_dir)


def install_joined(
    pki_dir: Path, key_pem: bytes, cert_pem: bytes, ca_pem: bytes, crl_pem: bytes
) -> Identity:
    """Write the pki directory of a host that just joined, after checking it all."""
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise AuthError(f"inviter sent a malformed certificate: {exc}") from None
    key = serialization.load_pem_private_key(key_pem, password=None)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise AuthError("inviter sent a host certificate not signed by the mesh CA") from None
    if cert.public_key() != key.public_key():
        raise AuthError("inviter sent a certificate for another key")
    verify_crl(ca_cert, crl_pem)
    _install_dir(
        pki_dir,
        {
            CA_CERT: (ca_pem, 0o644),
            HOST_CERT: (cert_pem, 0o644),
            HOST_KEY: (key_pem, 0o600),
            CRL: (crl_pem, 0o644),
        },
    )
    return load_identity(pki_dir)


def load_identity(pki_dir: Path) -> Identity:
    """Read this host's identity; NotInitialized if there is none."""
    if not (pki_dir / HOST_CERT).exists():
        raise NotInitialized(f"no mesh identity in {pki_dir} (run `vmmesh init` or `vmmesh join`)")
    ca_cert = load_ca_cert(pki_dir)
    cert = x509.load_pem_x509_certificate((pki_dir / HOST_CERT).read_bytes())
    key = _load_key(pki_dir / HOST_KEY)
    node_id = cert_node_id(cert)
    if node_id_of_key(key.public_key()) != node_id:
        raise AuthError(f"{pki_dir / HOST_KEY} does not match {pki_dir / HOST_CERT}")
    return Identity(
        node_id=node_id,
        mesh_id=mesh_id_of(ca_cert),
        name=cert_host_name(cert),
        is_admin=cert_is_admin(cert),
        ca_fingerprint=fingerprint(ca_cert),
        pki_dir=pki_dir,
    )


# --- join tokens ------------------------------------------------------------------------


def split_address(address: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port); TokenError if malformed."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TokenError(f"bad address in join token: {address!r:.80}")
    return host, int(port)


@dataclass(frozen=True)
class JoinToken:
    """What `vmmesh invite` prints and `vmmesh join` needs."""

    ca_fingerprint: str
    secret: bytes
    addresses: tuple[str, ...]
    expires: int
    v: int = TOKEN_VERSION

    @property
    def mesh_id(self) -> str:
        return self.ca_fingerprint[:32]

    @property
    def secret_hash(self) -> str:
        return hashlib.sha256(self.secret).hexdigest()


def encode_token(token: JoinToken) -> str:
    packed: bytes = msgpack.packb(
        {
            "v": token.v,
            "f": bytes.fromhex(token.ca_fingerprint),
            "s": token.secret,
            "a": list(token.addresses),
            "e": token.expires,
        },
        use_bin_type=True,
    )
    return TOKEN_PREFIX + base64.urlsafe_b64encode(packed).decode("ascii").rstrip("=")


def decode_token(text: str) -> JoinToken:
    """Parse a join token; TokenError with a one-line reason if it is malformed."""
    text = text.strip()
    if not text.startswith(TOKEN_PREFIX) or len(text) > MAX_TOKEN_CHARS:
        raise TokenError("malformed join token: it must start with 'vmm1-'")
    body = text[len(TOKEN_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        obj: Any = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_ext_len=0)
    except (ValueError, binascii.Error, msgpack.UnpackException):
        raise TokenError("malformed join token: damaged encoding (copied incompletely?)") from None
    if not isinstance(obj, dict):
        raise TokenError("malformed join token: not a map")
    if obj.get("v") != TOKEN_VERSION:
        raise TokenError(f"join token version {obj.get('v')!r:.20} is not supported")
    fp, secret, addresses, expires = obj.get("f"), obj.get("s"), obj.get("a"), obj.get("e")
    if not isinstance(fp, bytes) or len(fp) != 32:
        raise TokenError("malformed join token: bad CA fingerprint")
    if not isinstance(secret, bytes) or len(secret) != 32:
        raise TokenError("malformed join token: bad secret")
    if (
        not isinstance(addresses, list)
        or not 0 < len(addresses) <= MAX_ADDRESSES
        or not all(isinstance(a, str) and len(a) < 300 for a in addresses)
    ):
        raise TokenError("malformed join token: bad address list")
    for address in addresses:
        split_address(address)
    if not isinstance(expires, int) or isinstance(expires, bool) or expires < 0:
        raise TokenError("malformed join token: bad expiry")
    return JoinToken(fp.hex(), secret, tuple(addresses), expires)


def generate_invite(
    identity: Identity, addresses: Sequence[str], ttl: int = 3600, now: float | None = None
) -> tuple[JoinToken, str]:
    """A new join token and the sha256 hex of its secret (the only part to store)."""
    if not addresses:
        raise UsageError("an invite needs at least one address the new host can reach")
    for address in addresses:
        split_address(address)
    start = time.time() if now is None else now
    token = JoinToken(
        ca_fingerprint=identity.ca_fingerprint,
        secret=secrets.token_bytes(32),
        addresses=tuple(addresses),
        expires=int(start + ttl),
    )
    return token, token.secret_hash
