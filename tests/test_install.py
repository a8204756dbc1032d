"""`scripts/install.sh` from a clean state: install, a mesh of two lab hosts run by the
installed command, a request, a group member using the CLI, uninstall leaving
nothing.  Installs into a scratch directory (the script's VMMESH_* locations), so
a real install on this machine is never touched."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.labutil import skip_unless_lab, suite_warm_seed, unique_tag
from vmmesh.lab import Lab, lab_down, lab_up

pytestmark = [pytest.mark.lab, pytest.mark.qemu]

REPO = Path(__file__).resolve().parent.parent
BASE_DIR = Path(os.environ.get("VMMESH_BASE_IMAGE_DIR", "/var/cache/vmmesh-dev/base"))


def _run(argv: list[str], env: dict[str, str] | None = None, check: bool = True) -> str:
    merged = {**os.environ, **(env or {})}
    res = subprocess.run(argv, capture_output=True, text=True, env=merged, timeout=900, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"{argv} exited {res.returncode}: {res.stdout}\n{res.stderr}")
    return res.stdout + res.stderr


@pytest.fixture
def scratch() -> Iterator[Path]:
    """World-traversable, as /opt and /var/lib are: group members must reach the files."""
    root = Path(tempfile.mkdtemp(prefix="vmi-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def users() -> Iterator[list[str]]:
    made: list[str] = []
    try:
        yield made
    finally:
        for user in made:
            subprocess.run(["userdel", user], capture_output=True, check=False)


def _add_user(users: list[str], groups: list[str]) -> str:
    name = f"vmt{secrets.token_hex(3)}"
    argv = ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
    if groups:
        argv[1:1] = ["--groups", ",".join(groups)]
    _run(argv)
    users.append(name)
    return name


def test_install_mesh_request_group_member_and_uninstall(scratch: Path, users: list[str]) -> None:
    skip_unless_lab()
    if not (BASE_DIR / "manifest.json").is_file():
        pytest.skip(f"no base image at {BASE_DIR} (scripts/test.sh builds it)")
    env = {
        "VMMESH_OPT": str(scratch / "opt"),
        "VMMESH_BIN": str(scratch / "bin"),
        "VMMESH_ETC": str(scratch / "etc"),
        "VMMESH_UNITS": str(scratch / "units"),
        "VMMESH_DATA": str(scratch / "data"),
    }
    _run(["bash", str(REPO / "scripts/install.sh")], env)
    vmmesh = scratch / "bin" / "vmmesh"
    assert vmmesh.is_symlink() and os.access(vmmesh, os.X_OK)
    python = (scratch / "opt" / "bin" / "python").resolve()
    assert not str(python).startswith("/root"), "group members must be able to run it"
    config = (scratch / "etc" / "config.toml").read_text()
    assert "# storage_quota_mb = 20000" in config
    assert (scratch / "units" / "vmmesh-node.service").is_file()
    data = scratch / "data"
    assert (data.stat().st_mode & 0o777) == 0o750

    lab_dir = scratch / "lab"
    lab: Lab | None = None
    try:
        lab = lab_up(
            2,
            lab_dir,
            tag=unique_tag(),
            cli_argv=[str(vmmesh)],
            image=BASE_DIR,
            warm_seed=suite_warm_seed(BASE_DIR),  # the request resumes: no cold boot
            node_args=["--accel=tcg"],  # as every lab: no 8 s KVM probe per host
        )
        for h in lab.hosts:  # as install.sh leaves /var/lib/vmmesh
            Path(h.data_dir).chmod(0o750)
            shutil.chown(h.data_dir, group="vmmesh")
        (lab_dir / "hosts").chmod(0o755)
        lab_dir.chmod(0o755)
        reply = json.loads(lab.cli(2, "request", "web", "1", "--json").stdout)
        assert reply["placed"] == 1, reply
        # a member of group vmmesh runs the CLI; anyone else gets one clear line
        member = _add_user(users, ["vmmesh"])
        h1 = lab.hosts[0].data_dir
        out = _run(["runuser", "-u", member, "--", str(vmmesh), "--data-dir", h1, "vms", "--json"])
        assert [v["name"] for v in json.loads(out)["vms"]] == ["web-1"]
        stranger = _add_user(users, [])
        res = subprocess.run(
            ["runuser", "-u", stranger, "--", str(vmmesh), "--data-dir", h1, "status"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == 1, res
        assert res.stderr.count("\n") == 1 and "permission denied" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        removed = json.loads(lab.cli(1, "shutdown", "web", "--json").stdout)["removed"]
        assert [r["name"] for r in removed] == ["web-1"]
    finally:
        if lab is not None:
            lab_down(lab_dir)

    _run(["bash", str(REPO / "scripts/install.sh"), "--uninstall"], env)
    for gone in ("opt", "bin/vmmesh", "etc", "units/vmmesh-node.service"):
        assert not (scratch / gone).exists(), gone
    assert data.is_dir(), "the data directory is kept"
