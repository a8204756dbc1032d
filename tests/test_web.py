"""The web page without sockets: its certificates, the metrics collector and service
discovery, who may read what, HTTP/1.1 over memory streams, TLS refusals.  Logins,
sessions, the page and its event stream: tests/test_web_page.py."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import shutil
import socket
import ssl
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client.parser import text_string_to_metric_families

from vmmesh.api.codec import Empty, WireType
from vmmesh.api.figures import Unit, counter, gauge
from vmmesh.api.host import Capacity, TemplateInfo, WorkItem, WorkKind
from vmmesh.api.node import PEERS, STATUS, PeerRow, PeersReply, StatusReply
from vmmesh.api.vm import LIST, VmList, VmRow
from vmmesh.api.web import (
    CERTIFY,
    CertifyReply,
    CertifyRequest,
    IssueReply,
    IssueRequest,
    Role,
)
from vmmesh.config import Config
from vmmesh.errors import AuthError, StateError, UsageError
from vmmesh.gossip.core import EventKind
from vmmesh.gossip.hoststate import HostState, HostView
from vmmesh.mesh import pki
from vmmesh.net.rpc import Context, Handlers, LocalContext
from vmmesh.web import certs
from vmmesh.web.app import GZIP_MIN, Response, accepts_gzip, compressed, respond
from vmmesh.web.metrics import Figures, render, sd_targets
from vmmesh.web.server import serve_connection, serve_tls_connection, server_context
from vmmesh.web.service import WebService
from vmmesh.web.vmstats import VmUsage
from vmmesh_cli.cmd_cert import p12_bundle

CAP = Capacity(
    cores=4,
    memory_mb=8192,
    storage_quota_mb=20000,
    storage_free_mb=15000,
    free_vm_slots=6,
    free_disk_slots=3,
)
IDS = ["a" * 32, "b" * 32, "c" * 32, "d" * 32, "e" * 32]


@pytest.fixture
def mesh(tmp_path: Path) -> pki.Identity:
    return pki.init_mesh(tmp_path / "a" / "pki", "alpha")


def _joined(tmp_path: Path, mesh: pki.Identity, name: str) -> pki.Identity:
    key, csr = pki.make_key_and_csr(name)
    ca = pki.load_ca(mesh.pki_dir)
    cert = pki.sign_csr(ca, csr)
    ca_pem = mesh.ca_cert_path.read_bytes()
    return pki.install_joined(
        tmp_path / name / "pki", key, cert, ca_pem, mesh.crl_path.read_bytes()
    )


# --- certificates ------------------------------------------------------------------


def test_web_certificate_names_addresses_and_is_no_host_certificate(
    tmp_path: Path, mesh: pki.Identity
) -> None:
    beta = _joined(tmp_path, mesh, "beta")
    ca = pki.load_ca(mesh.pki_dir)
    pem = pki.sign_web_server(
        ca,
        pki.host_public_key(beta),
        beta.node_id,
        "beta",
        names=["10.0.0.2", "fd00::2", "beta", "localhost"],
    )
    cert = x509.load_pem_x509_certificate(pem)
    assert certs.cert_names(cert) == {"10.0.0.2", "fd00::2", "beta", "localhost"}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.serial_number != pki.serial_of_node(beta.node_id)
    with pytest.raises(AuthError):
        pki.cert_node_id(cert)  # never taken for a host on the mesh port
    cert.verify_directly_issued_by(ca.cert)


def test_web_certificate_only_for_the_callers_own_key(tmp_path: Path, mesh: pki.Identity) -> None:
    beta = _joined(tmp_path, mesh, "beta")
    ca = pki.load_ca(mesh.pki_dir)
    with pytest.raises(AuthError, match="not the key of node"):
        pki.sign_web_server(ca, pki.host_public_key(beta), mesh.node_id, "alpha", names=["x"])
    with pytest.raises(AuthError):
        pki.sign_web_server(ca, b"garbage", beta.node_id, "beta", names=["x"])


def test_client_certificate_carries_its_role(mesh: pki.Identity) -> None:
    ca = pki.load_ca(mesh.pki_dir)
    _key, pem = pki.issue_client(ca, "metrics", "prom")
    cert = x509.load_pem_x509_certificate(pem)
    assert pki.cert_role(cert) == "metrics"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(AuthError):
        pki.cert_node_id(cert)
    with pytest.raises(UsageError):
        pki.issue_client(ca, "admin", "x")
    host = x509.load_pem_x509_certificate(mesh.host_cert_path.read_bytes())
    assert pki.cert_role(host) is None  # a host certificate is no page role


def test_renewal_when_missing_renamed_or_expiring(tmp_path: Path, mesh: pki.Identity) -> None:
    ca = pki.load_ca(mesh.pki_dir)
    names = certs.wanted_names(["10.0.0.1"], "alpha")
    assert names == ["10.0.0.1", "alpha", "localhost", "127.0.0.1"]
    now = dt.datetime.now(dt.UTC)
    assert certs.needs_renewal(None, names, now) == "none yet"
    spki = pki.host_public_key(mesh)
    cert = x509.load_pem_x509_certificate(
        pki.sign_web_server(ca, spki, mesh.node_id, "alpha", names=names)
    )
    assert certs.needs_renewal(cert, names, now) is None
    assert certs.needs_renewal(cert, ["10.0.0.9", *names[1:]], now) == "its names changed"
    assert certs.needs_renewal(cert, names, now + dt.timedelta(days=70)) == "it expires soon"


def test_the_ca_holder_is_asked_first(mesh: pki.Identity) -> None:
    hosts = [
        HostView(IDS[0], "zeta", "up", CAP),
        HostView(IDS[1], "alpha", "up", CAP),
        HostView(IDS[2], "beta", "down", CAP),
        HostView(IDS[3], "me", "up", CAP),
    ]
    assert certs.ca_holder_name(mesh.ca_cert_path) == "alpha"
    assert certs.signers(hosts, IDS[3], "alpha") == [IDS[1], IDS[0]]


def test_web_port_default_and_off() -> None:
    assert Config(port=7400).web_listen_port == 7402
    assert Config(port=7400, web_port=9443).web_listen_port == 9443
    assert Config(web_port=-1).web_listen_port is None


# --- metrics and discovery ------------------------------------------------------------


def _status() -> StatusReply:
    return StatusReply(
        node_id=IDS[0],
        name="alpha",
        mesh_id="e" * 32,
        admin=True,
        address="10.0.0.1",
        addresses=("10.0.0.1",),
        port=7400,
        uptime=100.0,
        generation=1,
        peers_total=3,
        peers_up=1,
        capacity=CAP,
        templates=1,
        vms=("web-1",),
        crl_number=1,
        data_dir="/x",
        refusals={"tls": 2, "gossip": 0},
        figures=FIGURES,
    )


DONE = "Migrations this host ran as the source, by result."
FIGURES = (  # as the node and its extensions publish them (their own tests check that)
    counter("gossip_messages", "Gossip messages.", 10, direction="in"),
    counter("gossip_messages", "Gossip messages.", 12, direction="out"),
    counter("gossip_bytes", "Gossip bytes.", 900, Unit.BYTES, direction="in"),
    counter("migrations", DONE, 3, result="done"),
    counter("migrations", DONE, 1, result="failed"),
    gauge("migrations_active", "Migrations under way.", 1),
    counter("transfer_received_bytes", "Bytes fetched.", 7 << 20, Unit.BYTES),
    gauge("transfers_active", "Fetches under way.", 1),
    *(gauge("jobs", "Jobs by state.", n, state=st) for st, n in (("placing", 0), ("running", 1))),
    counter("job_commands", "Commands by result.", 5, result="ok"),
)


MOVE = WorkItem(kind=WorkKind.MIGRATION, name="web-2", fraction=0.5, done=5, total=10,
                rate=2e6, peer="alpha")  # fmt: skip


def _hosts() -> list[HostView]:
    tpl = TemplateInfo(
        template_id="f" * 32, base_image_id="0" * 32, packages=frozenset(), warm=True
    )
    return [
        HostView(
            IDS[0], "alpha", "up", CAP, templates=(tpl,), vms=("web-1",), address="10.0.0.1:7400"
        ),
        HostView(
            IDS[1],
            "beta",
            "up",
            CAP,
            draining=True,
            address="10.0.0.2:7400",
            last_heard=5.0,
            work=(MOVE, MOVE),
        ),
        HostView(IDS[2], "gamma", "suspect", CAP, address="10.0.0.3:7400", last_heard=4.0),
        HostView(IDS[3], "delta", "down", CAP, address="10.0.0.4:7400", last_heard=3.0),
    ]


def _vm(name: str, state: str) -> VmRow:
    return VmRow(
        name=name, vm_id="1" * 32, request="web", host="alpha", node_id=IDS[0], state=state
    )


def _figures() -> Figures:
    return Figures(
        status=_status(),
        hosts=_hosts(),
        now=1000.0,
        vms=[_vm("web-1", "running"), _vm("web-2", "running"), _vm("web-3", "stopped")],
        web_refusals={"tls": 1, "role": 0},
        usage=[VmUsage("web-1", 4242, 12.5, 300 << 20, 5 << 20, 1 << 20, 40, 8)],
    )


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _status_of(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> str:
    on = [
        dict(labels)["status"]
        for (metric, labels), v in samples.items()
        if metric == "vmmesh_member_status" and dict(labels)["member"] == name and v == 1
    ]
    assert len(on) == 1, on
    return on[0]


def test_metrics_say_each_members_state_and_capacity() -> None:
    samples = _samples(render(_figures()).decode())
    assert [_status_of(samples, n) for n in ("alpha", "beta", "gamma", "delta")] == [
        "up",
        "draining",
        "suspect",
        "down",
    ]
    alpha = (("member", "alpha"), ("member_id", IDS[0]))
    assert samples[("vmmesh_member_cores", alpha)] == 4
    assert samples[("vmmesh_member_memory_bytes", alpha)] == 8192 * 2**20
    assert samples[("vmmesh_member_storage_quota_bytes", alpha)] == 20000 * 2**20
    assert samples[("vmmesh_member_free_slots", alpha)] == 3
    assert samples[("vmmesh_member_templates", alpha)] == 1
    assert samples[("vmmesh_member_warm_templates", alpha)] == 1
    assert samples[("vmmesh_vms", (("state", "running"),))] == 2
    assert samples[("vmmesh_migrations_total", (("result", "done"),))] == 3
    assert samples[("vmmesh_refusals_total", (("cause", "tls"),))] == 2
    assert samples[("vmmesh_node_start_time_seconds", ())] == 900.0
    move = (("kind", "migration"), ("member", "beta"), ("name", "web-2"), ("peer", "alpha"))
    assert samples[("vmmesh_member_work_fraction", move)] == 0.5
    assert samples[("vmmesh_member_work_done", move)] == 5
    assert samples[("vmmesh_member_work_size", move)] == 10
    assert samples[("vmmesh_member_work_rate_bytes_per_second", move)] == 2e6
    info = [k for k in samples if k[0] == "vmmesh_node_info"]
    assert dict(info[0][1])["admin"] == "true"


def test_metrics_pass_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus) is not installed")
    run = subprocess.run(
        [promtool, "check", "metrics"], input=render(_figures()), capture_output=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_sd_lists_up_hosts_at_their_web_port() -> None:
    groups = json.loads(sd_targets(_hosts(), "e" * 32, 2))
    assert [g["targets"] for g in groups] == [["10.0.0.1:7402"], ["10.0.0.2:7402"]]
    assert groups[0]["labels"]["__meta_vmmesh_member"] == "alpha"


def test_sd_follows_each_hosts_gossiped_web_port() -> None:
    alpha, beta, *_ = _hosts()
    hosts = [
        replace(alpha, web_port=9443),  # its own port, whatever the offset
        replace(beta, web_port=0),  # its page is off: not a target
        HostView(IDS[4], "epsilon", "up", CAP, address="10.0.0.5:7400"),  # older: guessed
    ]
    groups = json.loads(sd_targets(hosts, "e" * 32, 2))
    assert [g["targets"] for g in groups] == [["10.0.0.1:9443"], ["10.0.0.5:7402"]]


# --- who may read what -------------------------------------------------------------------


class FakePages:
    """Bodies of fixed text; ``good`` is the one login token, ``open`` the one session."""

    def __init__(self) -> None:
        self.metrics_calls = 0
        self.snapshots = 0
        self.change = trio.Event()

    async def metrics(self) -> bytes:
        self.metrics_calls += 1
        return b"vmmesh_x 1\n"

    async def sd(self) -> bytes:
        return b"[]"

    async def api(self, name: str) -> WireType | None:
        return _status() if name == "status" else None

    def login(self, token: str) -> str | None:
        return "s=open; HttpOnly" if token == "good" else None

    def session(self, cookies: list[str]) -> bool:
        return "s=open" in cookies

    async def snapshot(self) -> bytes:
        self.snapshots += 1
        return b'{"n":%d}' % self.snapshots

    def changes(self) -> int:
        return 0

    async def wait_change(self, timeout: float, since: int) -> None:
        with trio.move_on_after(timeout):
            await self.change.wait()
        self.change = trio.Event()


@pytest.mark.parametrize(
    ("role", "path", "status"),
    [
        (Role.METRICS, "/metrics", 200),
        (Role.METRICS, "/sd", 200),
        (Role.METRICS, "/api/v1/status", 403),
        (Role.METRICS, "/", 403),
        (None, "/metrics", 403),
        (Role.VIEWER, "/metrics", 200),
        (Role.VIEWER, "/api/v1/status", 200),
        (Role.VIEWER, "/api/v1/nothing", 404),
        (Role.VIEWER, "/", 200),
        (Role.VIEWER, "/events", 200),
        (Role.METRICS, "/events", 403),
    ],
)
async def test_roles(role: Role | None, path: str, status: int) -> None:
    refused: list[str] = []
    resp = await respond(FakePages(), "GET", path, role, refused.append)
    assert resp.status == status
    assert refused == (["role"] if status == 403 else [])


@pytest.mark.parametrize("path", ["/", "/metrics", "/sd", "/events", "/api/v1/status", "/x"])
async def test_no_certificate_and_no_session_is_401_everywhere(path: str) -> None:
    refused: list[str] = []
    resp = await respond(FakePages(), "GET", path, None, refused.append, anonymous=True)
    assert resp.status == 401 and refused == ["login"]


async def test_api_body_is_the_clis_json() -> None:
    resp = await respond(FakePages(), "GET", "/api/v1/status?x=1", Role.VIEWER)
    body = json.loads(resp.body)
    assert "v" not in body and body["node_id"] == IDS[0] and body["capacity"]["free_slots"] == 3


async def test_read_only() -> None:
    assert (await respond(FakePages(), "POST", "/metrics", Role.VIEWER)).status == 405


# --- HTTP/1.1 over a stream -------------------------------------------------------------


async def _exchange(
    raw: bytes, role: Role | None = Role.METRICS, pages: FakePages | None = None
) -> bytes:
    server, client = trio.testing.memory_stream_pair()

    async def serve() -> None:
        await serve_connection(server, role, pages or FakePages(), certified=role is not None)
        await server.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await client.send_all(raw)
        await client.send_eof()
        out = b""
        while chunk := await client.receive_some(65536):
            out += chunk
    return out


async def test_two_requests_on_one_connection() -> None:
    req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    out = await _exchange(req + req.replace(b"GET", b"HEAD"))
    assert out.count(b"HTTP/1.1 200") == 2
    assert out.count(b"vmmesh_x 1") == 1  # HEAD: headers only
    assert b"content-type: text/plain; version=0.0.4" in out


@pytest.mark.parametrize(
    ("header", "takes"),
    [("gzip", True), ("deflate, gzip;q=1.0, *;q=0.5", True), ("gzip;q=0", False),
     ("identity", False), ("", False), ("*", True), ("gzip;q=x", False)],
)  # fmt: skip
def test_accept_encoding_is_read_as_http_says(header: str, takes: bool) -> None:
    assert accepts_gzip(header) is takes


def test_a_big_body_goes_gzipped_to_who_takes_it_a_small_one_and_events_never() -> None:
    big = Response(200, b"vmmesh_x 1\n" * 1000)
    out = compressed(big, "gzip")
    assert gzip.decompress(out.body) == big.body and len(out.body) < len(big.body) // 10
    assert ("content-encoding", "gzip") in out.headers
    assert compressed(big, "identity") is big
    small = Response(200, b"x" * (GZIP_MIN - 1))
    assert compressed(small, "gzip") is small
    stream = Response(200, b"x" * 5000, events=True)
    assert compressed(stream, "gzip") is stream


async def test_garbage_gets_400_and_the_connection_ends() -> None:
    out = await _exchange(b"\x16\x03\x01 not http\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400")


async def test_forbidden_over_the_wire() -> None:
    out = await _exchange(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 403")


async def test_without_certificate_a_session_cookie_is_a_viewer() -> None:
    ask = b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n%s\r\n"
    assert (await _exchange(ask % b"", None)).startswith(b"HTTP/1.1 401")
    wrong = await _exchange(ask % b"Cookie: s=stale\r\n", None)
    assert wrong.startswith(b"HTTP/1.1 401")
    out = await _exchange(ask % b"Cookie: s=open\r\n", None)
    assert out.startswith(b"HTTP/1.1 200") and IDS[0].encode() in out


async def test_a_login_link_sets_the_cookie_and_sends_the_browser_home() -> None:
    out = await _exchange(b"GET /login?token=good HTTP/1.1\r\nHost: x\r\n\r\n", None)
    head = out.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 303") and b"\r\nlocation: /\r\n" in head
    assert b"\r\nset-cookie: s=open; httponly\r\n" in head
    assert b"referrer-policy: no-referrer" in head  # the link never leaves in a Referer
    bad = await _exchange(b"GET /login?token=used HTTP/1.1\r\nHost: x\r\n\r\n", None)
    assert bad.startswith(b"HTTP/1.1 401") and b"set-cookie" not in bad.lower()


# --- TLS: who gets in -------------------------------------------------------------------


def _server_ctx(ident: pki.Identity) -> ssl.SSLContext:
    return server_context(
        str(ident.host_cert_path),
        str(ident.host_key_path),
        str(ident.ca_cert_path),
        str(ident.crl_path),
    )


def _client_ctx(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False  # the host certificate names a node id; tested by the lab
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _write_client(tmp_path: Path, key: bytes, cert: bytes) -> tuple[Path, Path]:
    (tmp_path / "c.key").write_bytes(key)
    (tmp_path / "c.crt").write_bytes(cert)
    return tmp_path / "c.crt", tmp_path / "c.key"


async def _get_over_tls(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> Response | str:
    a, b = trio.testing.memory_stream_pair()
    server = trio.SSLStream(a, server_ctx, server_side=True)
    client = trio.SSLStream(b, client_ctx, server_hostname="x")
    result: list[Response | str] = []

    async def serve() -> None:
        try:
            await server.do_handshake()
        except trio.BrokenResourceError:
            await server.transport_stream.send_all(server._outgoing.read())
            await server.transport_stream.aclose()
            return
        await serve_tls_connection(server, FakePages())
        await server.aclose()

    async def ask() -> None:
        try:
            await client.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            out = await client.receive_some(65536)
        except trio.BrokenResourceError as exc:
            result.append(f"refused: {exc.__cause__}")
            return
        await client.aclose()
        status = int(out.split(b" ", 2)[1])
        result.append(Response(status, bytes(out).split(b"\r\n\r\n", 1)[1]))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(ask)
    return result[0]


async def test_a_metrics_certificate_gets_in(tmp_path: Path, mesh: pki.Identity) -> None:
    key, cert = pki.issue_client(pki.load_ca(mesh.pki_dir), "metrics", "prom")
    crt, k = _write_client(tmp_path, key, cert)
    got = await _get_over_tls(_server_ctx(mesh), _client_ctx(mesh.ca_cert_path, crt, k))
    assert isinstance(got, Response) and got.status == 200 and got.body == b"vmmesh_x 1\n"


async def test_no_certificate_is_refused(mesh: pki.Identity) -> None:
    """Asked for, not required (a browser with a session comes without one): refused
    at the HTTP layer instead of the handshake."""
    got = await _get_over_tls(_server_ctx(mesh), _client_ctx(mesh.ca_cert_path))
    assert isinstance(got, Response) and got.status == 401


async def test_a_foreign_ca_is_refused(tmp_path: Path, mesh: pki.Identity) -> None:
    other = pki.init_mesh(tmp_path / "other" / "pki", "other")
    key, cert = pki.issue_client(pki.load_ca(other.pki_dir), "viewer", "x")
    crt, k = _write_client(tmp_path, key, cert)
    got = await _get_over_tls(_server_ctx(mesh), _client_ctx(mesh.ca_cert_path, crt, k))
    assert isinstance(got, str) and "UNKNOWN_CA" in got.upper()


async def test_a_revoked_certificate_is_still_refused_in_the_handshake(
    tmp_path: Path, mesh: pki.Identity
) -> None:
    """Optional does not mean unchecked: a certificate presented is checked against the CRL."""
    beta = _joined(tmp_path, mesh, "beta")
    pki.revoke(mesh.pki_dir, beta.node_id)
    ctx = _client_ctx(mesh.ca_cert_path, beta.host_cert_path, beta.host_key_path)
    got = await _get_over_tls(_server_ctx(mesh), ctx)
    assert isinstance(got, str) and "REVOKED" in got.upper()


async def test_a_revoked_client_certificate_is_refused_and_revokes_no_host(
    tmp_path: Path, mesh: pki.Identity
) -> None:
    """`vmmesh cert revoke`: the client's serial goes on the CRL; it can never be read as
    a host's node id (client serials have their top bit, 158, set)."""
    key, cert = pki.issue_client(pki.load_ca(mesh.pki_dir), "viewer", "leaked")
    serial = x509.load_pem_x509_certificate(cert).serial_number
    assert serial >> 158 == 1 and not pki.is_node_serial(serial)
    crt, k = _write_client(tmp_path, key, cert)
    ok = await _get_over_tls(_server_ctx(mesh), _client_ctx(mesh.ca_cert_path, crt, k))
    assert isinstance(ok, Response) and ok.status == 200
    pem = pki.revoke_serial(mesh.pki_dir, serial)
    number, serials = pki.verify_crl(pki.load_ca_cert(mesh.pki_dir), pem)
    assert serial in serials and pki.revoked_node_ids(serials) == frozenset()
    got = await _get_over_tls(_server_ctx(mesh), _client_ctx(mesh.ca_cert_path, crt, k))
    assert isinstance(got, str) and "REVOKED" in got.upper()
    again = pki.revoke_serial(mesh.pki_dir, serial)  # twice: the same list, a newer number
    assert pki.verify_crl(pki.load_ca_cert(mesh.pki_dir), again) == (number + 1, serials)


def test_the_cli_reads_a_serial_from_a_certificate_or_as_typed(
    tmp_path: Path, mesh: pki.Identity
) -> None:
    from vmmesh_cli.cmd_cert import serial_of

    _, cert = pki.issue_client(pki.load_ca(mesh.pki_dir), "metrics", "m")
    (tmp_path / "m.crt").write_bytes(cert)
    serial = x509.load_pem_x509_certificate(cert).serial_number
    assert serial_of(str(tmp_path / "m.crt")) == f"{serial:x}"
    assert serial_of("0x00AB:CD") == "abcd"
    for bad in ("", "xyz", "a" * 41, str(tmp_path / "nothing-here")):
        with pytest.raises(UsageError):
            serial_of(bad)
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(UsageError, match="not a PEM certificate"):
        serial_of(str(tmp_path / "junk.crt"))


async def test_a_host_certificate_has_no_role(mesh: pki.Identity) -> None:
    ctx = _client_ctx(mesh.ca_cert_path, mesh.host_cert_path, mesh.host_key_path)
    got = await _get_over_tls(_server_ctx(mesh), ctx)
    assert isinstance(got, Response) and got.status == 403


# --- the extension, with a fake node ---------------------------------------------------


class FakePool:
    """Calls from ``caller`` to the other fake nodes' web services."""

    def __init__(self, services: dict[str, WebService], caller: str = "") -> None:
        self.services, self.caller = services, caller
        self.asked: list[str] = []

    async def call(
        self, node_id: str, method: Any, request: Any, timeout: float = 30.0
    ) -> CertifyReply:
        assert method is CERTIFY
        self.asked.append(node_id)
        ctx = LocalContext(self.caller)
        return await self.services[node_id]._peer.local(CERTIFY, ctx, request)


class FakeNode:
    def __init__(
        self, ident: pki.Identity, data_dir: Path, hosts: list[HostView], pool: FakePool
    ) -> None:
        self.cfg = Config(data_dir=data_dir, web_port=-1)
        self.identity = ident
        self.node_id = ident.node_id
        self.pool = pool
        self.data_dir = data_dir
        self._hosts = hosts
        self.published = HostState()

    def hosts(self) -> list[HostView]:
        return self._hosts

    def publish(self, state: HostState) -> None:
        self.published = state


async def _web_service(node: FakeNode, address: str) -> WebService:
    peer, control = Handlers(), Handlers()

    async def status(ctx: Context, body: Empty) -> StatusReply:
        return replace(_status(), node_id=node.node_id, addresses=(address,))

    control.add(STATUS, status)
    service = WebService()
    async with trio.open_nursery() as nursery:
        await service.start(node, nursery, peer, control)  # type: ignore[arg-type]
    return service


async def test_a_host_gets_its_certificate_from_the_ca_host(
    tmp_path: Path, mesh: pki.Identity
) -> None:
    beta, zeta = _joined(tmp_path, mesh, "beta"), _joined(tmp_path, mesh, "zeta")
    hosts = [
        HostView(zeta.node_id, "zeta", "up", CAP),
        HostView(mesh.node_id, "alpha", "up", CAP),
        HostView(beta.node_id, "beta", "up", CAP),
    ]
    services: dict[str, WebService] = {}
    pools = {i.node_id: FakePool(services, i.node_id) for i in (mesh, beta, zeta)}
    for ident, address in ((mesh, "10.0.0.1"), (beta, "10.0.0.2"), (zeta, "10.0.0.3")):
        node = FakeNode(ident, tmp_path / ident.name, hosts, pools[ident.node_id])
        services[ident.node_id] = await _web_service(node, address)
    web = services[beta.node_id]
    await web._renew()
    assert pools[beta.node_id].asked == [mesh.node_id]  # the CA's maker first: no round of refusals
    cert = x509.load_pem_x509_certificate((tmp_path / "beta" / "web" / "server.crt").read_bytes())
    assert certs.cert_names(cert) == {"10.0.0.2", "beta", "localhost", "127.0.0.1"}
    assert web.cert_ready.is_set()
    with pytest.raises(AuthError, match="CA key"):  # zeta holds no CA key
        await services[zeta.node_id]._certify(
            LocalContext(beta.node_id),
            CertifyRequest(public_key=pki.host_public_key(beta), names=("x",)),
        )


async def test_client_certificates_only_on_the_ca_host(tmp_path: Path, mesh: pki.Identity) -> None:
    beta = _joined(tmp_path, mesh, "beta")
    pool = FakePool({})
    on_ca = await _web_service(FakeNode(mesh, tmp_path / "a", [], pool), "10.0.0.1")
    on_beta = await _web_service(FakeNode(beta, tmp_path / "b", [], pool), "10.0.0.2")
    reply = await on_ca._issue(LocalContext(mesh.node_id), IssueRequest(role=Role.VIEWER))
    assert pki.cert_role(x509.load_pem_x509_certificate(reply.cert)) == "viewer"
    with pytest.raises(UsageError, match="vmmesh init"):
        await on_beta._issue(LocalContext(beta.node_id), IssueRequest(role=Role.VIEWER))


async def test_the_services_metrics_read_status_gossip_and_counters(
    tmp_path: Path, mesh: pki.Identity
) -> None:
    node = FakeNode(mesh, tmp_path / "a", _hosts(), FakePool({}))
    web = await _web_service(node, "10.0.0.1")
    samples = _samples((await web.metrics()).decode())
    assert samples[("vmmesh_migrations_total", (("result", "failed"),))] == 1  # from status
    assert _status_of(samples, "delta") == "down"
    assert not any(name == "vmmesh_vms" for name, _ in samples)  # no VM service here


async def test_a_taken_port_leaves_the_node_running_without_its_page(
    tmp_path: Path, mesh: pki.Identity
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        node = FakeNode(mesh, tmp_path / "a", [], FakePool({}))
        node.cfg = Config(
            data_dir=node.data_dir, listen="127.0.0.1", web_port=taken.getsockname()[1]
        )
        web = await _web_service(node, "127.0.0.1")
    assert web.port is None
    assert web.facts()["web"].startswith("off: cannot listen on port")


async def test_the_login_link_names_this_host_and_is_good_once(
    tmp_path: Path, mesh: pki.Identity
) -> None:
    node = FakeNode(mesh, tmp_path / "a", _hosts(), FakePool({}))
    web = await _web_service(node, "10.0.0.1")
    here = LocalContext(mesh.node_id)
    with pytest.raises(StateError, match="off"):
        await web._login(here, Empty())  # no page, no link
    web.port = 7402
    reply = await web._login(here, Empty())
    assert reply.url.startswith("https://10.0.0.1:7402/login?token=")
    token = reply.url.split("token=", 1)[1]
    cookie = web.login(token)
    assert cookie is not None and "HttpOnly" in cookie
    assert web.login(token) is None
    assert web.session([cookie.split(";", 1)[0]])
    assert not web.session(["vmmesh_session=forged"])


def _peer_rows(hosts: list[HostView]) -> PeersReply:
    rows = tuple(
        PeerRow(
            h.node_id, h.name, i == 0, h.status, h.address, h.last_heard, h.capacity,
            h.templates, h.vms, h.draining, h.work,
        )
        for i, h in enumerate(hosts)
    )  # fmt: skip
    return PeersReply(mesh_id="e" * 32, node_id=hosts[0].node_id, hosts=rows)


async def test_the_snapshot_is_the_api_bodies_and_the_task_log(
    tmp_path: Path, mesh: pki.Identity
) -> None:
    hosts = _hosts()
    node = FakeNode(mesh, tmp_path / "a", hosts, FakePool({}))
    web = await _web_service(node, "10.0.0.1")
    odd = "<b>not bold</b>"

    async def peers(ctx: Context, body: Empty) -> PeersReply:
        return _peer_rows(hosts)

    async def vms(ctx: Context, body: Empty) -> VmList:
        return VmList(vms=(replace(_vm("web-1", "stopped"), stop_reason=odd),))

    web._control.add(PEERS, peers)
    web._control.add(LIST, vms)
    first = json.loads(await web.snapshot())
    assert [h["name"] for h in first["hosts"]["hosts"]] == ["alpha", "beta", "gamma", "delta"]
    assert first["vms"]["vms"][0]["stop_reason"] == odd  # as text: the page sets it as text
    assert first["status"]["node_id"] == mesh.node_id and first["usage"] == []
    assert first["events"] == []
    async with trio.open_nursery() as nursery:
        woke: list[bool] = []

        async def watch() -> None:
            await web.wait_change(60, web.changes())
            woke.append(True)

        nursery.start_soon(watch)
        await trio.testing.wait_all_tasks_blocked()
        web.on_event(node, EventKind.DOWN, IDS[3])  # type: ignore[arg-type]
    assert woke == [True]
    # a change that came while a stream was busy sending is not waited for again
    seen = web.changes()
    web.on_event(node, EventKind.CHANGED, IDS[1])  # type: ignore[arg-type]
    with trio.fail_after(1):  # it returns at once, not after 60 s
        await web.wait_change(60, seen)
    events = json.loads(await web.snapshot())["events"]  # a change: not the cached one
    assert [(e["kind"], e["text"]) for e in events] == [("down", "delta is down")]


async def test_a_gossip_change_right_after_a_snapshot_is_in_the_next_one(
    tmp_path: Path, mesh: pki.Identity
) -> None:
    """A changed key (another host's work under way) makes no task-log line, and came
    within ``SNAPSHOT_AGE`` of the last snapshot: the page must not get the old one
    again and wait for the next push (it did, up to 2.5 s late)."""
    hosts = [replace(h, work=()) for h in _hosts()]
    node = FakeNode(mesh, tmp_path / "a", hosts, FakePool({}))
    web = await _web_service(node, "10.0.0.1")

    async def peers(ctx: Context, body: Empty) -> PeersReply:
        return _peer_rows(hosts)

    web._control.add(PEERS, peers)
    first = json.loads(await web.snapshot())
    assert all(h["work"] == [] for h in first["hosts"]["hosts"])
    hosts[1] = replace(hosts[1], work=(WorkItem(WorkKind.MIGRATION, "web-1", peer="gamma"),))
    again = json.loads(await web.snapshot())
    assert again == first  # nothing told of a change: the shared one
    web.on_event(node, EventKind.CHANGED, IDS[1])  # type: ignore[arg-type]
    assert web.events.rows() == []  # no line in the task log
    beta = json.loads(await web.snapshot())["hosts"]["hosts"][1]
    assert [(w["name"], w["peer"]) for w in beta["work"]] == [("web-1", "gamma")]


def test_a_p12_bundle_holds_the_key_its_certificate_and_the_ca(mesh: pki.Identity) -> None:
    ca = pki.load_ca(mesh.pki_dir)
    key, cert = pki.issue_client(ca, "viewer", "me")
    ca_pem = mesh.ca_cert_path.read_bytes()
    reply = IssueReply(cert=cert, key=key, ca=ca_pem, role=Role.VIEWER, expires=0.0)
    bundle = p12_bundle(reply, "me", b"s3cret")
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(bundle, None)  # encrypted: the file alone is nothing
    got = pkcs12.load_pkcs12(bundle, b"s3cret")
    assert got.cert is not None and got.cert.friendly_name == b"me"
    assert pki.cert_role(got.cert.certificate) == "viewer"
    assert [c.certificate for c in got.additional_certs] == [x509.load_pem_x509_certificate(ca_pem)]
    assert got.key is not None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    assert got.key.public_key().public_bytes(serialization.Encoding.PEM, pub) == (
        got.cert.certificate.public_key().public_bytes(serialization.Encoding.PEM, pub)
    )
