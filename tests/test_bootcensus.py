"""The boot census counts guests, not every run of a QEMU binary."""

from __future__ import annotations

from tests.bootcensus import guest_kind


def test_a_guest_is_cold_or_resumed_and_a_version_query_is_no_guest() -> None:
    guest = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-kernel", "vmlinuz"]
    assert guest_kind(guest) == "cold"
    assert guest_kind(["nice", "-n", "10", *guest, "-incoming", "defer"]) == "resume"
    assert guest_kind(["qemu-system-x86_64", "--version"]) is None
    assert guest_kind(["qemu-img", "create", "-f", "qcow2", "x", "1G"]) is None
