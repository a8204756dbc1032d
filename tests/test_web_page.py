"""The page and its logins without a node: single-use login tokens and sessions on an
injected clock, the cookie's attributes, the page's shell (no data in it, its script
and style pinned by the Content-Security-Policy), the task log, the event stream over
memory streams, and, in a real headless Chromium, hostile strings drawn as text."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.browser import chromium
from tests.test_web import CAP, IDS, FakePages, _status
from vmmesh.api.common import Progress
from vmmesh.api.figures import Figure, Unit, counter, gauge
from vmmesh.api.host import Capacity, TemplateInfo, WorkItem, WorkKind
from vmmesh.api.names import HOST_NAME, PACKAGE_NAME, VM_NAME
from vmmesh.api.node import PeerRow, PeersReply
from vmmesh.api.vm import Lineage, VmList, VmRow
from vmmesh.api.web import Role
from vmmesh.gossip.hoststate import HostView
from vmmesh.web import login, page
from vmmesh.web.app import as_plain, respond
from vmmesh.web.events import Event, EventLog, vm_changes
from vmmesh.web.server import MAX_STREAMS, PUSH_EVERY, serve_connection
from vmmesh.web.vmstats import VmUsage
from vmmesh.web.work import from_progress

# --- login tokens and sessions -------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_login_token_is_good_once() -> None:
    logins = login.Logins(clock=Clock())
    token = logins.new_token()
    session = logins.redeem(token)
    assert session is not None and logins.valid(session)
    assert logins.redeem(token) is None  # reused: refused
    assert logins.redeem("made-up") is None
    assert len(token) >= 40 and token != session


def test_a_login_token_expires() -> None:
    clock = Clock()
    logins = login.Logins(clock=clock)
    late, in_time = logins.new_token(), logins.new_token()
    clock.now += login.TOKEN_TTL - 1
    assert logins.redeem(in_time) is not None
    clock.now += 1
    assert logins.redeem(late) is None


def test_a_session_expires_and_a_restart_forgets_it() -> None:
    clock = Clock()
    logins = login.Logins(clock=clock)
    session = logins.redeem(logins.new_token())
    assert session is not None
    clock.now += login.SESSION_TTL - 1
    assert logins.valid(session)
    clock.now += 1
    assert not logins.valid(session)
    again = logins.redeem(logins.new_token())
    assert again is not None and not login.Logins(clock=clock).valid(again)


def test_tokens_and_sessions_are_bounded_oldest_out() -> None:
    logins = login.Logins(clock=Clock())
    first = logins.new_token()
    tokens = [logins.new_token() for _ in range(login.MAX_TOKENS)]
    assert logins.redeem(first) is None
    sessions = [logins.redeem(t) for t in tokens]
    assert all(s is not None for s in sessions)
    for _ in range(login.MAX_SESSIONS):
        logins.redeem(logins.new_token())
    assert not logins.valid(str(sessions[0]))


def test_the_cookie_is_script_proof_https_only_this_site_only_and_expiring() -> None:
    logins = login.Logins(cookie_name="vmmesh_session_7402")
    cookie = logins.set_cookie("abc")
    name_value, *attributes = [part.strip() for part in cookie.split(";")]
    assert name_value == "vmmesh_session_7402=abc"
    assert set(attributes) == {
        "Path=/",
        f"Max-Age={int(login.SESSION_TTL)}",
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
    }
    headers = ["a=1; vmmesh_session_7400=other", "vmmesh_session_7402=abc; b=2"]
    assert logins.session_of(headers) == "abc"
    assert logins.session_of(["vmmesh_session_7402x=abc"]) is None


async def test_login_route_spends_the_token_once() -> None:
    class Pages(FakePages):
        def __init__(self) -> None:
            super().__init__()
            self.logins = login.Logins(clock=Clock())

        def login(self, token: str) -> str | None:
            session = self.logins.redeem(token)
            return None if session is None else self.logins.set_cookie(session)

    pages = Pages()
    token = pages.logins.new_token()
    first = await respond(pages, "GET", f"/login?token={token}", None, anonymous=True)
    assert first.status == 303 and dict(first.headers)["location"] == "/"
    assert "HttpOnly" in dict(first.headers)["set-cookie"]
    again = await respond(pages, "GET", f"/login?token={token}", None, anonymous=True)
    assert again.status == 401 and not again.headers
    twice = await respond(pages, "GET", f"/login?token={token}&token=x", None, anonymous=True)
    assert twice.status == 401


# --- the page's shell -------------------------------------------------------------------


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


async def test_the_page_is_one_fixed_shell_pinned_by_its_policy() -> None:
    resp = await respond(FakePages(), "GET", "/", Role.VIEWER)
    assert resp.status == 200 and resp.body == page.INDEX
    csp = dict(resp.headers)["content-security-policy"]
    assert f"script-src {_sha256(page.SCRIPT)};" in csp
    assert f"style-src {_sha256(page.STYLE)};" in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    html = page.INDEX.decode()
    assert html.count("<script>") == 1 and html.count("<style>") == 1
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", html)  # nothing from elsewhere
    print(f"page: {len(page.INDEX)} bytes, script {len(page.SCRIPT)}, style {len(page.STYLE)}")


def test_the_script_never_parses_data_as_markup() -> None:
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in page.SCRIPT
    assert "setAttribute" not in page.SCRIPT  # no attribute gets a value from data


def test_what_can_carry_odd_characters() -> None:
    """Names from gossip are checked against patterns that leave no markup through; free
    text fields (a VM's stop reason and origin, a host's ``blocked``, errors, the task
    log's lines) are not: the page must draw those as text (next test, in a browser)."""
    hostile = "<img src=x onerror=alert(1)>"
    for pattern in (HOST_NAME, VM_NAME, PACKAGE_NAME):
        assert not pattern.match(hostile)


# --- the task log -----------------------------------------------------------------------


def test_vm_changes_say_which_vm_came_or_went_where() -> None:
    a = HostView(IDS[0], "alpha", "up", CAP, vms=("web-1",))
    b = HostView(IDS[1], "beta", "up", CAP, vms=())
    look, events = vm_changes({}, [a, b], 1.0)
    assert events == []  # what was there before this node looked is no news
    a2 = HostView(IDS[0], "alpha", "up", CAP, vms=("web-2",))
    b_down = HostView(IDS[1], "beta", "down", CAP, vms=())
    look, events = vm_changes(look, [a2, b_down], 2.0)
    assert [(e.kind, e.text) for e in events] == [
        ("vm-started", "VM web-2 on alpha"),
        ("vm-gone", "VM web-1 gone from alpha"),
    ]
    assert look[IDS[1]] == ()  # a down host keeps its last look


def test_the_event_log_is_bounded() -> None:
    log = EventLog(size=3)
    for i in range(5):
        log.add(Event(float(i), "joined", f"h{i}", f"h{i} joined"))
    assert [r["host"] for r in log.rows()] == ["h2", "h3", "h4"] and log.serial == 5


# --- the event stream -------------------------------------------------------------------


async def _read_until(stream: trio.abc.Stream, buf: bytearray, marker: bytes) -> None:
    while marker not in buf:
        chunk = await stream.receive_some(65536)
        assert chunk, "the server closed the stream"
        buf += chunk


async def test_events_stream_a_snapshot_at_once_then_on_change_and_end_with_the_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pages = FakePages()
    server, client = trio.testing.memory_stream_pair()
    ended = trio.Event()

    async def serve() -> None:
        await serve_connection(server, Role.VIEWER, pages)
        ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await client.send_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = bytearray()
        await _read_until(client, buf, b'data: {"n":1}\n\n')
        head = bytes(buf).split(b"\r\n\r\n", 1)[0].lower()
        assert b"content-type: text/event-stream" in head
        assert b"transfer-encoding: chunked" in head
        started = trio.current_time()
        pages.change.set()
        await _read_until(client, buf, b'data: {"n":2}\n\n')
        assert trio.current_time() - started < 0.01  # on the change, not the timer
        await _read_until(client, buf, b'data: {"n":3}\n\n')
        assert trio.current_time() - started == pytest.approx(PUSH_EVERY)  # nothing changed
        await client.aclose()
        with trio.fail_after(1):
            await ended.wait()


async def test_events_streams_are_bounded() -> None:
    limiter = trio.CapacityLimiter(MAX_STREAMS)
    for i in range(MAX_STREAMS):
        limiter.acquire_on_behalf_of_nowait(i)
    server, client = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server, Role.VIEWER, FakePages())
        await client.send_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        await client.send_eof()
        buf = bytearray()
        await _read_until(client, buf, b"\r\n\r\n")
        assert buf.startswith(b"HTTP/1.1 200")  # its own limiter: not the full one
        await client.aclose()

    server, client = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: serve_connection(server, Role.VIEWER, FakePages(), streams=limiter)
        )
        await client.send_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = bytearray()
        await _read_until(client, buf, b"\r\n\r\n")
        assert buf.startswith(b"HTTP/1.1 503")
        await client.aclose()


# --- hostile strings in a real browser --------------------------------------------------

HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"


def _hostile_snapshot() -> bytes:
    """A snapshot whose every free string is markup (names too: the page must not
    count on the checks upstream)."""
    tpl = TemplateInfo(template_id="f" * 32, base_image_id="0" * 32, packages=frozenset())
    cap = Capacity(4, 8192, 20000, 15000, 6, 3, running_vms=1, blocked=HOSTILE)
    peers = PeersReply(
        mesh_id="e" * 32,
        node_id=IDS[0],
        hosts=(
            PeerRow(
                IDS[0], "h1" + HOSTILE, True, "up", "10.0.0.1:7400", 0.0, cap, (tpl,), (), False
            ),
            PeerRow(
                IDS[1],
                "h2",
                False,
                "down",
                "10.0.0.2:7400",
                time.time() - 7,
                cap,
                (),
                (),
                False,
                _hostile_work(),
            ),
        ),
    )
    vm = VmRow(
        name="web-1" + HOSTILE,
        vm_id="1" * 32,
        request="web",
        host="h1",
        node_id=IDS[0],
        state="stopped",
        stop_reason=HOSTILE,
        lineage=Lineage(keep_alive=True, generation=2, origin=HOSTILE),
    )
    state: dict[str, Any] = {
        "now": time.time(),
        "status": as_plain(replace(_status(), figures=_hostile_figures())),
        "hosts": as_plain(peers),
        "vms": as_plain(VmList(vms=(vm,), errors=(HOSTILE,))),
        "events": [{"at": time.time(), "kind": "refused", "host": "h2", "text": HOSTILE}],
        "usage": [
            asdict(VmUsage("web-1" + HOSTILE, 4242, 12.5, 300 << 20, 5 << 20, 1 << 20, 40, 8))
        ],
    }
    return json.dumps(state).encode()


def _hostile_figures() -> tuple[Figure, ...]:
    """Figures as an extension publishes them, one with a label of markup."""
    return (
        counter("migrations", "Migrations by result.", 2, result="done"),
        counter("transfer_received_bytes", "Bytes fetched.", 3 << 20, Unit.BYTES),
        gauge("jobs", "Jobs by state.", 1, state=HOSTILE),
    )


def _hostile_work() -> tuple[WorkItem, ...]:
    """Another host's work under way as it gossips it, every string markup: a fetch half
    done, a migration in a phase of unknown length, a job with commands done and running."""
    fetch = Progress(
        task="template " + HOSTILE,
        phase="fetching",
        fraction=0.5,
        done=3 << 20,
        total=6 << 20,
        rate=float(1 << 20),
        note=HOSTILE,
    )
    move = Progress(task="web-1" + HOSTILE, phase=HOSTILE[:64])
    job = WorkItem(WorkKind.JOB, "job-" + HOSTILE, "running", 0.8, 4, 5, failed=1, vms=2,
                   started=time.time() - 30)  # fmt: skip
    return (
        from_progress(WorkKind.FETCH, fetch),
        from_progress(WorkKind.MIGRATION, move, peer="h3" + HOSTILE),
        job,
    )


@pytest.fixture
def fake_page() -> Iterator[str]:
    """The page and one snapshot, over plain HTTP on loopback (what is tested is the
    script, not the listener)."""
    snapshot = _hostile_snapshot()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/events":
                body = b"data: " + snapshot + b"\n\n"
                kind = "text/event-stream"
            else:
                body, kind = page.INDEX, "text/html; charset=utf-8"
            self.send_response(200)
            self.send_header("content-type", kind)
            self.send_header("content-security-policy", page.CSP)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_the_browser_draws_hostile_strings_as_text(fake_page: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium(tmp_path) as browser:
        browser.get(fake_page)
        WebDriverWait(browser, 10).until(lambda b: "web-1" in b.find_element(By.ID, "vms").text)
        text = browser.find_element(By.TAG_NAME, "body").text
        assert browser.find_elements(By.TAG_NAME, "img") == []
        assert browser.title == "vmmesh"
        assert text.count(HOSTILE) >= 5  # host, VM, stop reason, origin, error, task log
        transfers = browser.find_element(By.ID, "transfers").text  # h2's, from its gossip
        assert transfers.count(HOSTILE) == 2 and "50% 3.0 MiB/6.0 MiB, 1.0 MiB/s" in transfers
        assert transfers.startswith("h2 ")  # each row names its host
        moves = browser.find_element(By.ID, "migrating").text
        assert moves.count(HOSTILE) == 4 and "to h3" in moves  # name, target, phase twice
        jobs = browser.find_element(By.ID, "jobs").text
        assert HOSTILE in jobs and "4 of 5 done" in jobs and "3 ok, 1 failed" in jobs
        assert jobs.startswith("h2 ")
        assert "12.5 s CPU, 300.0 MiB" in browser.find_element(By.ID, "vms").text
        assert browser.find_element(By.ID, "migrations").text == "2 done, 0 failed (from this host)"
        figures = browser.find_element(By.ID, "figures").text
        assert "transfer received bytes 3.0 MiB" in figures and f"jobs {HOSTILE} 1" in figures
        errors = [
            e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]
        ]
        assert errors == []  # the page's own script and style pass its policy
        browser.save_screenshot(str(tmp_path / "hostile.png"))
