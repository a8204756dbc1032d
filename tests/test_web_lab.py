"""The web page through real nodes: every host's /metrics passes `promtool check
metrics` fetched with a metrics certificate over verified HTTPS, a real Prometheus
finds the 3 hosts through one host's /sd and scrapes them, and a killed host's
member status says down on the others; a headless Chromium that trusts the mesh CA
logs in with `vmmesh web`'s link, sees the 3 hosts and sees one go down without a
reload.  No VMs, so no QEMU."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.labutil import lab_context
from tests.meshutil import all_up, cli_json, eventually
from vmmesh.lab import Lab

pytestmark = pytest.mark.lab

WEB_OFFSET = 2  # web_port unset: the peer port + 2


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with lab_context(tmp_path_factory.mktemp("web"), 3, start_nodes=True) as made:
        yield made


def _url(lab: Lab, i: int, path: str) -> str:
    return f"https://{lab.host_address(i)}:{lab.port + WEB_OFFSET}{path}"


def _context(certs: Path, role: str | None) -> ssl.SSLContext:
    """Verified TLS: the mesh CA, the page's name checked against the address."""
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    if role is not None:
        ctx.load_cert_chain(str(certs / f"{role}.crt"), str(certs / f"{role}.key"))
    return ctx


def _get(url: str, ctx: ssl.SSLContext) -> bytes:
    with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
        body: bytes = resp.read()
        return body


def _web_ready(lab: Lab, i: int) -> str | None:
    url: str = cli_json(lab, i, "status")["facts"].get("web", "")
    return url if url.startswith("https://") and "not yet" not in url else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def certs(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    for i in (1, 2, 3):
        eventually(all_up, f"h{i} sees all three hosts up", lab, i)
    out = tmp_path_factory.mktemp("certs")
    lab.cli(1, "cert", "issue", "--role", "metrics", "--out", str(out))
    lab.cli(1, "cert", "issue", "--role", "viewer", "--out", str(out))
    for i in (1, 2, 3):
        url = eventually(_web_ready, f"h{i} has a web certificate from the CA host", lab, i)
        assert url == _url(lab, i, "/")
    return out


def test_only_the_ca_host_issues_client_certificates(lab: Lab, tmp_path: Path) -> None:
    run = lab.cli(2, "cert", "issue", "--role", "metrics", "--out", str(tmp_path), check=False)
    assert run.returncode == 2 and "vmmesh init" in run.stderr


def test_a_bundle_for_a_browser_opens_with_the_password_printed_once(
    lab: Lab, certs: Path, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives.serialization import pkcs12

    from vmmesh.mesh.pki import cert_role

    out = cli_json(lab, 1, "cert", "issue", "--role", "viewer", "--p12", str(tmp_path / "me.p12"))
    bundle = (tmp_path / "me.p12").read_bytes()
    assert (tmp_path / "me.p12").stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(bundle, None)
    got = pkcs12.load_pkcs12(bundle, out["p12_password"].encode())
    assert got.cert is not None and cert_role(got.cert.certificate) == "viewer"


def test_every_hosts_metrics_pass_promtool(lab: Lab, certs: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus) is not installed")
    ctx = _context(certs, "metrics")
    for i in (1, 2, 3):
        started = time.perf_counter()
        body = _get(_url(lab, i, "/metrics"), ctx)
        took = time.perf_counter() - started
        print(f"h{i}: /metrics {len(body)} bytes in {took * 1000:.1f} ms (new TLS connection)")
        run = subprocess.run(
            [promtool, "check", "metrics"], input=body, capture_output=True, check=False
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert b'vmmesh_member_status{member="h3"' in body


def test_roles_and_refusals_over_the_wire(lab: Lab, certs: Path) -> None:
    with pytest.raises(urllib.error.HTTPError) as forbidden:
        _get(_url(lab, 2, "/api/v1/hosts"), _context(certs, "metrics"))
    assert forbidden.value.code == 403
    hosts = json.loads(_get(_url(lab, 2, "/api/v1/hosts"), _context(certs, "viewer")))
    assert set(hosts) == set(cli_json(lab, 2, "peers"))  # the CLI's body, not another
    assert sorted(h["name"] for h in hosts["hosts"]) == ["h1", "h2", "h3"]
    with pytest.raises(urllib.error.HTTPError) as anonymous:  # no certificate, no session
        _get(_url(lab, 2, "/metrics"), _context(certs, None))
    assert anonymous.value.code == 401


def test_a_revoked_client_certificate_is_refused_by_every_page(
    lab: Lab, certs: Path, tmp_path: Path
) -> None:
    """`vmmesh cert revoke FILE` on the CA host: the CRL spreads by gossip and each page
    refuses that certificate in the handshake; the others' certificates still work."""
    lab.cli(1, "cert", "issue", "--role", "viewer", "--label", "leaked", "--out", str(tmp_path))
    (tmp_path / "ca.crt").write_bytes((certs / "ca.crt").read_bytes())
    leaked = _context(tmp_path, "leaked")
    for i in (2, 3):
        assert json.loads(_get(_url(lab, i, "/api/v1/hosts"), leaked))["hosts"]
    refused = lab.cli(2, "cert", "revoke", str(tmp_path / "leaked.crt"), check=False)
    assert refused.returncode == 2 and "admin host" in refused.stderr  # h2 holds no CA key
    out = cli_json(lab, 1, "cert", "revoke", str(tmp_path / "leaked.crt"))
    assert out["serial"] and out["crl_number"] >= 1

    def refuses(i: int) -> str | None:
        # TLS 1.3 checks a client's certificate after the client thinks the handshake
        # done: the refusal shows as the server's alert or as the connection closed
        try:
            _get(_url(lab, i, "/api/v1/hosts"), _context(tmp_path, "leaked"))
        except (ssl.SSLError, urllib.error.URLError, ConnectionError) as exc:
            return str(exc) or type(exc).__name__
        return None

    for i in (1, 2, 3):
        why = eventually(refuses, f"h{i}'s page refuses the revoked certificate", i)
        print(f"h{i} refuses the revoked certificate: {why}")
        hosts = json.loads(_get(_url(lab, i, "/api/v1/hosts"), _context(certs, "viewer")))
        assert sorted(h["name"] for h in hosts["hosts"]) == ["h1", "h2", "h3"]
    assert all_up(lab, 1, 3)  # a client's serial on the CRL revokes no host


def _prometheus_config(lab: Lab, certs: Path, path: Path) -> None:
    tls = {
        "ca_file": str(certs / "ca.crt"),
        "cert_file": str(certs / "metrics.crt"),
        "key_file": str(certs / "metrics.key"),
    }
    config = {
        "global": {"scrape_interval": "2s", "scrape_timeout": "2s"},
        "scrape_configs": [
            {
                "job_name": "vmmesh",
                "scheme": "https",
                "tls_config": tls,
                "http_sd_configs": [
                    {"url": _url(lab, 1, "/sd"), "refresh_interval": "2s", "tls_config": tls}
                ],
            }
        ],
    }
    path.write_text(json.dumps(config))  # JSON is YAML


def _query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as resp:
        answer = json.loads(resp.read())
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def _targets_up(port: int, n: int) -> list[dict[str, Any]] | None:
    up = _query(port, "up")
    return up if len(up) == n and all(r["value"][1] == "1" for r in up) else None


def _h3_down_on_others(port: int) -> list[dict[str, Any]] | None:
    rows = _query(port, 'vmmesh_member_status{member="h3", status="down"} == 1')
    return rows if len(rows) == 2 else None


@pytest.fixture
def prometheus(lab: Lab, certs: Path, tmp_path: Path) -> Iterator[int]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus (Debian's package) is not installed")
    _prometheus_config(lab, certs, tmp_path / "prometheus.yml")
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_prometheus_finds_and_scrapes_the_mesh_and_sees_a_host_die(
    lab: Lab, prometheus: int
) -> None:
    started = time.monotonic()
    up = eventually(_targets_up, "Prometheus scrapes 3 targets found by /sd", prometheus, 3)
    print(f"Prometheus: 3 targets up {time.monotonic() - started:.1f} s after its start")
    wanted = {f"{lab.host_address(i)}:{lab.port + WEB_OFFSET}" for i in (1, 2, 3)}
    assert {r["metric"]["instance"] for r in up} == wanted
    took = _query(prometheus, "scrape_duration_seconds")
    print("scrape durations:", sorted(f"{float(r['value'][1]) * 1000:.1f} ms" for r in took))
    samples = _query(prometheus, "scrape_samples_scraped")
    print("samples per scrape:", sorted(r["value"][1] for r in samples))

    lab.kill_host(3, signal.SIGKILL)
    killed = time.monotonic()
    rows = eventually(_h3_down_on_others, "h1 and h2 say h3 is down", prometheus)
    print(f"h3 down on both others' /metrics {time.monotonic() - killed:.1f} s after the kill")
    h3 = f"{lab.host_address(3)}:{lab.port + WEB_OFFSET}"
    assert h3 not in {r["metric"]["instance"] for r in rows}


def _page_hosts(browser: Any) -> dict[str, str]:
    """Host name -> status as the open page shows them (read in one go: it redraws)."""
    rows: list[list[str]] = browser.execute_script(
        "return [...document.querySelectorAll('#hosts tr')]"
        ".map((r) => [...r.cells].map((c) => c.textContent))"
    )
    return {c[0]: c[1] for c in rows if len(c) > 1}


def _snapshot(url: str, ctx: ssl.SSLContext) -> dict[str, Any]:
    """The first snapshot of /events."""
    with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
        for line in resp:
            if line.startswith(b"data: "):
                data: dict[str, Any] = json.loads(line[6:])
                return data
    raise AssertionError("no snapshot on /events")


def test_a_browser_logs_in_and_sees_a_host_go_down_live(
    lab: Lab, certs: Path, tmp_path: Path
) -> None:
    """Chromium trusts the mesh CA through its NSS database (as a user importing the CA
    would), not by skipping checks: the page's certificate is verified for h1's address."""
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.browser import chromium, nss_trust, skip_without_browser

    skip_without_browser()
    if lab.cli(3, "status", check=False).returncode != 0:  # the Prometheus test killed it
        lab.start_host(3)
    eventually(all_up, "h1 sees all three hosts up", lab, 1)
    home = tmp_path / "home"
    nss_trust(home, certs / "ca.crt")
    link = cli_json(lab, 1, "web")
    assert link["url"].startswith(_url(lab, 1, "/login?token="))
    with chromium(home, log=tmp_path / "chromedriver.log") as browser:
        started = time.monotonic()
        browser.get(link["url"])
        WebDriverWait(browser, 20).until(
            lambda b: _page_hosts(b) == {"h1": "up", "h2": "up", "h3": "up"}
        )
        print(f"page: 3 hosts up {time.monotonic() - started:.2f} s after opening the link")
        assert browser.current_url == _url(lab, 1, "/")
        size = browser.execute_script("return document.documentElement.outerHTML.length")
        print(
            f"page: {len(_get(_url(lab, 1, '/'), _context(certs, 'viewer')))} bytes served, "
            f"{size} characters drawn"
        )
        browser.save_screenshot(str(tmp_path / "page-up.png"))
        browser.execute_script("window.notReloaded = true")

        lab.kill_host(2, signal.SIGKILL)
        killed = time.monotonic()
        seen = {}
        deadline = killed + 30
        while time.monotonic() < deadline and "down" not in seen:
            state = _page_hosts(browser).get("h2", "")
            if state not in seen:
                seen[state] = (time.monotonic(), time.time())
            time.sleep(0.05)
        assert "down" in seen, seen
        assert browser.execute_script("return window.notReloaded") is True  # live, no reload
        browser.save_screenshot(str(tmp_path / "page-h2-down.png"))
        print(f"screenshots: {tmp_path}/page-up.png, page-h2-down.png")
        for state, (mono, _) in seen.items():
            print(f"page: h2 {state} {mono - killed:.2f} s after the kill")

    snapshot = _snapshot(_url(lab, 1, "/events"), _context(certs, "viewer"))
    down = [e for e in snapshot["events"] if e["kind"] == "down" and e["host"] == "h2"]
    assert down, snapshot["events"]
    delay = seen["down"][1] - down[-1]["at"]
    print(f"page: h2 down {delay * 1000:.0f} ms after h1's node saw it (SSE update delay)")
    assert delay < 1.5

    with pytest.raises(urllib.error.HTTPError) as reused:  # the link was spent by the browser
        _get(link["url"], _context(certs, None))
    assert reused.value.code == 401
