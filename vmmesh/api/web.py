"""The web page's certificates and logins: a host asks the CA holder for its HTTPS
certificate (``web.certify``, peer), ``vmmesh cert issue`` asks its node for a
client certificate with a role (``web.issue``, control), ``vmmesh cert revoke``
puts one on the mesh's CRL (``cert.revoke``, control), and ``vmmesh web`` asks
for a single-use login link for a browser (``web.login``, control)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vmmesh.api.codec import (
    Bytes,
    Choice,
    Empty,
    Float,
    Int,
    ListOf,
    Message,
    Method,
    Text,
    wire,
)

MAX_PEM = 16 << 10
MAX_SPKI = 1024
MAX_NAMES = 24
# An IP address (v4 or v6) or a DNS name, as a certificate's subjectAltName holds it.
SanName = Text(253, r"[0-9A-Za-z.:_-]{1,253}", "address or DNS name")
Label = Text(63, r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}", "label")
# A certificate serial as hex (RFC 5280: at most 20 octets); msgpack ints stop at 64 bits.
Serial = Text(40, r"[0-9a-f]{1,40}", "certificate serial (hex)")


class Role(enum.StrEnum):
    """What a client certificate lets its holder read on the page (its OU)."""

    VIEWER = "viewer"  # everything the page shows, read-only
    METRICS = "metrics"  # /metrics and /sd only


@dataclass(frozen=True)
class CertifyRequest(Message):
    """A host's HTTPS certificate for its own key (SubjectPublicKeyInfo DER)."""

    public_key: bytes = wire(Bytes(MAX_SPKI))
    names: tuple[str, ...] = wire(ListOf(SanName, MAX_NAMES))


@dataclass(frozen=True)
class CertifyReply(Message):
    cert: bytes = wire(Bytes(MAX_PEM))


@dataclass(frozen=True)
class IssueRequest(Message):
    role: Role = wire(Choice(Role))
    label: str = wire(Label, default="client")


@dataclass(frozen=True)
class IssueReply(Message):
    """A client certificate, its key and the mesh CA, all PEM."""

    cert: bytes = wire(Bytes(MAX_PEM))
    key: bytes = wire(Bytes(MAX_PEM))
    ca: bytes = wire(Bytes(MAX_PEM))
    role: Role = wire(Choice(Role))
    expires: float = wire(Float(0.0))


@dataclass(frozen=True)
class LoginReply(Message):
    """A login link: good once, until ``expires`` (unix time), on this node only."""

    url: str = wire(Text(2048))
    expires: float = wire(Float(0.0))


@dataclass(frozen=True)
class RevokeCertRequest(Message):
    """Put a client certificate of this mesh on its CRL, by serial."""

    serial: str = wire(Serial)


@dataclass(frozen=True)
class RevokeCertReply(Message):
    serial: str = wire(Serial)
    crl_number: int = wire(Int())


CERTIFY = Method("web.certify", CertifyRequest, CertifyReply)
ISSUE = Method("web.issue", IssueRequest, IssueReply)
LOGIN = Method("web.login", Empty, LoginReply)
REVOKE_CERT = Method("cert.revoke", RevokeCertRequest, RevokeCertReply)
