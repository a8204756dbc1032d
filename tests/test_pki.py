"""Mesh CA, host certificates, CRL and join tokens (no network)."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from vmmesh.errors import AuthError, NotInitialized, TokenError, UsageError
from vmmesh.mesh import pki
from vmmesh.mesh.revocation import crl_to_adopt


@pytest.fixture
def mesh(tmp_path: Path) -> pki.Identity:
    return pki.init_mesh(tmp_path / "a" / "pki", "alpha")


def test_init_mesh_layout_and_modes(mesh: pki.Identity) -> None:
    d = mesh.pki_dir
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [pki.CA_CERT, pki.CA_KEY, pki.HOST_CERT, pki.HOST_KEY, pki.CRL]
    )
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for key in (mesh.ca_key_path, mesh.host_key_path):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert mesh.is_admin and mesh.holds_ca_key and mesh.name == "alpha"
    assert not list(d.parent.glob(".pki.*"))  # no temp dir left behind


def test_ids_are_derived(mesh: pki.Identity) -> None:
    cert = x509.load_pem_x509_certificate(mesh.host_cert_path.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert mesh.node_id == hashlib.sha256(spki).hexdigest()[:32]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == mesh.node_id
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [mesh.node_id]
    assert cert.serial_number == pki.serial_of_node(mesh.node_id)
    ca = x509.load_pem_x509_certificate(mesh.ca_cert_path.read_bytes())
    assert (
        mesh.ca_fingerprint
        == hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()
    )
    assert mesh.mesh_id == mesh.ca_fingerprint[:32]
    assert pki.load_identity(mesh.pki_dir) == mesh


def test_load_identity_absent(tmp_path: Path) -> None:
    with pytest.raises(NotInitialized):
        pki.load_identity(tmp_path / "nothing")


def test_init_twice_refused(mesh: pki.Identity) -> None:
    with pytest.raises(UsageError):
        pki.init_mesh(mesh.pki_dir, "alpha")


def test_bad_host_name() -> None:
    with pytest.raises(UsageError):
        pki.make_key_and_csr("../etc")


def test_sign_csr_takes_node_id_from_key(mesh: pki.Identity) -> None:
    ca = pki.load_ca(mesh.pki_dir)
    key_pem, csr_pem = pki.make_key_and_csr("beta")
    cert = x509.load_pem_x509_certificate(pki.sign_csr(ca, csr_pem))
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key.public_key() == cert.public_key()
    assert pki.cert_host_name(cert) == "beta" and not pki.cert_is_admin(cert)
    cert.verify_directly_issued_by(ca.cert)


def test_sign_csr_refuses_garbage(mesh: pki.Identity) -> None:
    with pytest.raises(AuthError):
        pki.sign_csr(pki.load_ca(mesh.pki_dir), b"-----BEGIN CERTIFICATE REQUEST-----\nxx")


def test_revoke_and_install_crl(tmp_path: Path, mesh: pki.Identity) -> None:
    ca_cert = pki.load_ca_cert(mesh.pki_dir)
    number, serials = pki.verify_crl(ca_cert, pki.current_crl(mesh.pki_dir))
    assert (number, serials) == (1, frozenset())
    old_crl = pki.current_crl(mesh.pki_dir)
    victim = "0123456789abcdef0123456789abcdef"
    crl = pki.revoke(mesh.pki_dir, victim)
    number, serials = pki.verify_crl(ca_cert, crl)
    assert number == 2 and pki.revoked_node_ids(serials) == {victim}
    assert pki.verify_crl(ca_cert, pki.revoke(mesh.pki_dir, mesh.node_id))[0] == 3

    # a member host installs only newer CRLs signed by its CA
    member = tmp_path / "member"
    member.mkdir()
    (member / pki.CA_CERT).write_bytes(mesh.ca_cert_path.read_bytes())
    (member / pki.CRL).write_bytes(old_crl)
    assert pki.install_crl(member, crl)
    assert not pki.install_crl(member, old_crl)
    assert pki.current_crl(member) == crl
    other = pki.init_mesh(tmp_path / "other", "gamma")
    with pytest.raises(AuthError):
        pki.install_crl(member, pki.revoke(other.pki_dir, victim))


def test_crl_to_adopt_only_a_newer_one_of_this_mesh(tmp_path: Path, mesh: pki.Identity) -> None:
    ca_cert = pki.load_ca_cert(mesh.pki_dir)
    victim = "0123456789abcdef0123456789abcdef"
    crl2 = pki.revoke(mesh.pki_dir, victim)
    assert crl_to_adopt(ca_cert, crl2, held=1) == 2
    assert crl_to_adopt(ca_cert, crl2, held=2) is None  # news this host has
    assert crl_to_adopt(ca_cert, crl2, held=3) is None
    other = pki.init_mesh(tmp_path / "other", "gamma")
    with pytest.raises(AuthError):
        crl_to_adopt(ca_cert, pki.revoke(other.pki_dir, victim), held=1)
    with pytest.raises(AuthError):
        crl_to_adopt(ca_cert, b"-----BEGIN X509 CRL-----\nxx", held=1)


def test_revoke_needs_ca_key(tmp_path: Path, mesh: pki.Identity) -> None:
    mesh.ca_key_path.unlink()
    with pytest.raises(AuthError, match="CA key"):
        pki.revoke(mesh.pki_dir, "0123456789abcdef0123456789abcdef")


def test_token_round_trip(mesh: pki.Identity) -> None:
    token, secret_hash = pki.generate_invite(
        mesh, ["10.0.0.1:7701", "[fe80::1]:7701"], ttl=60, now=1000
    )
    text = pki.encode_token(token)
    assert text.startswith("vmm1-") and "=" not in text
    back = pki.decode_token(text)
    assert back == token
    assert back.mesh_id == mesh.mesh_id and back.expires == 1060
    assert secret_hash == hashlib.sha256(back.secret).hexdigest()


@pytest.mark.parametrize(
    "text",
    ["", "vmm1-", "vmm2-abcd", "vmm1-!!!!", "vmm1-AAAA", "vmm1-" + "A" * 5000, "hello"],
)
def test_token_malformed(text: str) -> None:
    with pytest.raises(TokenError, match="join token"):
        pki.decode_token(text)


def test_token_truncated(mesh: pki.Identity) -> None:
    token, _ = pki.generate_invite(mesh, ["127.0.0.1:1"])
    text = pki.encode_token(token)
    with pytest.raises(TokenError):
        pki.decode_token(text[:-7])


def test_invite_needs_valid_addresses(mesh: pki.Identity) -> None:
    with pytest.raises(TokenError):
        pki.generate_invite(mesh, ["no-port"])
    with pytest.raises(UsageError):
        pki.generate_invite(mesh, [])
