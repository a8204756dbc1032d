"""The accelerator probe: its payload, its verdict, and that it cleans up."""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmmesh.hypervisor import accel
from vmmesh.hypervisor.accel import payload_runs, probe_accel, probe_payload, probe_succeeded

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"
)


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    saved = dict(accel._cache)
    accel._cache.clear()
    try:
        yield
    finally:
        accel._cache.clear()
        accel._cache.update(saved)


def test_payload_is_a_valid_multiboot_image() -> None:
    image = probe_payload()
    magic, flags, checksum, header, load, load_end, bss_end, entry = struct.unpack_from(
        "<8I", image
    )
    assert magic == 0x1BADB002
    assert flags & (1 << 16)  # a.out kludge: addresses in the header
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0
    assert header == load == 0x100000
    assert (load_end, bss_end) == (0, 0)
    assert load < entry < load + len(image)
    assert image[entry - load : entry - load + 3] == b"\xfa\xb0K"  # cli; mov al, 'K'


@pytest.mark.parametrize(
    ("output", "ok"),
    [(b"KTTT", True), (b"xKTTTTTT", True), (b"KT", False), (b"TTTT", False), (b"", False)],
)
def test_probe_needs_the_marker_and_timer_ticks(output: bytes, ok: bool) -> None:
    assert probe_succeeded(output) is ok


async def test_unusable_device_means_tcg_without_running_qemu(tmp_path: Path) -> None:
    result = await probe_accel(
        qemu_binary=str(tmp_path / "no-qemu"), kvm_device=tmp_path / "no-kvm"
    )
    assert result == "tcg"


async def test_result_is_cached_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    async def fake_runs(accel_name: str, _deadline: float, _binary: str) -> bool:
        calls.append(accel_name)
        return True

    monkeypatch.setattr(accel, "payload_runs", fake_runs)
    device = tmp_path / "kvm"
    device.touch()
    assert await probe_accel(kvm_device=device) == "kvm"
    assert await probe_accel(kvm_device=device) == "kvm"
    assert calls == ["kvm"]


async def test_missing_binary_is_a_failed_run(tmp_path: Path) -> None:
    assert not await payload_runs("tcg", 1.0, str(tmp_path / "no-qemu"))


async def test_hanging_qemu_is_killed_at_the_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    fake = tmp_path / "hanging-qemu"
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 1000\n")
    fake.chmod(0o755)
    assert not await payload_runs("kvm", 1.0, str(fake))
    if pid_file.exists():  # it may have been killed before it wrote its pid
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


@needs_qemu
@pytest.mark.qemu
async def test_payload_runs_under_tcg() -> None:
    assert await payload_runs("tcg", 30.0, "qemu-system-x86_64")


def _children() -> list[int]:
    """Pids whose parent is this test process."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            kids.append(int(stat.parent.name))
    return kids


@needs_qemu
@pytest.mark.qemu
async def test_probe_answers_and_leaves_no_process() -> None:
    """On our lab machines KVM guests hang: set VMMESH_EXPECT_ACCEL=tcg to assert that."""
    result = await probe_accel(timeout=8.0)
    print(f"accelerator: {result}")
    assert result in {"kvm", "tcg"}
    assert _children() == []
    if expected := os.environ.get("VMMESH_EXPECT_ACCEL"):
        assert result == expected


async def test_the_verdict_is_kept_for_the_same_kernel_qemu_and_boot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine where KVM hangs pays the probe once per boot, not at every node start."""
    calls: list[str] = []

    async def hanging(accel_name: str, _deadline: float, _binary: str) -> bool:
        calls.append(accel_name)
        return False

    monkeypatch.setattr(accel, "payload_runs", hanging)
    device = tmp_path / "kvm"
    device.touch()
    cache = tmp_path / "accel.json"
    assert await probe_accel(kvm_device=device, cache_file=cache) == "tcg"
    accel._cache.clear()  # a new node process
    assert await probe_accel(kvm_device=device, cache_file=cache) == "tcg"
    assert calls == ["kvm"], "the second start read the kept verdict"
    # another boot (or kernel, or QEMU binary): probe again
    boot = tmp_path / "boot_id"
    boot.write_text("another boot\n")
    monkeypatch.setattr(
        accel, "verdict_key", lambda binary: accel.__dict__["_real_key"](binary, boot)
    )
    accel._cache.clear()
    assert await probe_accel(kvm_device=device, cache_file=cache) == "tcg"
    assert calls == ["kvm", "kvm"]


accel.__dict__["_real_key"] = accel.verdict_key


def test_a_garbled_verdict_file_means_probing_again(tmp_path: Path) -> None:
    cache = tmp_path / "accel.json"
    cache.write_text("{not json")
    assert accel._read_verdict(cache, "key") is None
    cache.write_text('{"key": "key", "accel": "warp"}')
    assert accel._read_verdict(cache, "key") is None
    cache.write_text('{"key": "key", "accel": "kvm"}')
    assert accel._read_verdict(cache, "key") == "kvm"
    assert accel._read_verdict(cache, "other") is None
