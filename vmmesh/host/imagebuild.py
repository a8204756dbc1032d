"""Build the default base image: a minimal Debian guest with the QEMU guest agent.

Theory of operation
-------------------
The base image must be identical on every host (it is named by the sha256 of
its disk) and small, because every template and VM is a qcow2 overlay on it
and a host without it fetches it from a peer.  The build never mounts or boots
anything:

1. ``debootstrap --make-tarball`` downloads the .debs once into a tarball kept
   under the cache directory (keyed by suite, mirror and package list); later
   builds unpack from it offline (``--unpack-tarball``).
2. The tree is configured from the host, with ``chroot`` only where a Debian
   tool has to run inside it (``systemctl enable``, ``depmod``,
   ``update-initramfs``): DHCP by systemd-networkd on ``eth*``/``en*``,
   volatile journal, no timers, no docs, apt set up for the Debian mirror and
   for fast unattended installs (no recommends, ``force-unsafe-io``).
3. Kernel modules are cut down to virtio, ext4, networking and a few
   filesystems (plus everything those depend on, from ``modules.dep``); the
   initrd is regenerated with ``MODULES=list`` so it holds exactly what mounts
   ``/dev/vda`` (virtio_pci, virtio_blk, ext4).  The kernel packages are held
   so that a template install never swaps the kernel under the direct boot.
4. ``/etc/machine-id`` is emptied so every clone generates its own.
5. ``mke2fs -d TREE`` writes an ext4 file system straight from the tree into a
   sparse raw file (inode tables initialised now, so the guest's lazy-init
   does not dirty every overlay), ``qemu-img convert`` makes it qcow2, and
   the kernel and initrd are copied out for direct kernel boot.
6. The result goes into the content-addressed ``ImageStore``.

The pure parts (the module closure, the configuration file contents, the
dpkg-query parsing) are plain functions tested without root.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from vmmesh.errors import HypervisorError, ImageError, UsageError
from vmmesh.host.images import ImageRecord, ImageStore

ProgressSink = Callable[[str, float | None], None]
"""``progress(phase, None)`` when a phase starts, ``progress(phase, seconds)`` when it ends."""

DEFAULT_CACHE_DIR = Path("/var/cache/vmmesh-dev")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SUITE = "bookworm"
DEFAULT_PACKAGES = (
    "linux-image-amd64",
    "qemu-guest-agent",
    "systemd-sysv",
    "systemd-resolved",
    "dbus",  # systemd-resolved needs a system bus; debootstrap cannot pick it alone
    "udev",
    "iproute2",
    "openssh-server",  # `vmmesh ssh`; socket-activated, host key made on first use
)
# mitigations=off: page-table isolation makes every guest syscall flush QEMU's
# software TLB under TCG; a single-tenant job VM gains nothing from it.
DEFAULT_CMDLINE = (
    "root=/dev/vda rootfstype=ext4 rw console=ttyS0 quiet loglevel=3 "
    "systemd.show_status=0 net.ifnames=0 fsck.mode=skip mitigations=off"
)
MIN_DISK_BYTES = 1536 << 20
DISK_HEADROOM = 1.3

# Module paths (relative to /lib/modules/<kver>/) kept in the image; their
# dependencies from modules.dep are kept too.  Enough for virtio devices,
# ext4, containers and VPN-ish packages a template might install.
KEEP_MODULES = (
    "kernel/drivers/virtio/*",
    "kernel/drivers/block/virtio_blk.ko*",
    "kernel/drivers/block/loop.ko*",
    "kernel/drivers/block/nbd.ko*",
    "kernel/drivers/scsi/virtio_scsi.ko*",
    "kernel/drivers/net/virtio_net.ko*",
    "kernel/drivers/net/net_failover.ko*",
    "kernel/drivers/net/tun.ko*",
    "kernel/drivers/net/veth.ko*",
    "kernel/drivers/net/dummy.ko*",
    "kernel/drivers/net/macvlan.ko*",
    "kernel/drivers/net/ipvlan/*",
    "kernel/drivers/net/vxlan/*",
    "kernel/drivers/net/wireguard/*",
    "kernel/drivers/char/virtio_console.ko*",
    "kernel/drivers/char/hw_random/virtio-rng.ko*",
    "kernel/drivers/md/dm-mod.ko*",
    "kernel/fs/ext4/*",
    "kernel/fs/overlayfs/*",
    "kernel/fs/fuse/*",
    "kernel/fs/squashfs/*",
    "kernel/fs/isofs/*",
    "kernel/fs/fat/*",
    "kernel/fs/nls/*",
    "kernel/fs/9p/*",
    "kernel/net/*",
    "kernel/lib/*",
    "kernel/crypto/*",
    "kernel/arch/x86/crypto/*",
)
# Radio and other hardware stacks under kernel/net that a VM never has.
DROP_MODULES = (
    "kernel/net/wireless/*",
    "kernel/net/mac80211/*",
    "kernel/net/bluetooth/*",
    "kernel/net/rfkill/*",
    "kernel/net/nfc/*",
    "kernel/net/ieee802154/*",
    "kernel/net/mac802154/*",
    "kernel/net/6lowpan/*",
    "kernel/net/can/*",
    "kernel/net/atm/*",
    "kernel/net/appletalk/*",
)
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")

MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-timesyncd.service",
    "getty@tty1.service",
    "serial-getty@ttyS0.service",
    "systemd-logind.service",  # nobody logs in; the agent runs commands
    "dev-hugepages.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
)
ENABLED_UNITS = ("systemd-networkd.service", "systemd-resolved.service", "ssh.socket")
# sshd starts per connection (ssh.socket) instead of at boot: boots stay as fast.
DISABLED_UNITS = ("ssh.service",)
# Host keys made by the package's postinst would be shared by every clone; the
# node makes the guest's own key through the agent before the first `vmmesh ssh`.
SSH_HOST_KEY_GLOB = "ssh_host_*"


@dataclass(frozen=True)
class BuildOptions:
    suite: str = DEFAULT_SUITE
    mirror: str = DEFAULT_MIRROR
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    cmdline: str = DEFAULT_CMDLINE
    cache_dir: Path = DEFAULT_CACHE_DIR
    compress: bool = False  # qemu-img convert -c: smaller file, a bit more host CPU per read


# --- pure parts -------------------------------------------------------------


def modules_to_keep(
    modules_dep: str, patterns: Iterable[str], drop: Iterable[str] = ()
) -> set[str]:
    """Module paths matching ``patterns`` but not ``drop``, plus everything they depend on.

    ``modules_dep`` is the text of ``modules.dep``: ``path: dep dep ...`` per
    line.  Dependencies are followed transitively (even into ``drop``), so
    the kept set always loads; ``depmod`` is rerun on it afterwards.
    """
    deps: dict[str, list[str]] = {}
    for line in modules_dep.splitlines():
        module, sep, rest = line.partition(":")
        if sep:
            deps[module.strip()] = rest.split()
    pats, drops = tuple(patterns), tuple(drop)
    todo = [
        m
        for m in deps
        if any(fnmatch(m, p) for p in pats) and not any(fnmatch(m, d) for d in drops)
    ]
    keep: set[str] = set()
    while todo:
        module = todo.pop()
        if module not in keep:
            keep.add(module)
            todo.extend(deps.get(module, ()))
    return keep


def parse_dpkg_query(output: str) -> tuple[str, ...]:
    """``name=version`` of installed packages from ``dpkg-query -W`` output.

    The query format is ``${db:Status-Abbrev}\\t${Package}\\t${Version}``;
    only fully installed (``ii``) packages count.
    """
    found = []
    for line in output.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0].strip() == "ii":
            found.append(f"{parts[1]}={parts[2]}")
    return tuple(sorted(found))


def disk_bytes_for(tree_bytes: int) -> int:
    """Raw disk size: the tree plus headroom, at least ``MIN_DISK_BYTES``, MiB-aligned."""
    want = max(int(tree_bytes * DISK_HEADROOM), MIN_DISK_BYTES)
    mib = 1 << 20
    return (want + mib - 1) // mib * mib


def config_files(mirror: str, suite: str, initrd_modules: Sequence[str]) -> dict[str, str]:
    """Files written into the tree, by path relative to its root."""
    security = mirror.rstrip("/").removesuffix("/debian") + "/debian-security"
    return {
        "etc/hostname": "vmmesh-guest\n",
        "etc/hosts": "127.0.0.1\tlocalhost\n127.0.1.1\tvmmesh-guest\n::1\tlocalhost\n",
        "etc/fstab": "/dev/vda\t/\text4\trw,noatime,errors=remount-ro\t0\t0\n",
        "etc/apt/sources.list": (
            f"deb {mirror} {suite} main\n"
            f"deb {mirror} {suite}-updates main\n"
            f"deb {security} {suite}-security main\n"
        ),
        "etc/apt/apt.conf.d/90vmmesh": (
            'APT::Install-Recommends "false";\n'
            'APT::Install-Suggests "false";\n'
            'Acquire::Languages "none";\n'
            'APT::Periodic::Enable "0";\n'
            # Downloaded .debs would stay in every template's delta.
            'Binary::apt::APT::Keep-Downloaded-Packages "false";\n'
        ),
        # Templates install packages through the agent: skip fsync (the template
        # is shut down cleanly before it is kept) and skip documentation.
        "etc/dpkg/dpkg.cfg.d/90vmmesh": (
            "force-unsafe-io\n"
            "path-exclude /usr/share/doc/*\n"
            "path-include /usr/share/doc/*/copyright\n"
            "path-exclude /usr/share/man/*\n"
            "path-exclude /usr/share/info/*\n"
            "path-exclude /usr/share/locale/*\n"
            "path-include /usr/share/locale/locale.alias\n"
            "path-exclude /usr/share/lintian/*\n"
        ),
        "etc/systemd/network/80-vmmesh-dhcp.network": (
            "[Match]\nName=eth* en*\n\n[Network]\nDHCP=yes\n"
        ),
        # Logs in RAM: a running VM's overlay does not grow with its journal.
        "etc/systemd/journald.conf.d/90vmmesh.conf": (
            "[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n"
        ),
        # The agent is the host's only way in: start it as soon as its port and
        # a writable root exist instead of after basic.target (DNS resolver,
        # D-Bus, sockets).  Callers that need the network wait for it in the
        # guest (systemd-networkd-wait-online).
        "etc/systemd/system/qemu-guest-agent.service.d/90vmmesh.conf": (
            "[Unit]\nDefaultDependencies=no\n"
            "After=local-fs.target systemd-tmpfiles-setup.service\n"
            "Conflicts=shutdown.target\nBefore=shutdown.target\n"
        ),
        # Keys only, one host key (made per clone on first use, see SSH_HOST_KEY_GLOB).
        "etc/ssh/sshd_config.d/90vmmesh.conf": (
            "HostKey /etc/ssh/ssh_host_ed25519_key\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "UseDNS no\n"
        ),
        "etc/initramfs-tools/conf.d/90vmmesh.conf": "MODULES=list\n",
        "etc/initramfs-tools/modules": "".join(f"{m}\n" for m in initrd_modules),
    }


def recipe_key(options: BuildOptions) -> str:
    """Changes whenever a build with ``options`` would make a different image.

    ``--if-stale`` compares it with the one recorded beside a published link,
    so a test machine rebuilds its cached image when this file changes it.
    """
    parts = [
        cache_key(options),
        options.cmdline,
        str(options.compress),
        *sorted(config_files(options.mirror, options.suite, INITRD_MODULES).items()),
        *KEEP_MODULES,
        *DROP_MODULES,
        *INITRD_MODULES,
        *MASKED_UNITS,
        *ENABLED_UNITS,
        *DISABLED_UNITS,
        SSH_HOST_KEY_GLOB,
        *KEEP_DIRS,
    ]
    text = "\n".join(str(p) for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_key(options: BuildOptions) -> str:
    """Names the downloaded .deb tarball: a change of suite, mirror or packages re-downloads."""
    text = "\n".join([options.suite, options.mirror, *sorted(options.packages)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- the build --------------------------------------------------------------


class _Phases:
    def __init__(self, progress: ProgressSink) -> None:
        self._progress = progress

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._progress(name, None)
        start = time.monotonic()
        yield
        self._progress(name, time.monotonic() - start)


def _run(argv: Sequence[str], input: str | None = None) -> str:
    """Run a build tool; its stderr tail becomes the error message."""
    try:
        done = subprocess.run(list(argv), input=input, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise HypervisorError(f"{argv[0]} is not installed") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout or "").strip().splitlines()[-5:]
        raise HypervisorError(
            f"{' '.join(argv[:3])} ... failed ({done.returncode}): {' | '.join(tail)}"
        )
    return str(done.stdout)


def _debs_tarball(options: BuildOptions, phases: _Phases) -> Path:
    tarball = options.cache_dir / f"debs-{options.suite}-{cache_key(options)}.tgz"
    if tarball.exists():
        return tarball
    with phases.phase("download packages (debootstrap --make-tarball)"):
        options.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=options.cache_dir, prefix="dl-") as tmp:
            partial = Path(tmp) / "debs.tgz"
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    "--arch=amd64",
                    f"--include={','.join(options.packages)}",
                    f"--make-tarball={partial}",
                    options.suite,
                    str(Path(tmp) / "tree"),
                    options.mirror,
                ]
            )
            partial.replace(tarball)
    return tarball


def _debootstrap(tree: Path, options: BuildOptions, phases: _Phases) -> None:
    """Install the packages into ``tree``: from the cached tree tar, else with debootstrap.

    The second stage (dpkg configuring ~100 packages) takes longer than the
    download, so its result is cached too, as a tar keyed like the .debs.
    """
    cached = options.cache_dir / f"tree-{options.suite}-{cache_key(options)}.tar"
    tar_opts = ["--numeric-owner", "--xattrs", "--xattrs-include=*"]
    if cached.exists():
        with phases.phase("unpack cached debootstrap tree"):
            tree.mkdir()
            _run(["tar", *tar_opts, "-xpf", str(cached), "-C", str(tree)])
        return
    debs = _debs_tarball(options, phases)
    with phases.phase("debootstrap (from cached packages)"):
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--arch=amd64",
                f"--include={','.join(options.packages)}",
                f"--unpack-tarball={debs}",
                options.suite,
                str(tree),
                options.mirror,
            ]
        )
    with phases.phase("cache debootstrap tree"):
        partial = cached.with_name(f".{cached.name}.partial")
        _run(["tar", *tar_opts, "-cf", str(partial), "-C", str(tree), "."])
        partial.replace(cached)


# Stripped, but kept as empty directories: maintainer scripts still link into
# them (openjdk's update-alternatives makes /usr/share/man/man1/java.1.gz a
# slave link, and its post-install fails without man1).
KEEP_DIRS = tuple(f"usr/share/man/man{section}" for section in range(1, 9))


def _strip_tree(tree: Path) -> None:
    """Docs, man pages, locales, apt lists and caches, logs: none are needed to run."""
    for rel in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/lintian"):
        target = tree / rel
        if target.is_dir():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    copyright_file = child / "copyright"
                    keep = copyright_file.read_bytes() if copyright_file.is_file() else None
                    shutil.rmtree(child)
                    if keep is not None:
                        child.mkdir()
                        copyright_file.write_bytes(keep)
                else:
                    child.unlink()
    for rel in KEEP_DIRS:
        (tree / rel).mkdir(parents=True, exist_ok=True)
    locale = tree / "usr/share/locale"
    if locale.is_dir():
        for child in locale.iterdir():
            if child.name != "locale.alias":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    for rel in ("var/lib/apt/lists", "var/cache/apt", "tmp"):
        for child in (tree / rel).rglob("*"):
            if (child.is_file() or child.is_symlink()) and child.name != "lock":
                child.unlink()
    for child in (tree / "var/log").rglob("*"):
        if child.is_file() and not child.is_symlink():
            child.write_bytes(b"")
    (tree / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)


def _kernel_version(tree: Path) -> str:
    versions = sorted(p.name for p in (tree / "lib/modules").iterdir() if p.is_dir())
    if len(versions) != 1:
        raise ImageError(f"expected one kernel in the tree, found {versions}")
    return versions[0]


def _strip_modules(tree: Path, kver: str) -> None:
    moddir = tree / "lib/modules" / kver
    keep = modules_to_keep((moddir / "modules.dep").read_text(), KEEP_MODULES, DROP_MODULES)
    for path in list((moddir / "kernel").rglob("*")):
        if path.is_file() and str(path.relative_to(moddir)) not in keep:
            path.unlink()
    for path in sorted((moddir / "kernel").rglob("*"), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    _run(["chroot", str(tree), "depmod", "-a", kver])


def _check_initrd(tree: Path, kver: str) -> None:
    """Fail the build, not the first boot, if the initrd cannot mount ``/dev/vda``."""
    listing = _run(["chroot", str(tree), "lsinitramfs", f"/boot/initrd.img-{kver}"])
    present = {Path(line).name.split(".ko")[0] for line in listing.splitlines()}
    missing = [m for m in ("virtio_pci", "virtio_blk", "ext4") if m not in present]
    if missing:
        raise ImageError(f"the regenerated initrd lacks {', '.join(missing)}")


def _configure(tree: Path, options: BuildOptions) -> None:
    for rel, text in config_files(options.mirror, options.suite, INITRD_MODULES).items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    resolv = tree / "etc/resolv.conf"
    if resolv.exists() or resolv.is_symlink():
        resolv.unlink()
    resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    for unit in MASKED_UNITS:
        link = tree / "etc/systemd/system" / unit
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to("/dev/null")
    _run(["chroot", str(tree), "systemctl", "enable", *ENABLED_UNITS])
    _run(["chroot", str(tree), "systemctl", "disable", *DISABLED_UNITS])
    for key in (tree / "etc/ssh").glob(SSH_HOST_KEY_GLOB):
        key.unlink()
    names = (pkg.partition("=")[0] for pkg in parse_dpkg_query(_dpkg_query(tree)))
    held = "".join(f"{name} hold\n" for name in names if name.startswith("linux-image"))
    _run(["chroot", str(tree), "dpkg", "--set-selections"], input=held)
    (tree / "etc/machine-id").write_text("")
    dbus_id = tree / "var/lib/dbus/machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()


def _dpkg_query(tree: Path) -> str:
    return _run(
        [
            "dpkg-query",
            f"--admindir={tree / 'var/lib/dpkg'}",
            "-W",
            "-f",
            "${db:Status-Abbrev}\t${Package}\t${Version}\n",
        ]
    )


def _tree_bytes(tree: Path) -> int:
    total = 0
    for root, dirs, files in os.walk(tree):
        for name in files + dirs:
            st = os.lstat(os.path.join(root, name))
            total += max(st.st_blocks * 512, 4096)
    return total


def build_base_image(
    store: ImageStore,
    options: BuildOptions = BuildOptions(),
    progress: ProgressSink = lambda phase, seconds: None,
) -> ImageRecord:
    """Build the base image and add it to ``store``; returns its record.

    Needs root (debootstrap, chroot).  The downloaded packages are cached under
    ``options.cache_dir``; the work tree is removed in every case.
    """
    if os.geteuid() != 0:
        raise UsageError("building the base image needs root (debootstrap, chroot)")
    phases = _Phases(progress)
    options.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=options.cache_dir, prefix="build-") as tmp:
        work = Path(tmp)
        tree = work / "tree"
        _debootstrap(tree, options, phases)
        with phases.phase("configure guest"):
            _configure(tree, options)
            packages = parse_dpkg_query(_dpkg_query(tree))
        kver = _kernel_version(tree)
        with phases.phase("strip modules, regenerate initrd"):
            _strip_modules(tree, kver)
            _run(["chroot", str(tree), "update-initramfs", "-u", "-k", kver])
            _check_initrd(tree, kver)
            kernel = work / "vmlinuz"
            initrd = work / "initrd.img"
            shutil.copyfile(tree / "boot" / f"vmlinuz-{kver}", kernel)
            shutil.copyfile(tree / "boot" / f"initrd.img-{kver}", initrd)
            # The initrd is only used from outside; the guest never boots from /boot.
            (tree / "boot" / f"initrd.img-{kver}").unlink()
            _run(["chroot", str(tree), "apt-get", "clean"])
            _strip_tree(tree)
        with phases.phase("make ext4 file system and qcow2"):
            raw = work / "disk.raw"
            size = disk_bytes_for(_tree_bytes(tree))
            with raw.open("wb") as fh:
                fh.truncate(size)
            _run(
                [
                    "mke2fs",
                    "-q",
                    "-F",
                    "-t",
                    "ext4",
                    "-L",
                    "vmmesh-root",
                    "-m",
                    "1",
                    "-E",
                    "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
                    "-d",
                    str(tree),
                    str(raw),
                ]
            )
            shutil.rmtree(tree)
            disk = work / "disk.qcow2"
            convert = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"]
            if options.compress:
                convert.append("-c")
            _run([*convert, str(raw), str(disk)])
            raw.unlink()
        with phases.phase("hash and store"):
            record = store.add(
                disk,
                kernel,
                initrd,
                cmdline=options.cmdline,
                packages=packages,
                created=time.time(),
                move=True,
            )
    return record


def publish(record: ImageRecord, link: Path) -> None:
    """Point ``link`` (a symlink) at the image directory, atomically.

    For other engineers' tests: the image under the link never changes in
    place; a new build moves the link, so overlays must name the resolved
    path (``link.resolve()``) as their backing file.
    """
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(record.path.resolve())
    tmp.replace(link)


def _recipe_file(link: Path) -> Path:
    return link.with_name(f"{link.name}.recipe")


def is_stale(link: Path, options: BuildOptions) -> bool:
    """True if ``link`` has no image or one built from another recipe."""
    recorded = _recipe_file(link)
    if not (link / "manifest.json").exists() or not recorded.exists():
        return True
    return recorded.read_text().strip() != recipe_key(options)


def main(argv: list[str] | None = None) -> int:
    """Development entry point: ``python -m vmmesh.host.imagebuild``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_CACHE_DIR / "store")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--publish", type=Path, help="symlink to point at the new image")
    parser.add_argument("--compress", action="store_true")
    parser.add_argument(
        "--if-stale",
        action="store_true",
        help="with --publish: build only if the published image is from "
        "another recipe (or missing)",
    )
    args = parser.parse_args(argv)
    options = BuildOptions(cache_dir=args.cache_dir, compress=args.compress)
    if args.if_stale and args.publish and not is_stale(args.publish, options):
        print(f"{args.publish}: up to date (recipe {recipe_key(options)})")
        return 0

    def show(phase: str, seconds: float | None) -> None:
        print(f"{phase}: {'...' if seconds is None else f'{seconds:.1f} s'}", flush=True)

    store = ImageStore(args.data_dir)
    start = time.monotonic()
    record = build_base_image(store, options, show)
    print(f"image {record.image_id} in {time.monotonic() - start:.1f} s at {record.path}")
    if args.publish:
        publish(record, args.publish)
        _recipe_file(args.publish).write_text(recipe_key(options) + "\n")
        print(f"published at {args.publish}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
