"""The join port's two methods (``vmmesh join``): fetch the CA, then trade a secret
for a certificate.  Anyone may connect to the join port, so these bodies are
small and strictly bounded."""

from __future__ import annotations

from dataclasses import dataclass

from vmmesh.api.codec import Bytes, Empty, Message, Method, wire
from vmmesh.api.names import HexId, HostName

MAX_PEM = 16 << 10
MAX_CSR = 8192
MAX_CRL = 256 << 10
SECRET_BYTES = 32


@dataclass(frozen=True)
class HelloReply(Message):
    ca: bytes = wire(Bytes(MAX_PEM))
    mesh: str = wire(HexId)


@dataclass(frozen=True)
class JoinRequest(Message):
    secret: bytes = wire(Bytes(SECRET_BYTES, min_len=SECRET_BYTES))
    csr: bytes = wire(Bytes(MAX_CSR))
    name: str = wire(HostName)


@dataclass(frozen=True)
class JoinReply(Message):
    cert: bytes = wire(Bytes(MAX_PEM))
    ca: bytes = wire(Bytes(MAX_PEM))
    crl: bytes = wire(Bytes(MAX_CRL))
    mesh: str = wire(HexId)


HELLO = Method("join.hello", Empty, HelloReply)
JOIN = Method("join.request", JoinRequest, JoinReply)
