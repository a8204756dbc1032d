"""The test apt repository indexes its packages and serves them over HTTP."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import urllib.request
from pathlib import Path

from tests.aptrepo import DEFAULT_PACKAGES, AptRepo, DebPackage, apt_repo, control_text

__all__ = ["apt_repo"]  # the fixture is used by name below


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return bytes(resp.read())


def _stanzas(index: bytes) -> dict[str, dict[str, str]]:
    out = {}
    for block in index.decode().strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        out[fields["Package"]] = fields
    return out


def test_control_text_lists_dependencies() -> None:
    text = control_text(DebPackage("vmm-test-b", depends=("vmm-test-a",)))
    assert "Package: vmm-test-b\n" in text
    assert "Depends: vmm-test-a\n" in text
    assert text.endswith("Description: vmmesh test package vmm-test-b\n")


def test_serves_index_and_debs(apt_repo: AptRepo) -> None:
    index = _fetch(apt_repo.url + "Packages")
    stanzas = _stanzas(index)
    assert set(stanzas) == {p.name for p in DEFAULT_PACKAGES}
    assert stanzas["vmm-test-b"]["Depends"] == "vmm-test-a"
    assert gzip.decompress(_fetch(apt_repo.url + "Packages.gz")) == index

    release = _fetch(apt_repo.url + "Release").decode()
    assert f" {hashlib.sha256(index).hexdigest()} {len(index)} Packages\n" in release

    fields = stanzas["vmm-test-a"]
    deb = _fetch(apt_repo.url + fields["Filename"].removeprefix("./"))
    assert len(deb) == int(fields["Size"])
    assert hashlib.sha256(deb).hexdigest() == fields["SHA256"]
    assert "/Packages" in apt_repo.requests


def test_deb_installs_marker(apt_repo: AptRepo, tmp_path: Path) -> None:
    """The .deb really holds the marker file with the package's name."""
    deb = apt_repo.directory / "vmm-test-c_1.0_all.deb"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path / "x")], check=True)
    marker = tmp_path / "x" / DebPackage("vmm-test-c").marker_path.lstrip("/")
    assert marker.read_text() == "vmm-test-c\n"


def test_source_line_and_restart(tmp_path: Path) -> None:
    repo = AptRepo(tmp_path / "r", packages=[DebPackage("vmm-test-x", version="2.0")])
    with repo:
        assert repo.source_line() == f"deb [trusted=yes] http://10.0.2.2:{repo.port}/ ./"
        assert repo.source_line("192.0.2.1").startswith("deb [trusted=yes] http://192.0.2.1:")
        assert b"Version: 2.0" in _fetch(repo.url + "Packages")
    # stopped: the port is released, the object can serve again
    with repo:
        assert b"vmm-test-x" in _fetch(repo.url + "Packages")
