"""A tiny local apt repository for tests: a few .debs served over HTTP.

Guests install test packages from here instead of the Debian mirror, so
package-install tests are fast, offline and deterministic.  The repository is
"flat" (``deb [trusted=yes] http://HOST:PORT/ ./``): Packages and Release sit
next to the .debs.  From a QEMU user-mode guest the host's loopback is
10.0.2.2, so the default bind address 127.0.0.1 is reachable from guests;
a lab can bind a bridge address instead.

Each package ``vmm-test-X`` installs ``/usr/share/vmm-test-X/marker`` holding
its name; ``vmm-test-b`` depends on ``vmm-test-a`` so dependency resolution
is exercised too.  ``AptRepo.requests`` records every path fetched, so a
test can tell the guest really came here.

Usage::

    with AptRepo(tmp_path) as repo:
        line = repo.source_line()  # deb [trusted=yes] http://10.0.2.2:PORT/ ./
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str = "1.0"
    depends: tuple[str, ...] = ()

    @property
    def marker_path(self) -> str:
        """Where the package puts its marker file in the guest."""
        return f"/usr/share/{self.name}/marker"


DEFAULT_PACKAGES = (
    DebPackage("vmm-test-a"),
    DebPackage("vmm-test-b", depends=("vmm-test-a",)),
    DebPackage("vmm-test-c"),
    DebPackage("vmm-test-d"),
)


def control_text(pkg: DebPackage, extra: Sequence[str] = ()) -> str:
    """The package's control stanza; ``extra`` fields go before the description."""
    lines = [
        f"Package: {pkg.name}",
        f"Version: {pkg.version}",
        "Architecture: all",
        "Maintainer: vmmesh tests <tests@vmmesh.invalid>",
        "Section: misc",
        "Priority: optional",
    ]
    if pkg.depends:
        lines.append(f"Depends: {', '.join(pkg.depends)}")
    lines.extend(extra)
    lines.append(f"Description: vmmesh test package {pkg.name}")
    return "\n".join(lines) + "\n"


def build_deb(pkg: DebPackage, out_dir: Path) -> Path:
    """Build ``<name>_<version>_all.deb`` in ``out_dir`` with dpkg-deb."""
    staging = out_dir / f".build-{pkg.name}"
    try:
        (staging / "DEBIAN").mkdir(parents=True)
        (staging / "DEBIAN" / "control").write_text(control_text(pkg))
        marker = staging / pkg.marker_path.lstrip("/")
        marker.parent.mkdir(parents=True)
        marker.write_text(pkg.name + "\n")
        deb = out_dir / f"{pkg.name}_{pkg.version}_all.deb"
        subprocess.run(
            ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(staging), str(deb)],
            check=True,
            capture_output=True,
        )
        return deb
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def packages_entry(pkg: DebPackage, deb_name: str, data: bytes) -> str:
    """The Packages stanza for one .deb (what dpkg-scanpackages would write)."""
    return control_text(
        pkg,
        [
            f"Filename: ./{deb_name}",
            f"Size: {len(data)}",
            f"MD5sum: {hashlib.md5(data).hexdigest()}",
            f"SHA256: {hashlib.sha256(data).hexdigest()}",
        ],
    )


def release_text(files: dict[str, bytes]) -> str:
    """A Release file listing the index files by hash, as apt expects of a flat repo."""
    lines = [
        "Origin: vmmesh-tests",
        "Label: vmmesh-tests",
        "Suite: ./",
        f"Date: {formatdate(usegmt=True)}",
        "SHA256:",
    ]
    for name, data in sorted(files.items()):
        lines.append(f" {hashlib.sha256(data).hexdigest()} {len(data)} {name}")
    return "\n".join(lines) + "\n"


def build_repo(directory: Path, packages: Sequence[DebPackage] = DEFAULT_PACKAGES) -> None:
    """Build the .debs and the Packages, Packages.gz and Release index into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    stanzas = []
    for pkg in packages:
        deb = build_deb(pkg, directory)
        stanzas.append(packages_entry(pkg, deb.name, deb.read_bytes()))
    index = "\n".join(stanzas).encode()
    files = {"Packages": index, "Packages.gz": gzip.compress(index, mtime=0)}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    (directory / "Release").write_text(release_text(files))


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, format: str, *args: Any) -> None:
        self.requests.append(self.path)


class AptRepo:
    """A built repository and the HTTP server that serves it (``start``/``stop``)."""

    __test__ = False  # not a pytest class despite living under tests/

    def __init__(
        self,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        packages: Sequence[DebPackage] = DEFAULT_PACKAGES,
    ) -> None:
        self.directory = directory
        self.host = host
        self.packages = tuple(packages)
        self.requests: list[str] = []
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("AptRepo is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL as seen from this host."""
        return f"http://{self.host}:{self.port}/"

    def source_line(self, host: str = "10.0.2.2") -> str:
        """The apt sources line for a guest that reaches this host at ``host``."""
        return f"deb [trusted=yes] http://{host}:{self.port}/ ./"

    def start(self) -> None:
        build_repo(self.directory, self.packages)
        handler = type("Handler", (_Handler,), {"requests": self.requests})
        self._server = ThreadingHTTPServer(
            (self.host, self._port), partial(handler, directory=str(self.directory))
        )
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="aptrepo", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> AptRepo:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture
def apt_repo(tmp_path: Path) -> Iterator[AptRepo]:
    """A started repository on 127.0.0.1 (guests: ``repo.source_line()``); stopped after."""
    with AptRepo(tmp_path / "aptrepo") as repo:
        yield repo


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the test repository until interrupted (the demo's lab uses it)."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description="serve vmmesh's small test apt repository")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    with AptRepo(args.dir, host=args.host, port=args.port) as repo:
        print(f"serving {repo.url}", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    import signal as _signal

    _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGINT, _signal.SIGTERM})
    raise SystemExit(main())
