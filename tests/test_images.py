"""Image store: manifest, verify, import and export on small fake files.

The last test (marked ``qemu``) checks the real base image: it reuses the
published development build or builds one, verifies it, boots an overlay of
it under QEMU and waits for the guest agent.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import zstandard

from vmmesh.errors import ImageError, IntegrityError, NotFound, UsageError
from vmmesh.host import imagebuild
from vmmesh.host.images import (
    DISK,
    IMAGE_FILES,
    INITRD,
    KERNEL,
    MANIFEST,
    ImageRecord,
    ImageStore,
    check_image_id,
    verify,
)
from vmmesh.hypervisor.qcow2 import qcow2_virtual_size

VIRTUAL = 1 << 30


def fake_qcow2(
    virtual_size: int = VIRTUAL, *, backing: bool = False, data_file: bool = False, fill: int = 0
) -> bytes:
    """A qcow2 v3 header (104 bytes) padded to 64 KiB; ``fill`` varies the content."""
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQII",
        b"QFI\xfb",
        3,
        512 if backing else 0,  # backing_file_offset
        10 if backing else 0,  # backing_file_size
        16,  # cluster_bits
        virtual_size,
        0,  # crypt_method
        1,  # l1_size
        0x30000,  # l1_table_offset
        0x10000,  # refcount_table_offset
        1,  # refcount_table_clusters
        0,  # nb_snapshots
        0,  # snapshots_offset
        0b100 if data_file else 0,  # incompatible_features
        0,  # compatible_features
        0,  # autoclear_features
        4,  # refcount_order
    )
    return header + b"\0" * 4 + bytes([fill]) * ((64 << 10) - len(header) - 4)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    paths = {DISK: src / DISK, KERNEL: src / KERNEL, INITRD: src / INITRD}
    paths[DISK].write_bytes(fake_qcow2())
    paths[KERNEL].write_bytes(b"kernel" * 1000)
    paths[INITRD].write_bytes(b"initrd" * 2000)
    return paths


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "data")


def add(store: ImageStore, files: dict[str, Path], *, move: bool = False) -> ImageRecord:
    return store.add(
        files[DISK],
        files[KERNEL],
        files[INITRD],
        cmdline="root=/dev/vda rw",
        packages=["bash=5.2", "qemu-guest-agent=1:7.2"],
        created=1700000000.5,
        move=move,
    )


def leftovers(store: ImageStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith("."))


# --- add, get, list, default ------------------------------------------------


def test_add_names_image_by_disk_hash(store: ImageStore, files: dict[str, Path]) -> None:
    record = add(store, files)
    disk_hash = hashlib.sha256(files[DISK].read_bytes()).hexdigest()
    assert record.image_id == disk_hash
    assert record.path == store.root / disk_hash
    assert sorted(p.name for p in record.path.iterdir()) == sorted(IMAGE_FILES)
    assert record.kernel_sha256 == hashlib.sha256(files[KERNEL].read_bytes()).hexdigest()
    assert record.initrd_size == files[INITRD].stat().st_size
    assert record.virtual_size == VIRTUAL
    m = record.manifest
    assert (m.disk, m.kernel, m.initrd) == (DISK, KERNEL, INITRD)
    assert m.size == 64 << 10
    assert m.packages == ("bash=5.2", "qemu-guest-agent=1:7.2")
    assert m.created == 1700000000.5
    assert m.cmdline == "root=/dev/vda rw"
    doc = json.loads((record.path / MANIFEST).read_text())
    assert doc["version"] == 1
    assert doc["initrd_sha256"] == record.initrd_sha256
    assert files[DISK].exists()  # copied, not moved
    assert leftovers(store) == ["default"] or leftovers(store) == []


def test_get_list_default(store: ImageStore, files: dict[str, Path]) -> None:
    with pytest.raises(NotFound):
        store.default_image()
    assert store.list_images() == []
    first = add(store, files)
    files[DISK].write_bytes(fake_qcow2(fill=1))
    second = add(store, files, move=True)
    assert not files[DISK].exists()
    assert second.image_id != first.image_id
    assert store.default_image() == first  # the first image added stays the default
    store.set_default(second.image_id)
    assert store.default_image() == second
    assert store.get(first.image_id) == first
    assert {r.image_id for r in store.list_images()} == {first.image_id, second.image_id}
    assert store.has(first.image_id)
    with pytest.raises(NotFound):
        store.get("0" * 64)
    with pytest.raises(NotFound):
        store.set_default("0" * 64)


def test_default_id_is_none_without_a_readable_default(
    store: ImageStore, files: dict[str, Path]
) -> None:
    assert store.default_id() is None
    rec = add(store, files)
    assert store.default_id() == rec.image_id
    (store.root / "default").write_text("not an id\n")  # a damaged marker
    with pytest.raises(ImageError, match="names no image id"):
        store.default_image()
    assert store.default_id() is None
    (store.root / "default").write_text("0" * 64)  # names an image that is gone
    assert store.default_id() is None


def test_add_same_content_twice_is_idempotent(store: ImageStore, files: dict[str, Path]) -> None:
    assert add(store, files) == add(store, files)
    assert len(store.list_images()) == 1


def test_add_replaces_a_damaged_copy(store: ImageStore, files: dict[str, Path]) -> None:
    record = add(store, files)
    record.kernel_path.write_bytes(b"tampered")
    assert add(store, files) == record
    assert verify(record.path) == record


@pytest.mark.parametrize("bad", ["../etc", "A" * 64, "a" * 63, "", "g" * 64])
def test_image_ids_are_validated(store: ImageStore, bad: str) -> None:
    with pytest.raises(UsageError):
        check_image_id(bad)
    with pytest.raises(UsageError):
        store.get(bad)


def test_unfinished_images_are_swept_at_start_only(tmp_path: Path) -> None:
    """A new ImageStore (made by every tick and handler) leaves an image being added
    alone: sweeping there once deleted a fetch's files while it verified them."""
    partial = tmp_path / "data" / "images" / ".partial-abc"
    partial.mkdir(parents=True)
    (partial / DISK).write_bytes(b"half")
    store = ImageStore(tmp_path / "data")
    assert partial.exists()
    assert store.sweep_unfinished() == ["unfinished image .partial-abc"]
    assert not partial.exists()


def test_list_skips_broken_manifest(store: ImageStore, files: dict[str, Path]) -> None:
    record = add(store, files)
    broken = store.root / ("f" * 64)
    broken.mkdir()
    (broken / MANIFEST).write_text("{")
    assert store.list_images() == [record]


# --- verify -----------------------------------------------------------------


def test_verify_accepts_intact_image(store: ImageStore, files: dict[str, Path]) -> None:
    record = add(store, files)
    assert verify(record.path) == record
    assert store.verify(record.image_id) == record


def test_verify_detects_flipped_disk_byte(store: ImageStore, files: dict[str, Path]) -> None:
    record = add(store, files)
    data = bytearray(record.disk_path.read_bytes())
    data[-1] ^= 1
    record.disk_path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=DISK):
        verify(record.path)


@pytest.mark.parametrize("name", [KERNEL, INITRD])
def test_verify_detects_changed_boot_files(
    store: ImageStore, files: dict[str, Path], name: str
) -> None:
    record = add(store, files)
    path = record.path / name
    data = path.read_bytes()
    path.write_bytes(data[:-1] + b"X")  # same size, other content
    with pytest.raises(IntegrityError, match=name):
        verify(record.path)
    path.write_bytes(data[:-10])  # truncated
    with pytest.raises(IntegrityError, match="size"):
        verify(record.path)


def test_verify_detects_missing_file(store: ImageStore, files: dict[str, Path]) -> None:
    record = add(store, files)
    record.initrd_path.unlink()
    with pytest.raises(ImageError, match=INITRD):
        verify(record.path)


def test_verify_refuses_symlinked_file(
    store: ImageStore, files: dict[str, Path], tmp_path: Path
) -> None:
    record = add(store, files)
    outside = tmp_path / "outside"
    shutil.copyfile(record.kernel_path, outside)
    record.kernel_path.unlink()
    record.kernel_path.symlink_to(outside)
    with pytest.raises(ImageError, match="regular file"):
        verify(record.path)


def _rewrite_manifest(record: ImageRecord, **changes: object) -> None:
    doc = json.loads((record.path / MANIFEST).read_text())
    doc.update(changes)
    (record.path / MANIFEST).write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "changes",
    [
        {"disk": "../../etc/shadow"},
        {"kernel": "/boot/vmlinuz"},
        {"version": 2},
        {"image_id": "xyz"},
        {"size": -1},
        {"size": True},
        {"packages": [1, 2]},
        {"cmdline": None},
        {"created": "yesterday"},
    ],
)
def test_verify_refuses_malformed_manifest(
    store: ImageStore, files: dict[str, Path], changes: dict[str, object]
) -> None:
    record = add(store, files)
    _rewrite_manifest(record, **changes)
    with pytest.raises(ImageError):
        verify(record.path)


def test_verify_refuses_manifest_that_is_not_json(
    store: ImageStore, files: dict[str, Path]
) -> None:
    record = add(store, files)
    (record.path / MANIFEST).write_bytes(b"\xff\x00")
    with pytest.raises(ImageError, match="JSON"):
        verify(record.path)


def test_store_refuses_image_under_wrong_id(store: ImageStore, files: dict[str, Path]) -> None:
    record = add(store, files)
    other = store.root / ("e" * 64)
    shutil.copytree(record.path, other)
    with pytest.raises(ImageError, match="holds a manifest"):
        store.verify("e" * 64)


def test_qcow2_header_checks() -> None:
    assert qcow2_virtual_size(fake_qcow2(12345 << 20)) == 12345 << 20
    with pytest.raises(ImageError, match="backing file"):
        qcow2_virtual_size(fake_qcow2(backing=True))
    with pytest.raises(ImageError, match="external data file"):
        qcow2_virtual_size(fake_qcow2(data_file=True))
    with pytest.raises(ImageError, match="not a qcow2"):
        qcow2_virtual_size(b"\0" * 512)
    with pytest.raises(ImageError, match="not a qcow2"):
        qcow2_virtual_size(b"QFI\xfb")


def test_add_refuses_disk_with_backing_file(store: ImageStore, files: dict[str, Path]) -> None:
    files[DISK].write_bytes(fake_qcow2(backing=True))
    with pytest.raises(ImageError, match="backing file"):
        add(store, files)
    assert store.list_images() == []
    assert leftovers(store) == []


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_qcow2_header_of_real_qemu_img(tmp_path: Path) -> None:
    plain = tmp_path / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "3G"], check=True)
    assert qcow2_virtual_size(plain.read_bytes()[:4096]) == 3 << 30
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(plain), str(overlay)],
        check=True,
    )
    with pytest.raises(ImageError, match="backing file"):
        qcow2_virtual_size(overlay.read_bytes()[:4096])


# --- export and import ------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_export_import_roundtrip(
    store: ImageStore, files: dict[str, Path], tmp_path: Path, compress: bool
) -> None:
    record = add(store, files)
    archive = store.export_image(record.image_id, tmp_path / "out" / "img.tar", compress=compress)
    assert archive.read_bytes().startswith(b"\x28\xb5\x2f\xfd") == compress
    assert [p.name for p in archive.parent.iterdir()] == ["img.tar"]  # no temp file left
    other = ImageStore(tmp_path / "other")
    imported = other.import_image(archive)
    assert imported.image_id == record.image_id
    assert imported.manifest == record.manifest
    assert other.default_image() == imported
    assert verify(imported.path) == imported
    assert leftovers(other) == ["default"] or leftovers(other) == []


def test_export_refuses_corrupt_image(
    store: ImageStore, files: dict[str, Path], tmp_path: Path
) -> None:
    record = add(store, files)
    record.initrd_path.write_bytes(b"initrd" * 1999 + b"XXXXXX")
    with pytest.raises(IntegrityError):
        store.export_image(record.image_id, tmp_path / "img.tar")
    assert not (tmp_path / "img.tar").exists()


def test_import_from_directory(store: ImageStore, files: dict[str, Path], tmp_path: Path) -> None:
    record = add(store, files)
    other = ImageStore(tmp_path / "other")
    assert other.import_image(record.path).image_id == record.image_id


def _tar(members: Sequence[tarfile.TarInfo | tuple[str, bytes]], *, zstd: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    return zstandard.ZstdCompressor().compress(data) if zstd else data


def _image_members(record: ImageRecord) -> list[tuple[str, bytes]]:
    return [(name, (record.path / name).read_bytes()) for name in IMAGE_FILES]


@pytest.fixture
def record(store: ImageStore, files: dict[str, Path]) -> ImageRecord:
    return add(store, files)


def _import_bytes(tmp_path: Path, data: bytes) -> tuple[ImageStore, Exception]:
    archive = tmp_path / "in.tar"
    archive.write_bytes(data)
    other = ImageStore(tmp_path / "other")
    with pytest.raises((ImageError, IntegrityError)) as info:
        other.import_image(archive)
    assert other.list_images() == []
    assert leftovers(other) == []
    return other, info.value


def test_import_accepts_dot_slash_names(record: ImageRecord, tmp_path: Path) -> None:
    members = [(f"./{name}", data) for name, data in _image_members(record)]
    archive = tmp_path / "in.tar"
    archive.write_bytes(_tar(members, zstd=True))
    assert ImageStore(tmp_path / "other").import_image(archive).image_id == record.image_id


def test_import_refuses_path_outside(record: ImageRecord, tmp_path: Path) -> None:
    members = [*_image_members(record), ("../escape", b"x")]
    _, exc = _import_bytes(tmp_path, _tar(members))
    assert "unexpected member" in str(exc)
    assert not (tmp_path / "escape").exists()


def test_import_refuses_symlink_member(record: ImageRecord, tmp_path: Path) -> None:
    link = tarfile.TarInfo(KERNEL)
    link.type = tarfile.SYMTYPE
    link.linkname = "/boot/vmlinuz"
    members = [m for m in _image_members(record) if m[0] != KERNEL]
    _, exc = _import_bytes(tmp_path, _tar([*members, link]))
    assert "regular file" in str(exc)


def test_import_refuses_duplicate_member(record: ImageRecord, tmp_path: Path) -> None:
    members = [*_image_members(record), (KERNEL, b"again")]
    _, exc = _import_bytes(tmp_path, _tar(members))
    assert "unexpected member" in str(exc)


def test_import_refuses_missing_member(record: ImageRecord, tmp_path: Path) -> None:
    members = _image_members(record)[:-1]
    _, exc = _import_bytes(tmp_path, _tar(members, zstd=True))
    assert INITRD in str(exc)


def test_import_refuses_tampered_content(record: ImageRecord, tmp_path: Path) -> None:
    members = [
        (name, data[:-1] + b"!" if name == DISK else data) for name, data in _image_members(record)
    ]
    _, exc = _import_bytes(tmp_path, _tar(members))
    assert isinstance(exc, IntegrityError)


def test_import_refuses_truncated_archive(record: ImageRecord, tmp_path: Path) -> None:
    data = _tar(_image_members(record), zstd=True)
    _import_bytes(tmp_path, data[: len(data) // 2])


def test_import_refuses_garbage(tmp_path: Path) -> None:
    _import_bytes(tmp_path, os.urandom(10000))


# --- the builder's pure parts -----------------------------------------------


def test_modules_to_keep_follows_dependencies() -> None:
    dep = (
        "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/jbd2/jbd2.ko\n"
        "kernel/fs/jbd2/jbd2.ko: kernel/fs/mbcache.ko\n"
        "kernel/fs/mbcache.ko:\n"
        "kernel/lib/crc16.ko:\n"
        "kernel/drivers/gpu/drm/drm.ko: kernel/lib/crc16.ko\n"
        "kernel/sound/core/snd.ko:\n"
    )
    assert imagebuild.modules_to_keep(dep, ["kernel/fs/ext4/*"]) == {
        "kernel/fs/ext4/ext4.ko",
        "kernel/lib/crc16.ko",
        "kernel/fs/jbd2/jbd2.ko",
        "kernel/fs/mbcache.ko",
    }
    dropped = imagebuild.modules_to_keep(dep, ["kernel/*"], ["kernel/sound/*", "kernel/lib/*"])
    assert "kernel/sound/core/snd.ko" not in dropped
    assert "kernel/lib/crc16.ko" in dropped  # still kept: ext4 and drm need it


def test_parse_dpkg_query_keeps_installed_only() -> None:
    out = "ii \tbash\t5.2.15-2+b2\nrc \told\t1.0\nii \tudev\t252.39-1\nbroken line\n"
    assert imagebuild.parse_dpkg_query(out) == ("bash=5.2.15-2+b2", "udev=252.39-1")


def test_disk_size_has_headroom_and_a_floor() -> None:
    assert imagebuild.disk_bytes_for(100 << 20) == imagebuild.MIN_DISK_BYTES
    big = imagebuild.disk_bytes_for(2 << 30)
    assert big >= int((2 << 30) * 1.3)
    assert big % (1 << 20) == 0


def test_config_files_set_up_network_and_apt() -> None:
    files = imagebuild.config_files("http://deb.debian.org/debian", "bookworm", ["virtio_blk"])
    network = files["etc/systemd/network/80-vmmesh-dhcp.network"]
    assert "Name=eth* en*" in network
    assert "DHCP=yes" in network
    sources = files["etc/apt/sources.list"]
    assert "deb http://deb.debian.org/debian bookworm main\n" in sources
    assert "deb http://deb.debian.org/debian-security bookworm-security main\n" in sources
    assert files["etc/initramfs-tools/modules"] == "virtio_blk\n"


def test_cache_key_depends_on_package_set() -> None:
    base = imagebuild.BuildOptions()
    more = imagebuild.BuildOptions(packages=(*base.packages, "perl"))
    assert imagebuild.cache_key(base) != imagebuild.cache_key(more)
    assert imagebuild.cache_key(base) == imagebuild.cache_key(imagebuild.BuildOptions())


# --- the real image -----------------------------------------------------------

PUBLISHED = Path(
    os.environ.get("VMMESH_BASE_IMAGE_DIR", str(imagebuild.DEFAULT_CACHE_DIR / "base"))
)


@pytest.fixture
def real_image(tmp_path: Path) -> ImageRecord:
    """The published development image, else a fresh build (root only)."""
    if (PUBLISHED / MANIFEST).is_file():
        return verify(PUBLISHED.resolve())
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("no published base image and cannot build one (needs root, debootstrap)")
    store = ImageStore(tmp_path / "data")
    return imagebuild.build_base_image(store)


HANG_GUARD = 900.0  # seconds; only stops a stuck boot from hanging the run


def _wait_agent(sock_path: Path, proc: subprocess.Popen[bytes]) -> float:
    """Seconds until the agent answers guest-ping (blocking; QEMU exit is an error).

    One ping per connection: until the agent opens its port QEMU reads
    nothing from the socket, so repeated pings on one connection would fill it.
    """
    start = time.monotonic()
    while True:
        assert proc.poll() is None, "QEMU exited before the agent answered"
        if time.monotonic() - start > HANG_GUARD:
            pytest.fail("the guest agent never answered (see console.log)")
        if not sock_path.exists():
            time.sleep(0.05)
            continue
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(sock_path))
            sock.settimeout(1.0)
            sock.sendall(b'{"execute":"guest-ping"}\n')
            try:
                if b'"return"' in sock.recv(4096):
                    return time.monotonic() - start
            except TimeoutError:
                pass


@pytest.mark.qemu
def test_real_image_verifies_and_boots(real_image: ImageRecord, tmp_path: Path) -> None:
    assert real_image.virtual_size >= imagebuild.MIN_DISK_BYTES
    names = {p.partition("=")[0] for p in real_image.manifest.packages}
    assert {"qemu-guest-agent", "systemd-sysv", "udev", "iproute2"} <= names
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            str(real_image.disk_path),
            str(overlay),
        ],
        check=True,
    )
    agent = tmp_path / "qga.sock"
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-m",
        "1024",
        "-smp",
        "2",
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
        str(real_image.kernel_path),
        "-initrd",
        str(real_image.initrd_path),
        "-append",
        real_image.manifest.cmdline,
        "-drive",
        f"file={overlay},if=virtio,format=qcow2",
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0",
        "-serial",
        f"file:{tmp_path / 'console.log'}",
        "-chardev",
        f"socket,id=qga0,path={agent},server=on,wait=off",
        "-device",
        "virtio-serial-pci",
        "-device",
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    ]
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL) as proc:
        try:
            seconds = _wait_agent(agent, proc)
            print(f"guest agent answered {seconds:.1f} s after QEMU start (TCG)")
        finally:
            proc.kill()
            proc.wait()
