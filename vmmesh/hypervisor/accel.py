"""Decide between KVM and TCG by running a tiny guest, not by looking at /dev/kvm.

Theory of operation
-------------------
On nested or misconfigured hosts ``/dev/kvm`` opens fine and QEMU starts, yet
real guests hang.  On our lab machines the failure is specific: the first
``iret`` from an interrupt handler is an "emulation failure" and QEMU pauses
the guest forever.  So the probe runs guest code that needs interrupts to
work and watches its effect.  ``probe_payload`` is a 182-byte multiboot
kernel (QEMU loads multiboot images given to ``-kernel`` itself) that

1. writes ``K`` to the ISA debug console port 0xE9,
2. points IDT vector 8 (where the BIOS left timer IRQ 0) at a handler that
   writes ``T``, acknowledges the PIC and returns with ``iret``,
3. unmasks IRQ 0 and halts in a loop.

QEMU forwards port 0xE9 to its stdout with ``-debugcon stdio``.  ``K``
followed by ``TICKS_NEEDED`` ``T`` within the timeout means the accelerator
runs guests, timer interrupts included; anything else and the probe kills
QEMU and answers "tcg".  The answer is cached per process: accelerators do
not come and go while a node runs.  With a ``cache_file`` it is also kept
across node starts, under a key naming the kernel, the QEMU binary and the
boot (``verdict_key``): a machine where KVM hangs pays the probe's timeout
once per boot, not at every node start, and re-probes when any of the three
changes.

Source (GNU as, ``--32``, linked at 0x100000 as a flat binary)::

    hdr:  .long 0x1BADB002, 0x00010000, -(0x1BADB002+0x00010000)
          .long hdr, hdr, 0, 0, _start          # a.out kludge: flat image
    _start: cli; movb $'K',%al; outb %al,$0xe9
          movl $tick,%eax; movw %ax,idt+64; movw %cs,%bx; movw %bx,idt+66
          movw $0x8E00,idt+68; shrl $16,%eax; movw %ax,idt+70; lidt idtr
          movb $0xFE,%al; outb %al,$0x21; sti
    1:    hlt; jmp 1b
    tick: pushl %eax; movb $'T',%al; outb %al,$0xe9
          movb $0x20,%al; outb %al,$0x20; popl %eax; iret
          .align 8
    idtr: .word 8*9-1; .long idt
    idt:  .fill 9*8,1,0
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import trio

log = logging.getLogger(__name__)

TICKS_NEEDED = 3
_PAYLOAD_HEX = (
    "02b0ad1b00000100fe4f51e40000100000001000000000000000000020001000"
    "fab04be6e9b85b00100066a3ae001000668ccb66891db000100066c705b20010"
    "00008ec1e81066a3b40010000f011d68001000b0fee621fbf4ebfd50b054e6e9"
    "b020e62058cf669047006e001000"
)
_IDT_SIZE = 9 * 8

_cache: dict[tuple[str, str], str] = {}


def probe_payload() -> bytes:
    """The multiboot probe kernel described in the module docstring."""
    return bytes.fromhex(_PAYLOAD_HEX) + bytes(_IDT_SIZE)


def probe_succeeded(output: bytes) -> bool:
    """True when the debug console shows the start marker and enough timer ticks."""
    at = output.find(b"K")
    return at >= 0 and output.count(b"T", at) >= TICKS_NEEDED


def probe_argv(qemu_binary: str, accel: str, kernel: Path) -> list[str]:
    return [
        qemu_binary,
        "-accel", accel,
        "-machine", "pc",
        "-m", "16",
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-debugcon", "stdio",
        "-kernel", str(kernel),
    ]  # fmt: skip


async def payload_runs(accel: str, timeout: float, qemu_binary: str) -> bool:
    """True when the probe payload runs under ``accel`` within ``timeout``.

    QEMU is always killed and reaped before returning, also on cancellation.
    """
    with tempfile.TemporaryDirectory(prefix="vmmesh-probe-") as tmp:
        kernel = Path(tmp) / "probe.bin"
        kernel.write_bytes(probe_payload())
        try:
            proc = await trio.lowlevel.open_process(
                probe_argv(qemu_binary, accel, kernel),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        except OSError as exc:
            log.warning("cannot run %s: %s", qemu_binary, exc)
            return False
        try:
            assert proc.stdout is not None
            seen = bytearray()
            with trio.move_on_after(timeout):
                while data := await proc.stdout.receive_some(64):
                    seen += data
                    if probe_succeeded(bytes(seen)):
                        return True
                    del seen[:-256]  # bounded: success needs only a few bytes
            return False
        finally:
            with trio.CancelScope(shield=True):
                proc.kill()
                await proc.wait()
                if proc.stdout is not None:
                    await proc.stdout.aclose()


def verdict_key(qemu_binary: str, boot_id: Path = Path("/proc/sys/kernel/random/boot_id")) -> str:
    """What a KVM verdict depends on: this kernel, this QEMU binary, this boot."""
    parts = [os.uname().release, os.uname().version]
    binary = shutil.which(qemu_binary)
    if binary is not None:
        st = os.stat(binary)
        parts += [os.path.realpath(binary), str(st.st_size), str(st.st_mtime_ns)]
    try:
        parts.append(boot_id.read_text().strip())
    except OSError:
        parts.append("no-boot-id")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _read_verdict(cache_file: Path, key: str) -> str | None:
    try:
        doc = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(doc, dict) and doc.get("key") == key and doc.get("accel") in ("kvm", "tcg"):
        return str(doc["accel"])
    return None


def _write_verdict(cache_file: Path, key: str, accel: str) -> None:
    tmp = cache_file.with_name(cache_file.name + ".tmp")
    try:
        tmp.write_text(json.dumps({"key": key, "accel": accel}) + "\n")
        os.replace(tmp, cache_file)
    except OSError as exc:
        log.info("cannot keep the accelerator verdict in %s: %s", cache_file, exc)


async def probe_accel(
    timeout: float = 8.0,
    *,
    qemu_binary: str = "qemu-system-x86_64",
    kvm_device: Path = Path("/dev/kvm"),
    cache_file: Path | None = None,
) -> str:
    """ "kvm" if a guest really runs under KVM within ``timeout``, else "tcg"."""
    key = (qemu_binary, str(kvm_device))
    if key in _cache:
        return _cache[key]
    stamp = verdict_key(qemu_binary)
    if cache_file is not None and (known := _read_verdict(cache_file, stamp)) is not None:
        log.info("accelerator %s (kept from an earlier probe on this boot)", known)
        _cache[key] = known
        return known
    accel = "tcg"
    if not os.access(kvm_device, os.R_OK | os.W_OK):
        log.info("%s is not usable: using TCG", kvm_device)
    elif await payload_runs("kvm", timeout, qemu_binary):
        accel = "kvm"
    else:
        log.warning("a KVM guest did not run within %g s: using TCG", timeout)
    _cache[key] = accel
    if cache_file is not None:
        _write_verdict(cache_file, stamp, accel)
    return accel
