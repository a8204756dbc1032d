"""Templates and the base image between lab hosts: real node processes, real TLS, real
qcow2 files, real QEMU guests (TCG), links shaped with tc so a transfer lasts long
enough to break it on purpose.

h1 and h2 hold the base image; h3 and h4 start without one (automatic fetching is
off for them, so each test says when a fetch happens).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.aptrepo import AptRepo
from tests.labutil import lab_context, suite_warm_seed
from tests.meshutil import all_up, base_warm, cli_json, eventually, failed
from vmmesh.host.images import ImageStore
from vmmesh.lab import Lab, load_lab, seed_warm

BASE_DIR = Path(os.environ.get("VMMESH_BASE_IMAGE_DIR", "/var/cache/vmmesh-dev/base"))

pytestmark = [
    pytest.mark.lab,
    pytest.mark.qemu,
    pytest.mark.skipif(
        not (BASE_DIR / "manifest.json").is_file(), reason=f"needs a base image in {BASE_DIR}"
    ),
]

PATIENCE = 900.0
RATE = "80mbit"  # each holder's uplink: the base image takes a while to move


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _shape(lab: Lab, i: int, rate: str | None) -> None:
    """Limit what host ``i`` sends (tbf on its end of the link), or lift the limit."""
    ns = ["ip", "netns", "exec", lab.host(i).netns, "tc", "qdisc"]
    subprocess.run([*ns, "del", "dev", "eth0", "root"], capture_output=True, check=False)
    if rate is not None:
        subprocess.run(
            [*ns, "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "256kb",
             "latency", "400ms"],
            check=True,
        )  # fmt: skip


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("xlab")
    port = _free_port()
    node_args = ["--accel=tcg", f"--apt-source=deb [trusted=yes] http://BRIDGE:{port}/ ./"]
    with lab_context(base, 4, start_nodes=False, node_args=node_args) as made:
        for i in (1, 2):
            store = ImageStore(made.host_data_dir(i))
            image_id = store.import_image(BASE_DIR, link=True).image_id
            store.set_default(image_id)
            # The suite's warm state of the image, as lab_context links it: h1 and
            # h2 boot no guest to make their own (h3 and h4 do, after fetching).
            if (seed := suite_warm_seed(BASE_DIR)) is not None:
                seed_warm(seed / image_id, made.host_data_dir(i))
        for i in (3, 4):
            (made.host_data_dir(i) / "config.toml").write_text("image_autofetch = false\n")
        fixed = [a.replace("BRIDGE", made.bridge_address) for a in node_args]
        running = made.with_node_args(fixed).start_all()
        repo = AptRepo(base / "aptrepo", host=running.bridge_address, port=port)
        repo.start()
        try:
            for i in (1, 2, 3, 4):
                eventually(all_up, f"h{i} sees four hosts up", running, i, 4)
            yield running
        finally:
            repo.stop()


@pytest.fixture(autouse=True)
def node_logs_if_failed(request: pytest.FixtureRequest, lab: Lab) -> Iterator[None]:
    yield
    for i in (1, 2, 3, 4):
        _shape(lab, i, None)
    if failed(request):
        for i in (1, 2, 3, 4):
            log = Path(lab.host(i).data_dir) / "node.log"
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            print(f"--- h{i} node.log (last 40 lines)", *lines[-40:], sep="\n")


def _fetch_image(lab: Lab, i: int) -> subprocess.Popen[str]:
    argv = [*lab.vmmesh_argv(), "image", "fetch", "--data-dir", str(lab.host_data_dir(i)), "--json"]
    return subprocess.Popen(
        ["ip", "netns", "exec", lab.host(i).netns, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _pieces_here(lab: Lab, i: int) -> int:
    staged = lab.host_data_dir(i) / "transfer"
    return sum(len(p.read_text().split()) for p in staged.glob("*.have"))


def _peak_rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


def _report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 0, (out, err)
    report: dict[str, Any] = json.loads(out)
    return report


def test_a_holder_killed_midway_leaves_the_rest_to_the_other(lab: Lab) -> None:
    """h3 fetches the base image from h1 and h2; h1's node is killed midway: its pieces
    go to h2, the image completes and verifies.  The receiver's memory stays bounded
    (the image is many times the pieces in flight)."""
    for i in (1, 2):
        _shape(lab, i, RATE)
    before = _peak_rss_mb(lab.host(3).pid)
    proc = _fetch_image(lab, 3)
    eventually(lambda: _pieces_here(lab, 3) >= 6, "h3 has some pieces", patience=PATIENCE)
    lab.kill_host(1, signal.SIGKILL)
    report = _report(proc)
    holders = {h["host"]: h for h in report["holders"]}
    assert holders["h2"]["bytes"] > 0 and holders["h1"]["dropped"], report
    assert report["bytes"] > 200 << 20
    assert _peak_rss_mb(lab.host(3).pid) - before < 150, "memory stays bounded"
    status = cli_json(lab, 3, "status")
    eventually(lambda: cli_json(lab, 3, "status")["facts"]["VMs"] == "on", "h3 takes it up")
    assert status["facts"]["base image"] != "none"
    # h3 takes h2's warm state of the image (fetching ~150 MB beats a minute's warm boot)
    eventually(base_warm, "h3 has the image's warm state", lab, 3, patience=PATIENCE)
    log = (lab.host_data_dir(3) / "node.log").read_text()
    warm_lines = [line for line in log.splitlines() if "warm state of" in line]
    assert any(" fetched from h2 (" in line for line in warm_lines), warm_lines
    assert not any(" made in " in line for line in warm_lines), "h3 booted no guest for it"
    assert list((lab.host_data_dir(3) / "transfer").iterdir()) == []
    lab.start_host(1)
    eventually(all_up, "h1 is back", lab, 1, 4)


def test_a_receiver_killed_midway_restarts_clean_and_resumes(lab: Lab) -> None:
    """h4's node dies while it fetches: no half image, no half template; after the
    restart the fetch takes up the pieces it had, from several holders."""
    for i in (1, 2):
        _shape(lab, i, RATE)
    proc = _fetch_image(lab, 4)
    eventually(lambda: _pieces_here(lab, 4) >= 10, "h4 has some pieces", patience=PATIENCE)
    lab.kill_host(4, signal.SIGKILL)
    proc.communicate(timeout=60)
    had = _pieces_here(lab, 4)
    lab = load_lab(lab.lab_dir).start_host(4)  # h1 was restarted: the saved lab knows it
    data = lab.host_data_dir(4)
    assert not [p for p in (data / "images").iterdir() if not p.name.startswith(".")], "no image"
    assert not list(data.glob("templates/*")), "no template"
    assert cli_json(lab, 4, "status")["facts"]["VMs"].startswith("off")
    for i in (1, 2):
        _shape(lab, i, None)
    eventually(all_up, "h4 sees everyone", lab, 4, 4)
    report = _report(_fetch_image(lab, 4))
    fetched = sum(h["bytes"] for h in report["holders"])
    assert fetched < report["bytes"], f"resumed: {had} pieces were kept ({report})"
    assert len([h for h in report["holders"] if h["bytes"]]) >= 2, "from several holders"
    eventually(lambda: cli_json(lab, 4, "status")["facts"]["VMs"] == "on", "h4 takes it up")
    eventually(base_warm, "h4 has the image's warm state", lab, 4, patience=PATIENCE)
    assert list((data / "transfer").iterdir()) == []


def _only_room_on(lab: Lab, keep: int) -> None:
    """Every host but ``keep`` offers no room, as host ``keep`` sees it; ``keep`` gets
    its default settings back.  No room by memory (a reserve larger than the machine),
    not by a tiny storage quota: that would drop the warm states the others hold."""
    lab = load_lab(lab.lab_dir)  # a host restarted by an earlier test has a new pid
    for i in (1, 2, 3, 4):
        full = "" if i == keep else "memory_reserve_mb = 100000000\n"
        text = "image_autofetch = false\n" + full
        (lab.host_data_dir(i) / "config.toml").write_text(text)
        lab.kill_host(i, signal.SIGHUP)
    others = {f"h{i}" for i in (1, 2, 3, 4) if i != keep}
    seen: list[dict[str, int]] = []

    def only_keep() -> bool:
        rows = cli_json(lab, keep, "peers")["hosts"]
        free = {h["name"]: int(h["capacity"]["free_slots"]) for h in rows}
        seen[:] = [free]
        return all(free.get(o) == 0 for o in others) and free.get(f"h{keep}", 0) > 0

    try:
        eventually(only_keep, f"h{keep} sees only itself with room")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; free slots as h{keep} sees them: {seen}") from None


def test_a_template_built_on_one_host_is_fetched_for_a_request_on_another(lab: Lab) -> None:
    """h1 builds {vmm-test-a}; a request that can only go to h2 has h2 fetch it: h2
    installs nothing, its VM has the package, the report says fetched, with estimates."""
    _only_room_on(lab, 1)
    reply = json.loads(
        lab.cli(1, "request", "seed", "1", "vmm-test-a", "--json", check=False).stdout
    )
    assert [v["host"] for v in reply["vms"]] == ["h1"], reply
    lab.cli(1, "shutdown", "seed")
    tid = reply["vms"][0]["template"]
    _only_room_on(lab, 2)
    out = lab.cli(2, "request", "web", "1", "vmm-test-a", "--json", check=False)
    reply = json.loads(out.stdout)
    [vm] = reply["vms"]
    assert vm["host"] == "h2" and vm["template"] == tid, reply
    source = vm["source"]
    assert source["how"] == "fetched", source
    assert 0 < source["fetch_estimate"] < source["install_estimate"], source
    # h1's build left a warm state; h2 fetched it with the template, and its VM resumed it
    assert source["warm_bytes"] > 0 and "warm state" in source["why"], source
    assert vm["start"] == "warm", vm
    data = lab.host_data_dir(2)
    log = (data / "node.log").read_text()
    assert "tpl-" not in log.split("request web")[-1], "h2 booted no build guest"
    assert f"warm state of {tid[:12]} fetched from h1" in log
    rows = [t for t in cli_json(lab, 2, "templates")["templates"] if t["host"] == "h2"]
    assert [(t["template_id"], t["origin"]) for t in rows] == [(tid, "fetched")]
    assert set(rows[0]["holders"]) >= {"h1", "h2"}
    marker = lab.cli(2, "exec", "web-1", "--", "cat", "/usr/share/vmm-test-a/marker").stdout
    assert marker.strip() == "vmm-test-a"
    lab.cli(2, "shutdown", "web")
    time.sleep(0)
