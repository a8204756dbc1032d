"""A lab of N vmmesh hosts on one Linux machine: network namespaces on a bridge.

Theory of operation
-------------------
``lab_up`` builds, with iproute2 (``ip``) and as root::

    bridge vmmbr-<tag>   10.213.<k>.254/24, multicast snooping off (mDNS floods)
      +- veth vmv<tag>-<i>  ==  eth0 in netns vmmesh-<tag>-<i>   10.213.<k>.<i>/24

and, unless ``start_nodes=False``, joins the hosts into one mesh through the
real commands (``init`` on h1, ``invite`` on h1 + ``join`` inside each other
namespace) and runs ``vmmesh node`` in each namespace, each in its own
session with its own data directory ``<lab_dir>/hosts/h<i>`` and log
``node.log`` there.

Every resource is recorded in ``<lab_dir>/lab.json`` (temp file + rename)
*before* the next one is made, so ``lab_down`` can remove exactly what was
made even if the process that ran ``lab_up`` was killed half-way.  As a belt,
``lab_down`` also removes anything whose name carries the lab's tag prefix and
kills every process still inside those namespaces (``ip netns pids``), since a
namespace with a live process in it would keep its veth alive.  Recorded pids
are checked against their recorded start time before being signalled, so a
reused pid is never killed.

This module is plain blocking code (subprocess): it runs from the CLI and
from test fixtures, never inside the node.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vmmesh.errors import StateError, SubnetInUse, UsageError
from vmmesh.host.images import ImageStore

LAB_FILE = "lab.json"
LAB_VERSION = 1
DEFAULT_PORT = 7400
MAX_HOSTS = 253
TAG = re.compile(r"^[a-z0-9]{1,8}$")  # bridge "vmmbr-" + 8 and veth "vmv" + 8 + "-999" fit 15
_STOP_GRACE = 10.0


@dataclass(frozen=True)
class LabHost:
    """One lab host: its namespace, link, address and node process."""

    index: int
    netns: str
    veth: str
    address: str
    data_dir: str
    pid: int = 0
    pid_start: int = 0  # /proc/<pid>/stat start time, to recognise a reused pid


@dataclass(frozen=True)
class Lab:
    """What a lab is made of, as recorded in lab.json."""

    tag: str
    lab_dir: str
    subnet: int
    bridge: str
    bridge_address: str
    port: int = DEFAULT_PORT
    node_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cli_argv: tuple[str, ...] = ()  # how to run `vmmesh`; empty: this interpreter's
    hosts: tuple[LabHost, ...] = ()
    version: int = LAB_VERSION

    def host(self, i: int) -> LabHost:
        for h in self.hosts:
            if h.index == i:
                return h
        raise UsageError(f"lab {self.tag} has no host {i} (hosts 1..{len(self.hosts)})")

    def host_data_dir(self, i: int) -> Path:
        return Path(self.host(i).data_dir)

    def host_address(self, i: int) -> str:
        return self.host(i).address

    def host_netns(self, i: int) -> str:
        return self.host(i).netns

    def lab_exec(
        self, i: int, argv: Sequence[str], *, check: bool = True, timeout: float | None = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside host ``i``'s namespace; output captured as text."""
        return subprocess.run(
            ["ip", "netns", "exec", self.host_netns(i), *argv],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            env=self._env(),
        )

    def cli(self, i: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``vmmesh <args> --data-dir <host i>`` inside host ``i``'s namespace."""
        cmd, *rest = args
        return self.lab_exec(
            i, [*self.vmmesh_argv(), cmd, "--data-dir", self.host(i).data_dir, *rest], check=check
        )

    def kill_host(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Signal host ``i``'s node (its whole session) if it is still ours."""
        h = self.host(i)
        if h.pid and _same_process(h.pid, h.pid_start):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(h.pid, sig)

    def start_host(self, i: int) -> Lab:
        """Start host ``i``'s node and wait until it answers; returns the updated lab."""
        lab = _start_node(self, self.host(i))
        _wait_ready(lab, i)
        return lab

    def with_node_args(self, node_args: Sequence[str]) -> Lab:
        """The same lab with other ``vmmesh node`` arguments for nodes started from now on."""
        lab = replace(self, node_args=tuple(node_args))
        _save(lab)
        return lab

    def start_all(self) -> Lab:
        """Init, join and start every host's node (a lab made with start_nodes=False)."""
        return _join_and_start(self)

    def restart_host(self, i: int) -> Lab:
        """Stop host ``i``'s node (TERM, then KILL) and start it again."""
        _stop_host(self.host(i))
        return self.start_host(i)

    def vmmesh_argv(self) -> list[str]:
        """The CLI as recorded, else this interpreter's, so the lab uses the same venv."""
        return list(self.cli_argv) or [sys.executable, "-m", "vmmesh_cli"]

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def names(tag: str) -> tuple[str, str, str]:
    """(bridge, netns prefix, veth prefix) for ``tag``; the belt in lab_down uses them."""
    if not TAG.match(tag):
        raise UsageError(f"lab tag must be 1-8 lowercase letters or digits: {tag!r:.40}")
    return f"vmmbr-{tag}", f"vmmesh-{tag}-", f"vmv{tag}-"


def default_subnet(tag: str) -> int:
    """Third octet of 10.213.<k>.0/24, derived from the tag so that labs differ."""
    return zlib.crc32(tag.encode()) % 250 + 1


def lab_up(
    n: int,
    lab_dir: Path | str,
    *,
    tag: str = "lab",
    subnet: int | None = None,
    port: int = DEFAULT_PORT,
    node_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    start_nodes: bool = True,
    cli_argv: Sequence[str] = (),
    image: Path | None = None,
    warm_seed: Path | None = None,
) -> Lab:
    """Make a lab of ``n`` hosts; on any failure, remove what was made and raise.

    ``image`` (a base image directory) is put into every host's image store
    before its node starts, hard-linked where the file system allows: base
    images are never written to, and every host must hold the same one.
    ``warm_seed`` (a directory holding ``<image id>/``, a warm state of that
    image made on this machine) is linked into every host's ``warm/``, so no
    host boots the image once just to save it: the hosts of a lab on one
    machine would all make the same state.  A host that cannot resume it
    deletes it and boots cold, as it would have.

    ``node_args`` are appended to every ``vmmesh node`` command line, ``env``
    to the environment of every command; ``cli_argv`` replaces how ``vmmesh``
    is run (an installed entry point, or a stand-in in tests).
    """
    if os.geteuid() != 0:
        raise UsageError("a lab needs root (network namespaces and a bridge)")
    if not 1 <= n <= MAX_HOSTS:
        raise UsageError(f"a lab has 1..{MAX_HOSTS} hosts, not {n}")
    bridge, ns_prefix, veth_prefix = names(tag)
    k = default_subnet(tag) if subnet is None else subnet
    if not 0 <= k <= 255:
        raise UsageError(f"subnet octet must be 0..255, not {k}")
    root = Path(lab_dir).resolve()
    if (root / LAB_FILE).exists():
        raise UsageError(f"{root / LAB_FILE} exists: run lab down first")
    if _link_exists(bridge):
        raise UsageError(f"bridge {bridge} exists: another lab with tag {tag!r} is up")
    if f"10.213.{k}." in _run(["ip", "-o", "addr", "show"]).stdout:
        raise SubnetInUse(f"10.213.{k}.0/24 is already in use here: choose another subnet")
    stale = [d for d in (root / "hosts").glob("h*") if start_nodes and any(d.iterdir())]
    if stale:
        raise UsageError(f"{stale[0]} holds a previous host's state: remove {root / 'hosts'}")
    (root / "hosts").mkdir(parents=True, exist_ok=True)
    lab = Lab(
        tag=tag,
        lab_dir=str(root),
        subnet=k,
        bridge=bridge,
        bridge_address=f"10.213.{k}.254",
        port=port,
        node_args=tuple(node_args),
        env=dict(env or {}),
        cli_argv=tuple(cli_argv),
    )
    try:
        _save(lab)
        _run(["ip", "link", "add", bridge, "type", "bridge", "mcast_snooping", "0"])
        _run(["ip", "addr", "add", f"{lab.bridge_address}/24", "dev", bridge])
        _run(["ip", "link", "set", bridge, "up"])
        for i in range(1, n + 1):
            h = LabHost(
                index=i,
                netns=f"{ns_prefix}{i}",
                veth=f"{veth_prefix}{i}",
                address=f"10.213.{k}.{i}",
                data_dir=str(root / "hosts" / f"h{i}"),
            )
            lab = replace(lab, hosts=(*lab.hosts, h))
            _save(lab)
            _make_host(lab, h)
        if image is not None:
            for h in lab.hosts:
                store = ImageStore(Path(h.data_dir))
                image_id = store.import_image(Path(image), link=True).image_id
                store.set_default(image_id)
                if warm_seed is not None:
                    seed_warm(Path(warm_seed) / image_id, Path(h.data_dir))
        if start_nodes:
            lab = _join_and_start(lab)
    except BaseException:
        with contextlib.suppress(Exception):
            lab_down(root)
        raise
    return lab


def load_lab(lab_dir: Path | str) -> Lab:
    """Read lab.json (StateError if it is missing or unreadable)."""
    path = Path(lab_dir) / LAB_FILE
    try:
        d: dict[str, Any] = json.loads(path.read_text())
        hosts = tuple(LabHost(**h) for h in d.pop("hosts"))
        d["node_args"] = tuple(d["node_args"])
        d["cli_argv"] = tuple(d["cli_argv"])
        lab = Lab(**d, hosts=hosts)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise StateError(f"cannot read {path}: {exc}") from exc
    if lab.version != LAB_VERSION:
        raise StateError(f"{path} has version {lab.version}, expected {LAB_VERSION}")
    return lab


def lab_down(lab_dir: Path | str, *, tag: str | None = None) -> list[str]:
    """Remove every process, namespace, veth and bridge of the lab; returns what it removed.

    Works from lab.json when there is one; ``tag`` (or the recorded tag) also
    sweeps anything named after it.  Idempotent: a second call removes nothing.
    """
    root = Path(lab_dir)
    lab: Lab | None = None
    with contextlib.suppress(StateError):
        lab = load_lab(root)
    tags = {t for t in (tag, lab.tag if lab else None) if t}
    if lab is None and not tags:
        return []
    removed: list[str] = []
    netns: set[str] = set()
    links: set[str] = set()
    if lab is not None:
        for h in lab.hosts:
            _stop_host(h)
            netns.add(h.netns)
            links.add(h.veth)
        links.add(lab.bridge)
    existing_ns = _list_netns()
    existing_links = _list_links()
    for t in tags:
        bridge, ns_prefix, veth_prefix = names(t)
        netns |= {ns for ns in existing_ns if ns.startswith(ns_prefix)}
        links |= {ln for ln in existing_links if ln.startswith(veth_prefix) or ln == bridge}
    for ns in sorted(netns & existing_ns):
        _kill_netns_processes(ns)
        _run(["ip", "netns", "delete", ns], check=False)
        removed.append(f"netns {ns}")
    remaining = _list_links()
    for ln in sorted(links & remaining, key=lambda s: s.startswith("vmmbr-")):
        _run(["ip", "link", "delete", ln], check=False)
        removed.append(f"link {ln}")
    # The kernel destroys a namespace's veth asynchronously: wait for it.
    deadline = time.monotonic() + 10.0
    while links & _list_links() and time.monotonic() < deadline:
        time.sleep(0.05)
    if left := links & _list_links():
        raise StateError(f"lab {sorted(tags)} links still present: {sorted(left)}")
    with contextlib.suppress(FileNotFoundError):
        (root / LAB_FILE).unlink()
    return removed


def lab_status(lab_dir: Path | str) -> list[dict[str, Any]]:
    """Per host: index, namespace, address, whether its node process is alive."""
    lab = load_lab(lab_dir)
    ns = _list_netns()
    return [
        {
            "host": h.index,
            "netns": h.netns,
            "address": h.address,
            "netns_present": h.netns in ns,
            "node_running": bool(h.pid) and _same_process(h.pid, h.pid_start),
            "data_dir": h.data_dir,
        }
        for h in lab.hosts
    ]


# --- building -------------------------------------------------------------


def _make_host(lab: Lab, h: LabHost) -> None:
    ns = ["ip", "-n", h.netns]
    _run(["ip", "netns", "add", h.netns])
    _run(["ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns])
    _run(["ip", "link", "set", h.veth, "master", lab.bridge])
    _run(["ip", "link", "set", h.veth, "up"])
    _run([*ns, "link", "set", "lo", "up"])
    _run([*ns, "addr", "add", f"{h.address}/24", "dev", "eth0"])
    _run([*ns, "link", "set", "eth0", "up"])
    # Multicast sockets that do not pick an interface follow the default route.
    _run([*ns, "route", "add", "default", "via", lab.bridge_address])
    Path(h.data_dir).mkdir(parents=True, exist_ok=True)


def _join_and_start(lab: Lab) -> Lab:
    first = lab.hosts[0]
    lab.cli(first.index, "init", "--name", f"h{first.index}")
    lab = lab.start_host(first.index)
    for h in lab.hosts[1:]:
        out = lab.cli(first.index, "invite", "--json").stdout
        try:
            token = json.loads(out)["token"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"`vmmesh invite --json` printed {out!r:.200}") from exc
        lab.cli(h.index, "join", str(token), "--name", f"h{h.index}")
        lab = lab.start_host(h.index)
    return lab


def _start_node(lab: Lab, h: LabHost) -> Lab:
    argv = [
        "ip", "netns", "exec", h.netns, *lab.vmmesh_argv(),
        "node", "--data-dir", h.data_dir, "--listen", h.address, "--port", str(lab.port),
        *lab.node_args,
    ]  # fmt: skip
    log_path = Path(h.data_dir) / "node.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=lab._env(),
        )
    # `ip netns exec` execs the command, so this pid is the node's.
    started = replace(h, pid=proc.pid, pid_start=_start_time(proc.pid))
    lab = replace(lab, hosts=tuple(started if x.index == h.index else x for x in lab.hosts))
    _save(lab)
    return lab


def _wait_ready(lab: Lab, i: int, timeout: float = 60.0) -> None:
    """Poll `vmmesh status --json` until it exits 0 (the node's control socket answers)."""
    h = lab.host(i)
    deadline = time.monotonic() + timeout
    while True:
        if not _same_process(h.pid, h.pid_start):
            raise StateError(f"node h{i} exited during start: {_log_tail(h)}")
        if lab.cli(i, "status", "--json", check=False).returncode == 0:
            return
        if time.monotonic() > deadline:
            raise StateError(f"node h{i} not ready after {timeout:.0f} s: {_log_tail(h)}")
        time.sleep(0.2)


def _log_tail(h: LabHost, lines: int = 3) -> str:
    """The end of a host's node.log, so a failed start says why without a hunt."""
    path = Path(h.data_dir) / "node.log"
    try:
        tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        tail = []
    return f"{' | '.join(tail) or '(empty log)'} (see {path})"


# --- tearing down ---------------------------------------------------------


def _stop_host(h: LabHost) -> None:
    if not h.pid or not _same_process(h.pid, h.pid_start):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(h.pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE
    while _same_process(h.pid, h.pid_start) and time.monotonic() < deadline:
        _reap(h.pid)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(h.pid, signal.SIGKILL)
    _reap(h.pid)


def _kill_netns_processes(ns: str) -> None:
    pids = [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (_STOP_GRACE if sig == signal.SIGTERM else 2.0)
        while pids and time.monotonic() < deadline:
            for pid in pids:
                _reap(pid)
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
            time.sleep(0.05)


def _reap(pid: int) -> None:
    """Collect our own exited child so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# --- small system helpers -------------------------------------------------


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if check and proc.returncode != 0:
        raise StateError(f"{' '.join(argv)} failed: {proc.stderr.strip()[:300]}")
    return proc


def _list_netns() -> set[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _list_links() -> set[str]:
    out = _run(["ip", "-o", "link", "show"], check=False).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def _link_exists(name: str) -> bool:
    return name in _list_links()


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()  # after "pid (comm)": state is field 0


def _start_time(pid: int) -> int:
    f = _stat_fields(pid)
    return int(f[19]) if f else 0


def _is_zombie(pid: int) -> bool:
    f = _stat_fields(pid)
    return f is None or f[0] in ("Z", "X")


def _same_process(pid: int, start: int) -> bool:
    f = _stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X") and int(f[19]) == start


def _save(lab: Lab) -> None:
    path = Path(lab.lab_dir) / LAB_FILE
    tmp = path.with_suffix(".json.tmp")
    with tmp.open("w") as f:
        json.dump(asdict(lab), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def seed_warm(seed: Path, data_dir: Path) -> None:
    """Link a warm state made on this machine into a host's ``warm/`` (no copy: a warm
    state is only read, and a host that drops it unlinks its own names)."""
    if not (seed / "shape.json").is_file():
        return
    dest = data_dir / "warm" / seed.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(seed, dest, copy_function=_link_or_copy, dirs_exist_ok=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)
