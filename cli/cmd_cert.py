"""`vmmesh cert issue`: a client certificate of the mesh CA for the web page, as PEM files
(``--out DIR``, for Prometheus or curl) and/or a PKCS#12 bundle (``--p12 FILE``, for a
browser), encrypted with a random password that is printed once; its serial is printed
too.  `vmmesh cert revoke CERT|SERIAL` puts it on the mesh's CRL: every page refuses it
in the TLS handshake once the CRL has reached its host by gossip."""

from __future__ import annotations

import argparse
import os
import secrets
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from vmmesh.api.web import ISSUE, REVOKE_CERT, IssueReply, IssueRequest, RevokeCertRequest, Role
from vmmesh.config import Config
from vmmesh.errors import UsageError

from . import client
from .output import console, print_json


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def p12_bundle(reply: IssueReply, label: str, password: bytes) -> bytes:
    """The key, its certificate and the mesh CA as one PKCS#12 file, encrypted."""
    key = serialization.load_pem_private_key(reply.key, password=None)
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise UsageError("the node issued a key a browser's PKCS#12 cannot hold")
    return pkcs12.serialize_key_and_certificates(
        label.encode(),
        key,
        x509.load_pem_x509_certificate(reply.cert),
        [x509.load_pem_x509_certificate(reply.ca)],
        serialization.BestAvailableEncryption(password),
    )


def serial_of(what: str) -> str:
    """A certificate's serial as hex, from its PEM file or as typed."""
    path = Path(what)
    if path.is_file():
        try:
            pem = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError:
            raise UsageError(f"{what} is not a PEM certificate") from None
        return f"{pem.serial_number:x}"
    serial = what.lower().removeprefix("0x").replace(":", "")
    if not serial or len(serial) > 40 or any(c not in "0123456789abcdef" for c in serial):
        raise UsageError(f"{what!r:.60} is neither a certificate file nor a serial in hex")
    return serial.lstrip("0") or "0"


def revoke(args: argparse.Namespace, cfg: Config) -> int:
    if not args.what:
        raise UsageError("say which: vmmesh cert revoke CERT_FILE|SERIAL")
    reply = client.call(cfg, REVOKE_CERT, RevokeCertRequest(serial=serial_of(args.what)).checked())
    if args.json:
        print_json(reply)
    else:
        console.print(
            f"revoked certificate {reply.serial} (CRL #{reply.crl_number}); "
            "every page refuses it once the CRL reaches its host by gossip"
        )
    return 0


def cert(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "revoke":
        return revoke(args, cfg)
    if args.what:
        raise UsageError(f"unexpected argument {args.what!r:.60}: issue takes --role and --out")
    if args.role is None:
        raise UsageError("say which role: --role viewer|metrics")
    role = Role(args.role)
    label = args.label or role.value
    out: Path | None = args.out
    p12: Path | None = args.p12
    if out is None and p12 is None:
        raise UsageError("say where: --out DIR (PEM files) and/or --p12 FILE (for a browser)")
    files: dict[str, Path] = {}
    if out is not None:
        files = {"cert": out / f"{label}.crt", "key": out / f"{label}.key", "ca": out / "ca.crt"}
    if p12 is not None:
        files["p12"] = p12
    for what in ("cert", "key", "p12"):
        if what in files and files[what].exists():
            raise UsageError(f"{files[what]} exists: choose another path or --label")
    reply = client.call(cfg, ISSUE, IssueRequest(role=role, label=label).checked())
    serial = f"{x509.load_pem_x509_certificate(reply.cert).serial_number:x}"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _write(files["key"], reply.key, 0o600)
        _write(files["cert"], reply.cert, 0o644)
        if not files["ca"].exists():
            _write(files["ca"], reply.ca, 0o644)
    password = ""
    if p12 is not None:
        password = secrets.token_urlsafe(12)
        _write(p12, p12_bundle(reply, label, password.encode()), 0o600)
    if args.json:
        data: dict[str, Any] = {k: str(v) for k, v in files.items()}
        data |= {"role": role.value, "expires": reply.expires, "serial": serial}
        if password:
            data["p12_password"] = password
        print_json(data)
    else:
        until = time.strftime("%Y-%m-%d", time.gmtime(reply.expires))
        if out is not None:
            console.print(
                f"{role.value} certificate until {until}: {files['cert']}, key {files['key']}, "
                f"mesh CA {files['ca']}"
            )
        console.print(f"serial {serial} (to revoke it: vmmesh cert revoke {serial})")
        if p12 is not None:
            console.print(f"{role.value} certificate until {until} for a browser: {p12}")
            console.print("its password, shown only now (the browser asks for it on import):")
            print(password)
    return 0
