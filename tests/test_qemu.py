"""The QEMU backend: command line, qemu-img, and real QEMU processes.

Without the base image, guests boot the accel probe payload (a 182-byte
multiboot kernel that halts with timer interrupts on): enough for the
monitor, process handling, save/resume and adoption.  Tests that need a
real Debian guest with its agent are marked ``qemu`` and skip when the base
image is absent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from vmmesh.errors import GuestAgentError, HypervisorError, QemuImgFailed, QMPError
from vmmesh.host.sshkeys import PREPARE_SCRIPT, check_public_key, known_hosts_line, pick_port
from vmmesh.hypervisor.accel import probe_payload
from vmmesh.hypervisor.base import BootSpec, Guest, Hypervisor
from vmmesh.hypervisor.qemu import (
    PID_FILE,
    SPEC_FILE,
    QemuGuest,
    QemuHypervisor,
    boot_gave_up,
    clock_argv,
    load_spec,
    parse_disk_info,
    qemu_argv,
    spec_from_json,
    spec_to_json,
)

DEV_CACHE = Path("/var/cache/vmmesh-dev")


def _find_base_dir() -> Path | None:
    """The base image directory (resolved): $VMMESH_BASE_IMAGE_DIR, the dev cache, its store."""
    if env := os.environ.get("VMMESH_BASE_IMAGE_DIR"):
        return Path(env)
    candidates = [DEV_CACHE / "base", *sorted((DEV_CACHE / "store" / "images").glob("*"))]
    found = next((d for d in candidates if (d / "manifest.json").is_file()), None)
    return None if found is None else found.resolve()  # a rebuild moves the link


needs_qemu_binaries = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
    reason="qemu-system-x86_64 and qemu-img are not installed",
)


def _spec(tmp: Path, **kw: object) -> BootSpec:
    args: dict[str, object] = {
        "name": "vm1",
        "disk": tmp / "disk.qcow2",
        "kernel": tmp / "probe.bin",
        "initrd": tmp / "probe.bin",
        "run_dir": tmp / "run",
        "memory_mb": 64,
        "network": "none",
    }
    args.update(kw)
    return BootSpec(**args)  # type: ignore[arg-type]


# --- pure parts ------------------------------------------------------------


def test_argv_tcg_user_net_with_ssh_forward(tmp_path: Path) -> None:
    spec = _spec(tmp_path, network="user", ssh_port=2222, vcpus=2)
    argv = qemu_argv(spec, accel="tcg")
    joined = " ".join(argv)
    assert argv[argv.index("-cpu") + 1] == "max"
    assert argv[argv.index("-machine") + 1] == "q35,accel=tcg"
    assert argv[argv.index("-smp") + 1] == "2"
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in joined
    wide = qemu_argv(dataclasses.replace(spec, ssh_bind="0.0.0.0"), accel="tcg")
    assert "hostfwd=tcp:0.0.0.0:2222-:22" in " ".join(wide)
    with pytest.raises(HypervisorError, match="IPv4"):
        qemu_argv(dataclasses.replace(spec, ssh_bind="x,hostfwd=tcp::1-:1"), accel="tcg")
    assert f"unix:{tmp_path}/run/qmp.sock,server=on,wait=off" in argv
    assert "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0" in argv
    assert "-daemonize" not in argv
    assert "-incoming" not in argv


def test_argv_kvm_bridge_incoming_and_comma_escaping(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path, network="bridge:br0", disk=tmp_path / "a,b.qcow2", incoming=tmp_path / "s"
    )
    argv = qemu_argv(spec, accel="kvm", machine="pc", cache="writeback")
    assert argv[argv.index("-cpu") + 1] == "host"
    assert "bridge,id=n0,br=br0" in argv
    drive = argv[argv.index("-drive") + 1]
    assert drive == (
        f"file={tmp_path}/a,,b.qcow2,if=virtio,format=qcow2,cache=writeback,"
        "discard=unmap,detect-zeroes=unmap"
    )
    assert argv[argv.index("-incoming") + 1] == f"exec:cat {tmp_path}/s"


def test_argv_rejects_unknown_network_and_overlong_socket_paths(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match="network"):
        qemu_argv(_spec(tmp_path, network="tap"), accel="tcg")
    with pytest.raises(HypervisorError, match="too long"):
        qemu_argv(_spec(tmp_path, run_dir=tmp_path / ("x" * 100)), accel="tcg")


def test_the_clock_command_carries_every_nanosecond() -> None:
    assert clock_argv(1_765_000_000_000_000_123) == ["date", "-u", "-s", "@1765000000.000000123"]
    assert clock_argv(5_999_999_999) == ["date", "-u", "-s", "@5.999999999"]


def test_spec_json_round_trip(tmp_path: Path) -> None:
    spec = _spec(tmp_path, ssh_port=2200, ssh_bind="0.0.0.0", incoming=tmp_path / "state")
    assert spec_from_json(spec_to_json(spec)) == spec
    with pytest.raises(HypervisorError):
        spec_from_json("{}")


def test_parse_disk_info() -> None:
    info = parse_disk_info(
        Path("/d/x.qcow2"),
        {
            "virtual-size": 1 << 30,
            "actual-size": 200704,
            "format": "qcow2",
            "backing-filename": "/d/base.qcow2",
            "full-backing-filename": "/d/base.qcow2",
        },
    )
    assert info.virtual_size == 1 << 30
    assert info.backing_file == Path("/d/base.qcow2")
    assert parse_disk_info(Path("b"), {"virtual-size": 1, "format": "raw"}).backing_file is None
    with pytest.raises(HypervisorError):
        parse_disk_info(Path("b"), {"format": "raw"})


# --- qemu-img ----------------------------------------------------------------


@needs_qemu_binaries
@pytest.mark.qemu
async def test_overlay_chain_info_rebase_flatten_check(tmp_path: Path) -> None:
    hv: Hypervisor = QemuHypervisor()
    base = tmp_path / "base.qcow2"
    await trio.run_process(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"])
    os.chdir(tmp_path)  # a relative backing path must still be stored absolute
    try:
        over = await hv.create_overlay(Path("base.qcow2"), tmp_path / "over.qcow2")
    finally:
        os.chdir("/")
    assert over.backing_file == base
    assert over.virtual_size == 64 << 20
    assert over.format == "qcow2"

    moved = tmp_path / "moved.qcow2"
    base.rename(moved)
    await hv.rebase_unsafe(tmp_path / "over.qcow2", moved)
    assert (await hv.disk_info(tmp_path / "over.qcow2")).backing_file == moved

    flat = await hv.flatten(tmp_path / "over.qcow2", tmp_path / "flat.qcow2")
    assert flat.backing_file is None
    assert not (tmp_path / "flat.qcow2.tmp").exists()
    await hv.check_disk(flat.path)


@pytest.mark.parametrize(("status", "raises"), [(0, False), (3, False), (2, True), (1, True)])
async def test_check_disk_reads_qemu_imgs_exit_status(
    tmp_path: Path, status: int, raises: bool
) -> None:
    """Leaked clusters (3) pass, corruption (2) and failure (1) raise with the number."""
    fake = tmp_path / "qemu-img"
    fake.write_text(f"#!/bin/sh\necho 'whatever it says' >&2\nexit {status}\n")
    fake.chmod(0o755)
    hv = QemuHypervisor(qemu_img=str(fake))
    if not raises:
        await hv.check_disk(tmp_path / "disk.qcow2")
        return
    with pytest.raises(QemuImgFailed) as info:
        await hv.check_disk(tmp_path / "disk.qcow2")
    assert info.value.returncode == status


@needs_qemu_binaries
@pytest.mark.qemu
async def test_check_disk_and_info_report_broken_images(tmp_path: Path) -> None:
    hv = QemuHypervisor()
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(100))
    with pytest.raises(HypervisorError, match="qemu-img"):
        await hv.check_disk(bad)
    with pytest.raises(HypervisorError, match="qemu-img info"):
        await hv.disk_info(tmp_path / "missing.qcow2")


# --- real QEMU processes with the probe payload --------------------------------


@pytest.fixture
async def guests() -> AsyncIterator[list[QemuGuest]]:
    """Every QEMU a test starts; all are killed and reaped at the end, pass or fail."""
    started: list[QemuGuest] = []
    try:
        yield started
    finally:
        with trio.CancelScope(shield=True):
            for guest in started:
                await guest.kill()


@pytest.fixture
async def probe_vm(tmp_path: Path) -> AsyncIterator[BootSpec]:
    (tmp_path / "probe.bin").write_bytes(probe_payload())
    await trio.run_process(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "disk.qcow2"), "16M"]
    )
    yield _spec(tmp_path)


@needs_qemu_binaries
@pytest.mark.qemu
async def test_start_query_kill_wait_exit(probe_vm: BootSpec, guests: list[QemuGuest]) -> None:
    hv = QemuHypervisor(machine="pc")
    guest = await hv.start(probe_vm)
    guests.append(guest)
    assert await guest.query_status() == "running"
    assert int((probe_vm.run_dir / PID_FILE).read_text()) == guest.pid
    assert load_spec(probe_vm.run_dir) == probe_vm
    await guest.qmp("stop")
    assert await guest.query_status() == "paused"
    await guest.qmp("cont")
    os.kill(guest.pid, signal.SIGKILL)  # killed from outside, as by the OOM killer
    assert await guest.wait_exit() == -signal.SIGKILL


@needs_qemu_binaries
@pytest.mark.qemu
async def test_a_running_guest_becomes_a_vm_with_an_ssh_forward(
    probe_vm: BootSpec, guests: list[QemuGuest]
) -> None:
    # What a warm spare needs: a guest started with no ssh forward gets one when a
    # VM takes it, and its spec file says so.
    hv = QemuHypervisor(machine="pc")
    spec = dataclasses.replace(probe_vm, network="user")
    guest = await hv.start(spec)
    guests.append(guest)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    await guest.become_vm("127.0.0.1", port)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # QEMU's user-mode network listens for the guest's port 22
    assert load_spec(spec.run_dir) == spec.with_ssh(port, "127.0.0.1")
    assert await guest.query_status() == "running"
    with pytest.raises(HypervisorError, match="ssh forward"):
        await guest.become_vm("127.0.0.1", port)  # taken: said, not ignored


@needs_qemu_binaries
@pytest.mark.qemu
async def test_qemu_that_fails_to_start_is_reported(probe_vm: BootSpec) -> None:
    hv = QemuHypervisor(machine="pc")
    spec = _spec(probe_vm.run_dir.parent, kernel=probe_vm.run_dir.parent / "missing.bin")
    with pytest.raises(HypervisorError, match=r"exited with 1: .*missing\.bin"):
        await hv.start(spec)


@needs_qemu_binaries
@pytest.mark.qemu
async def test_guest_survives_its_starter_and_is_adopted(
    probe_vm: BootSpec, guests: list[QemuGuest]
) -> None:
    hv = QemuHypervisor(machine="pc")
    guest = await hv.start(probe_vm)
    guests.append(guest)
    assert os.getsid(guest.pid) == guest.pid  # own session: a dying node leaves it alone

    adopted = await QemuHypervisor().adopt("vm1", probe_vm.run_dir)
    assert isinstance(adopted, QemuGuest)
    assert adopted.pid == guest.pid
    assert await adopted.query_status() == "running"
    await adopted.kill()  # an adopted guest is watched through a pidfd
    assert await adopted.wait_exit() == -1
    await guest.wait_exit()  # reap our child
    assert await hv.adopt("vm1", probe_vm.run_dir) is None


@needs_qemu_binaries
@pytest.mark.qemu
async def test_adopt_refuses_a_pid_that_is_not_this_guest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / PID_FILE).write_text(str(os.getpid()))
    assert await QemuHypervisor().adopt("vm1", run) is None
    (run / PID_FILE).write_text("garbage")
    assert await QemuHypervisor().adopt("vm1", run) is None


@needs_qemu_binaries
@pytest.mark.qemu
async def test_save_state_then_resume_incoming(probe_vm: BootSpec, guests: list[QemuGuest]) -> None:
    hv = QemuHypervisor(machine="pc")
    guest = await hv.start(probe_vm)
    guests.append(guest)
    state = probe_vm.run_dir.parent / "state.bin"
    await guest.save_state(state)
    assert state.stat().st_size > 0
    assert not state.with_name("state.bin.tmp").exists()

    resumed = await hv.start(
        _spec(probe_vm.run_dir.parent, incoming=state, run_dir=probe_vm.run_dir.parent / "run2")
    )
    guests.append(resumed)
    assert await resumed.query_status() == "running"
    await resumed.shutdown(timeout=1.0)  # no agent in the payload: falls back to QMP quit
    assert await resumed.wait_exit() == 0


@pytest.mark.parametrize(
    ("waited", "cpu", "gave_up"),
    [
        (60.0, 60.0, False),  # a boot alone: well within its time
        (299.0, 299.0, False),  # never before the timeout
        (300.0, 200.0, True),  # spinning: two boots' CPU and no agent
        (300.0, 80.0, False),  # seven guests on two cores: slow, not hung
        (600.0, 149.0, False),
        (600.0, 150.0, True),  # it has had half a core on average
        (900.0, 10.0, True),  # idle and silent for three timeouts: hung
        (300.0, None, True),  # no CPU figure: the wall clock, as before
    ],
)  # fmt: skip
def test_a_slow_boot_on_a_busy_host_is_not_taken_for_a_hung_one(
    waited: float, cpu: float | None, gave_up: bool
) -> None:
    assert boot_gave_up(waited, cpu, 300.0) is gave_up


@needs_qemu_binaries
@pytest.mark.qemu
async def test_wait_agent_times_out_without_an_agent(
    probe_vm: BootSpec, guests: list[QemuGuest]
) -> None:
    guest = await QemuHypervisor(machine="pc").start(probe_vm)
    guests.append(guest)
    with pytest.raises(GuestAgentError, match="did not answer"):
        await guest.wait_agent(1.5)
    await guest.kill()


# --- a real Debian guest (the base image) ---------------------------------------


@pytest.fixture
def base_spec(tmp_path: Path) -> tuple[Path, dict[str, str], BootSpec]:
    """Skips here, in a plain fixture, so that the reason reaches the report."""
    base_dir = _find_base_dir()
    if base_dir is None:
        pytest.skip(f"no base image (no manifest.json under {DEV_CACHE}/base or its store)")
    manifest = json.loads((base_dir / "manifest.json").read_text())
    spec = BootSpec(
        name="deb",
        disk=tmp_path / "vm.qcow2",
        kernel=base_dir / manifest["kernel"],
        initrd=base_dir / manifest["initrd"],
        cmdline=manifest["cmdline"],
        run_dir=tmp_path / "run",
        vcpus=2,
        memory_mb=1024,
    )
    return base_dir, manifest, spec


@pytest.fixture
async def debian(
    base_spec: tuple[Path, dict[str, str], BootSpec], guests: list[QemuGuest]
) -> AsyncIterator[tuple[QemuGuest, BootSpec]]:
    base_dir, manifest, spec = base_spec
    hv = QemuHypervisor(accel="tcg")
    await hv.create_overlay(base_dir / manifest["disk"], spec.disk)
    started = trio.current_time()
    guest = await hv.start(spec)
    guests.append(guest)
    try:
        await guest.wait_agent(300.0)  # TCG on 2 shared cores: 11-65 s seen
    except GuestAgentError:
        print((await guest.console())[-3000:].decode(errors="replace"))
        raise
    print(f"guest agent answered {trio.current_time() - started:.1f} s after QEMU started (TCG)")
    yield guest, spec


@pytest.mark.qemu
async def test_debian_guest_end_to_end(
    debian: tuple[QemuGuest, BootSpec], guests: list[QemuGuest]
) -> None:
    guest, spec = debian
    g: Guest = guest
    res = await g.exec(["cat", "/etc/os-release"])
    assert res.exit_code == 0
    assert b"debian" in res.stdout.lower()

    failing = await g.exec(["sh", "-c", "echo oops >&2; exit 7"])
    assert (failing.exit_code, failing.stderr) == (7, b"oops\n")

    piped = await g.exec(["cat"], input_data=b"hello stdin")
    assert piped.stdout == b"hello stdin"

    payload = os.urandom(200_000)  # several 48 KiB chunks
    await g.write_file("/tmp/blob", payload)
    assert await g.read_file("/tmp/blob") == payload
    with pytest.raises(GuestAgentError, match="over"):
        await g.read_file("/tmp/blob", limit=1000)

    big = await g.exec(["head", "-c", "10000000", "/dev/zero"], output_limit=64 << 10)
    assert big.truncated
    assert len(big.stdout) <= 64 << 10

    state = spec.run_dir.parent / "saved.state"
    t0 = trio.current_time()
    await guest.save_state(state)
    t1 = trio.current_time()
    resumed = await QemuHypervisor().start(
        dataclasses.replace(spec, incoming=state, run_dir=spec.run_dir.parent / "run2")
    )
    guests.append(resumed)
    await resumed.wait_agent(60.0)
    t2 = trio.current_time()
    size = state.stat().st_size >> 20
    print(f"save_state {t1 - t0:.1f} s ({size} MiB); resume until agent answers {t2 - t1:.1f} s")
    assert (await resumed.read_file("/tmp/blob"))[:100] == payload[:100]
    await resumed.shutdown(timeout=60.0)
    assert await resumed.wait_exit() == 0

    # the same state again (cheaper than a boot), this time killed from outside
    killed = await QemuHypervisor().start(
        dataclasses.replace(spec, incoming=state, run_dir=spec.run_dir.parent / "run3")
    )
    guests.append(killed)
    adopted = await QemuHypervisor().adopt(spec.name, killed.run_dir)
    assert adopted is not None
    os.kill(killed.pid, signal.SIGKILL)
    assert await adopted.wait_exit() == -1
    assert await killed.wait_exit() == -signal.SIGKILL


@needs_qemu_binaries
@pytest.mark.qemu
async def test_failed_save_state_leaves_the_guest_running(
    probe_vm: BootSpec, guests: list[QemuGuest]
) -> None:
    guest = await QemuHypervisor(machine="pc").start(probe_vm)
    guests.append(guest)
    with pytest.raises(QMPError, match="migration failed"):
        await guest.save_state(probe_vm.run_dir / "no-such-dir" / "state")
    assert await guest.query_status() == "running"


@needs_qemu_binaries
@pytest.mark.qemu
async def test_guest_outlives_the_node_process_that_started_it(
    probe_vm: BootSpec, guests: list[QemuGuest]
) -> None:
    script = (
        "import pathlib, sys, trio\n"
        "from vmmesh.hypervisor.qemu import QemuHypervisor, load_spec\n"
        "async def main():\n"
        "    g = await QemuHypervisor(machine='pc').start(load_spec(pathlib.Path(sys.argv[1])))\n"
        "    print(g.pid)\n"
        "trio.run(main)\n"
    )
    probe_vm.run_dir.mkdir()
    (probe_vm.run_dir / SPEC_FILE).write_text(spec_to_json(probe_vm))
    node = await trio.run_process(
        [sys.executable, "-c", script, str(probe_vm.run_dir)], capture_stdout=True
    )
    adopted = await QemuHypervisor().adopt("vm1", probe_vm.run_dir)
    assert adopted is not None
    guests.append(adopted)
    assert adopted.pid == int(node.stdout)
    assert await adopted.query_status() == "running"


def _free_local_port() -> int:
    def can_bind(port: int) -> bool:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    return pick_port(range(22000, 23000), [], can_bind)


@pytest.mark.qemu
async def test_ssh_into_a_guest_with_its_host_key_pinned(
    base_spec: tuple[Path, dict[str, str], BootSpec], guests: list[QemuGuest], tmp_path: Path
) -> None:
    """The base image's sshd (socket-activated), the prepare script and a pinned host key."""
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("no ssh client (openssh-client) here")
    base_dir, manifest, spec = base_spec
    spec = dataclasses.replace(spec, ssh_port=_free_local_port())
    hv = QemuHypervisor(accel="tcg")
    await hv.create_overlay(base_dir / manifest["disk"], spec.disk)
    guest = await hv.start(spec)
    guests.append(guest)
    await guest.wait_agent(300.0)
    assert spec.ssh_port is not None

    identity = tmp_path / "id_ed25519"
    await trio.run_process(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(identity)])
    public = check_public_key((tmp_path / "id_ed25519.pub").read_text())
    t0 = trio.current_time()
    prepared = [
        await guest.exec(["sh", "-c", PREPARE_SCRIPT], input_data=f"{public}\n".encode())
        for _ in range(2)
    ]
    t1 = trio.current_time()
    assert [p.exit_code for p in prepared] == [0, 0], prepared[0].stderr
    assert prepared[0].stdout == prepared[1].stdout, "the host key is made once"
    host_key = check_public_key(prepared[0].stdout.decode())
    authorized = (await guest.read_file("/root/.ssh/authorized_keys")).decode()
    assert authorized == f"{public}\n", "each key is added once"

    def ssh_argv(known: Path) -> list[str]:
        return [
            "ssh",
            "-i",
            str(identity),
            "-p",
            str(spec.ssh_port),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={known}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=120",
            "root@127.0.0.1",
            "id -u; cat /etc/hostname",
        ]

    known = tmp_path / "known_hosts"
    known.write_text(known_hosts_line("127.0.0.1", spec.ssh_port, host_key))
    done = await trio.run_process(
        ssh_argv(known), capture_stdout=True, capture_stderr=True, check=False
    )
    t2 = trio.current_time()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [b"0", b"vmmesh-guest"]
    print(
        f"ssh: prepare (host key made, key added) then again {t1 - t0:.1f} s; "
        f"first command over ssh {t2 - t1:.1f} s (TCG)"
    )

    # another host key for that address: ssh refuses (no silent trust on first use)
    other = tmp_path / "other"
    await trio.run_process(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)])
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(
        known_hosts_line("127.0.0.1", spec.ssh_port, (tmp_path / "other.pub").read_text())
    )
    refused = await trio.run_process(
        ssh_argv(wrong), capture_stdout=True, capture_stderr=True, check=False
    )
    assert refused.returncode != 0
    assert b"host key" in refused.stderr.lower()
