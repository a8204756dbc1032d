"""Joining a mesh with a one-time token.

Theory of operation: the joiner has no certificate and no CA yet, only the
token (CA fingerprint, one-time secret, inviter addresses, expiry).  The
inviter listens on a separate join port with server-only TLS.  The joiner

1. connects without CA verification and calls ``join.hello``, which returns
   the CA certificate;
2. pins it: sha256(CA DER) must equal the token's fingerprint, and the
   server's TLS certificate must be signed by that CA (so the handshake
   proved the server holds a mesh host key) - only then does the secret
   leave the joiner;
3. calls ``join.request`` with {secret, csr, name}.  The inviter checks the
   CSR, consumes the invite by the secret's sha256 (``consume_invite`` is
   the node's sqlite-backed ``InviteBook.consume``; it raises TokenError
   when the token is unknown, used or expired) and answers with the host
   certificate, the CA certificate, the current CRL and the mesh id;
4. writes its pki directory in one rename (``pki.install_joined``).

The join port speaks the same framed RPC as the mesh port, with a small
frame limit and a deadline per connection: anyone may connect to it.
"""

from __future__ import annotations

import hashlib
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from vmmesh.api.codec import Empty
from vmmesh.api.join import HELLO, JOIN, HelloReply, JoinReply, JoinRequest
from vmmesh.errors import AuthError, PeerUnavailable, TokenError, UsageError, VmmeshError
from vmmesh.mesh.pki import (
    Identity,
    check_host_name,
    current_crl,
    decode_token,
    fingerprint,
    install_joined,
    load_ca,
    make_key_and_csr,
    sign_csr,
    split_address,
)
from vmmesh.net.rpc import Context, Handlers, RpcConnection, open_rpc
from vmmesh.net.tls import PeerHandler, open_peer

JOIN_MAX_FRAME = 64 << 10
JOIN_DEADLINE = 60.0

ConsumeInvite = Callable[[str, float], None]


def join_server_context(identity: Identity) -> ssl.SSLContext:
    """Server-auth-only TLS 1.3 for the join port (joiners have no certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_NONE
    ctx.num_tickets = 0
    ctx.load_cert_chain(identity.host_cert_path, identity.host_key_path)
    return ctx


def join_client_context() -> ssl.SSLContext:
    """No CA verification: the joiner pins the CA by fingerprint after the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class MemoryInviteBook:
    """In-memory stand-in for the node's sqlite ``InviteBook`` (same methods)."""

    def __init__(self) -> None:
        self.expires: dict[str, float] = {}
        self.used: set[str] = set()

    def add(self, secret_hash: str, now: float, expires: float) -> None:
        self.expires[secret_hash] = expires

    def consume(self, secret_hash: str, now: float, used_by: str = "") -> None:
        if secret_hash not in self.expires:
            raise TokenError("join token unknown to the inviting host")
        if secret_hash in self.used:
            raise TokenError("join token already used")
        if now > self.expires[secret_hash]:
            raise TokenError("join token expired")
        self.used.add(secret_hash)


def join_handler(
    pki_dir: Path,
    consume_invite: ConsumeInvite,
    *,
    clock: Callable[[], float] = time.time,
    deadline: float = JOIN_DEADLINE,
) -> PeerHandler:
    """The ``serve_peers`` handler for the join port of an admin host."""

    async def hello(ctx: Context, body: Empty) -> HelloReply:
        ca = load_ca(pki_dir)
        return HelloReply(ca=ca.cert.public_bytes(serialization.Encoding.PEM), mesh=ca.mesh_id)

    async def request(ctx: Context, req: JoinRequest) -> JoinReply:
        ca = load_ca(pki_dir)
        cert_pem = sign_csr(ca, req.csr, admin=False, now=clock())
        consume_invite(hashlib.sha256(req.secret).hexdigest(), clock())
        return JoinReply(
            cert=cert_pem,
            ca=ca.cert.public_bytes(serialization.Encoding.PEM),
            crl=current_crl(pki_dir),
            mesh=ca.mesh_id,
        )

    handlers = Handlers()
    handlers.add(HELLO, hello)
    handlers.add(JOIN, request)

    async def handle(stream: trio.SSLStream[trio.SocketStream], peer: str) -> None:
        with trio.move_on_after(deadline):
            await RpcConnection(stream, peer, handlers, max_frame=JOIN_MAX_FRAME).run()

    return handle


async def join_mesh(
    token_str: str, pki_dir: Path, host_name: str, *, now: float | None = None
) -> Identity:
    """Join the mesh a token invites to; writes ``pki_dir`` and returns the identity.

    Every failure is one clear line: TokenError ("join token already used",
    "join token expired"), AuthError ("CA fingerprint mismatch: ..."),
    PeerUnavailable ("cannot reach inviter at ...").
    """
    token = decode_token(token_str)
    check_host_name(host_name)
    if (time.time() if now is None else now) > token.expires:
        raise TokenError("join token expired")
    if await trio.Path(pki_dir).exists():
        raise UsageError(f"{pki_dir} already exists: this host is already in a mesh")
    key_pem, csr_pem = make_key_and_csr(host_name)
    reasons: list[str] = []
    for address in token.addresses:
        host, port = split_address(address)
        try:
            stream = await open_peer(host, port, None, context=join_client_context())
        except (PeerUnavailable, AuthError) as exc:
            reasons.append(str(exc))
            continue
        with trio.move_on_after(JOIN_DEADLINE) as deadline:
            async with open_rpc(stream, f"inviter {address}", max_frame=JOIN_MAX_FRAME) as conn:
                try:
                    ca_pem = (await conn.request(HELLO, Empty())).ca
                    _check_inviter(stream, ca_pem, token.ca_fingerprint, address)
                    request = JoinRequest(secret=token.secret, csr=csr_pem, name=host_name)
                    answer = await conn.request(JOIN, request)
                except (AuthError, PeerUnavailable):
                    raise  # a token refused, a CA that does not match: said as they are
                except VmmeshError as exc:
                    raise AuthError(f"inviter at {address} refused: {exc}") from None
        if deadline.cancelled_caught:
            raise PeerUnavailable(f"inviter at {address} did not answer in {JOIN_DEADLINE:.0f} s")
        if answer.ca != ca_pem:
            raise AuthError(f"inviter at {address} changed its CA certificate mid-join")
        cert_pem, crl_pem = answer.cert, answer.crl
        return await trio.to_thread.run_sync(
            install_joined, pki_dir, key_pem, cert_pem, ca_pem, crl_pem
        )
    raise PeerUnavailable(
        f"cannot reach inviter at {', '.join(token.addresses)}: {'; '.join(reasons)}"
    )


def _check_inviter(
    stream: trio.SSLStream[trio.SocketStream], ca_pem: bytes, expected_fp: str, address: str
) -> None:
    """Pin the CA by fingerprint and check the TLS server is a host of that CA."""
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise AuthError(f"inviter at {address} sent a malformed CA certificate") from None
    got = fingerprint(ca_cert)
    if got != expected_fp:
        raise AuthError(
            f"CA fingerprint mismatch: inviter at {address} has {got[:16]}..., "
            f"the token expects {expected_fp[:16]}..."
        )
    der = stream.getpeercert(binary_form=True)
    try:
        leaf = x509.load_der_x509_certificate(der or b"")
        leaf.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise AuthError(
            f"inviter at {address} presented a TLS certificate not signed by the mesh CA"
        ) from None
