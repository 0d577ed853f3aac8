"""Promote: a prepared image becomes a bootable disk file, without loop devices or mounts.

    promote's files (fstab, grub.cfg, GRUB modules, profile files, app unit) ──▶ overlay dir
    image (store) + overlay ──hard-link copy, overlay put over it──▶ staged tree (a profile's
                  tree checks only: fail before any disk is built)
    image (store) ──mkfs.ext4 -d──▶ root partition of a sparse raw disk (sfdisk on the file)
                  ──debugfs writes the overlay over it──▶ the tree the disk holds
                  ──GRUB images written directly / mtools ESP──▶ bootable raw disk
                  ──qemu-img / tar / split / box──▶ the asked-for format, as OUT's .partial
                  ──profile's disk checks, on what was written──▶ renamed into place

The store image is never modified: mkfs and cp only read it; the staged tree is
hard links to it, and every file promote writes there replaces a link rather
than writing through it. Without tree checks (the generic profile, the cached
disks VMs boot) no tree is staged at all: copying and removing its ~18,000
links cost more than the filesystem itself.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from racker import fingerprint, prepare, progress, store
from racker.errors import PromoteError, RequirementsFailed
from racker.promote import app as app_service
from racker.promote import bootloader, boxes, disk, formats, profiles, vagrant
from racker.store import distros, imagetree, refs, reproducible

DEFAULT_SIZE = 2 * 1024**3


@dataclass
class Options:
    fmt: str = "raw"
    firmware: str = "bios"
    size: int | None = None  # None: 2 GiB, or what the image needs if more
    profile: str = "generic"
    app: bool = False
    vagrant_user: bool = False  # user vagrant, passwordless sudo, Vagrant's insecure keys
    # Compressed output (qcow2's clusters); None: for a cloud profile's upload, when the
    # format can be. True for a format that cannot be is an error, not a quiet no-op.
    compress: bool | None = None

    def compressed(self, fmt: formats.Format) -> bool:
        wanted = self.profile != "generic" if self.compress is None else self.compress
        return wanted and fmt.compression != ""


@dataclass
class Promoted:
    path: Path
    image: store.StoredImage
    layout: disk.Layout
    fmt: str
    checks: list[profiles.Result] = field(default_factory=list)
    extra: dict[str, Path] = field(default_factory=dict)  # firecracker: vmlinux, initrd
    seconds: float = 0.0


def default_output(image: store.StoredImage, options: Options) -> Path:
    base = image.name.partition(refs.PREPARED)[0].replace("/", "_").replace(":", "_")  # NAME+vm, NAME+vm-generic
    return Path.cwd() / f"{base}-{options.firmware}{formats.get(options.fmt).suffix}"


def plan(image: store.StoredImage, options: Options) -> tuple[disk.Layout, prepare.Kernel, profiles.Profile, formats.Format]:
    """Everything that can be wrong with the request, found before any work is done."""
    fmt = formats.get(options.fmt)
    profile = profiles.get(options.profile)
    if options.firmware not in profile.firmware:
        raise PromoteError(f"profile {profile.name} does not boot with {options.firmware}")
    if not fmt.disk and options.firmware != "bios":
        raise PromoteError("a firecracker rootfs has no firmware: leave --firmware out")
    if fmt.package and options.firmware != "bios":
        # Their descriptors name no firmware, and every importer then gives the VM a BIOS.
        raise PromoteError(f"a {fmt.name} machine boots with BIOS: leave --firmware out")
    _raise_if_failed(profile, profiles.check_request(profile, fmt.name))
    arch = prepare.image_architecture(image)
    if arch != "amd64":  # another architecture: a disk that boots UEFI, with the image's own GRUB
        bootloader.efi_target(arch)
        if options.firmware != "uefi" or not fmt.disk or fmt.package:
            raise PromoteError(f"an {arch} image is promoted to a UEFI disk only", hint="--firmware uefi, and a disk format (raw, qcow2…)")
    if options.compress:
        formats.check_compress(fmt)
    with imagetree.refused(PromoteError, f"cannot promote {image.name}"):
        kernel = prepare.find_kernel(image.rootfs)
        missing = prepare.missing_drivers(image.rootfs, kernel, fmt.drivers)
    if missing:
        flavour = prepare.kernel_for(fmt.drivers)
        raise PromoteError(
            f"{image.name}'s kernel {kernel.version} lacks {', '.join(missing)}, which a {fmt.name} boots on",
            hint=f"prepare it with the {flavour} kernel: racker promote does so for --format {fmt.name}",
        )
    tree_bytes = image.size or store.tree_size(image.rootfs)
    size = options.size or max(DEFAULT_SIZE, disk.min_root_size(tree_bytes) + 128 * disk.MiB)
    if options.fmt == "gce" and size % 1024**3:
        size = (size // 1024**3 + 1) * 1024**3  # GCE imports whole GiB disks only
    # Ids and clock from the image: one image, one disk, byte for byte (reproducible.py).
    epoch = reproducible.of(image.manifest) or reproducible.override()
    layout = disk.plan(options.firmware, size, tree_bytes, seed=image.digest, epoch=epoch)
    if options.app:
        app_service.spec(image)  # raises when the image has no entrypoint or command
    return layout, kernel, profile, fmt


def _raise_if_failed(profile: profiles.Profile, checks: list[profiles.Result]) -> None:
    failed = [c for c in checks if not c.ok and c.blocking]  # a warning is shown, the output kept
    if failed:
        order = {r.text: i for i, r in enumerate(profile.requirements)}
        raise RequirementsFailed(
            f"the image does not meet {len(failed)} requirement(s) of {profile.name}: "
            + "; ".join(f"{c.requirement} ({c.detail})" for c in failed),
            sorted(checks, key=lambda c: order.get(c.requirement, len(order))),
        )


def promote(image: store.StoredImage, output: Path | None = None, options: Options | None = None) -> Promoted:
    """Build the disk; the output file appears complete, and meeting the profile, or not at all."""
    options = options or Options()
    layout, kernel, profile, fmt = plan(image, options)
    output = (output or default_output(image, options)).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    arch = prepare.image_architecture(image)
    cmdline = f"rw {profile.cmdline}"
    if options.firmware == "uefi":  # the serial console the architecture's kernel logs to (arm64: the PL011's)
        cmdline = cmdline.replace("ttyS0", bootloader.efi_target(arch).console)
    with (
        progress.step(f"promoting {image.name} to {output.name}"),
        store.workdir("promote") as work,
        store.reading(image) as rootfs,
    ):
        overlay = work / "overlay"
        with progress.step("writing promote's files"), imagetree.refused(PromoteError, f"cannot promote {image.name}"):
            write_overlay(image, rootfs, overlay, layout, kernel, profile, options, fmt, cmdline)
        tree = rootfs
        if any(r.reads == "tree" for r in profile.requirements):
            with progress.step("staging the root tree"):  # for the checks only: the disk is built from rootfs
                tree = work / "tree"
                stage(rootfs, tree, overlay)
        with imagetree.refused(PromoteError, f"cannot check {image.name}"):
            checks = profiles.verify_tree(profile, tree)
        _raise_if_failed(profile, checks)  # before the disk is built

        def verify(built: Path) -> None:
            """The disk checks, on the output as built; a failure leaves no output."""
            if any(r.reads == "disk" for r in profile.requirements):
                with progress.step("checking the disk"):
                    checks.extend(profiles.verify_disk(profile, profiles.Built(built, work)))
                _raise_if_failed(profile, checks)

        result = Promoted(output, image, layout, fmt.name)
        if fmt.name == "raw":
            with store.output_file(work, output) as partial:
                build_disk(partial, layout, rootfs, overlay, work, arch)
                verify(partial)
        elif fmt.package:
            raw = work / "disk.raw"
            build_disk(raw, layout, rootfs, overlay, work, arch)
            appliance = boxes.Appliance(
                name=boxes.member_name(output.name, fmt.suffix),
                os_id=distros.detect(tree).id,
                capacity=layout.size,
                mac=boxes.mac_for(image.digest),
                seed=image.digest,
                epoch=layout.epoch,
            )
            with progress.step(f"packing {fmt.name}"), store.output_file(work, output) as partial:
                boxes.pack(raw, fmt, partial, appliance)
                verify(partial)
        elif fmt.disk:
            raw = work / "disk.raw"
            build_disk(raw, layout, rootfs, overlay, work, arch)
            with progress.step(f"writing {fmt.name}"), store.output_file(work, output) as partial:
                if fmt.name == "gce":
                    formats.pack_gce(raw, partial, epoch=layout.epoch)
                else:
                    formats.convert(raw, fmt, partial, output.name, compress=options.compressed(fmt), seed=image.digest, epoch=layout.epoch)
                verify(partial)
        else:
            result.extra = build_firecracker(rootfs, overlay, layout, kernel, output, work, verify, profile.cmdline)
        order = {r.text: i for i, r in enumerate(profile.requirements)}
        result.checks = sorted(checks, key=lambda c: order[c.requirement])
    return result


# Cached disks are named after the image's digest, the firmware and disk_key():
# a change to what shapes a disk makes a new name, and gc removes the old ones.
CACHED_DISK_KEY = re.compile(r"-v(\w+)\.raw$")


def disk_key() -> str:
    """What a cached disk depends on besides its image: the code and tables of the
    modules that build it (prepare's write_file and find_kernel among them; not
    app, since a cached disk runs no app)."""
    return fingerprint.fingerprint(sys.modules[__name__], bootloader, disk, formats, profiles, prepare)


def cached_disk_name(digest: str, firmware: str) -> str:
    """The file name, in the store's disks/, of the cached disk of an image with `digest`."""
    return f"{digest.replace(':', '-')}-{firmware}-v{disk_key()}.raw"


def disk_lock(name: str) -> str:
    """The lock held while the cached disk `name` is built."""
    return f"disk-{name}"


def is_stale_cached_disk(path: Path) -> bool:
    """A cached disk made with another disk key (an older racker): none of this version boots it."""
    match = CACHED_DISK_KEY.search(path.name)
    return bool(match) and match.group(1) != disk_key()


def cached_disk(image: store.StoredImage, firmware: str = "bios") -> Path:
    """A raw disk of `image` kept in the store, built once (under a lock) and reused.

    VMs boot overlays over it, so it is never written after it is made.
    """
    directory = store.home() / "disks"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / cached_disk_name(image.digest, firmware)
    if path.exists():
        return path
    with store.locked(disk_lock(path.name)):
        if not path.exists():
            promote(image, path, Options(fmt="raw", firmware=firmware))
    return path


def write_overlay(
    image: store.StoredImage,
    rootfs: Path,
    overlay: Path,
    layout: disk.Layout,
    kernel: prepare.Kernel,
    profile: profiles.Profile,
    options: Options,
    fmt: formats.Format,
    cmdline: str,
) -> None:
    """Every file promote adds to the image or replaces in it, in a directory of their own
    (written over the image's tree in the disk: the tree itself is never copied)."""
    overlay.mkdir()
    files = root_files(layout, kernel, cmdline, options.firmware if fmt.disk else "none")
    files.update(format_files(fmt, rootfs))
    files.update(profile.files)
    if options.app:
        files.update(app_service.unit_files(app_service.resolved(app_service.spec(image), rootfs)))
    for rel, text in files.items():
        prepare.write_file(overlay, rel, text)
    if options.app:
        app_service.enable(overlay)
    if options.vagrant_user:
        vagrant.add(rootfs, overlay)
    if fmt.disk:
        if options.firmware == "uefi":
            target = bootloader.efi_target(prepare.image_architecture(image))
            bootloader.install_modules(overlay / "boot/grub", target.grub, bootloader.grub_lib(target, rootfs, overlay.parent))
        else:
            bootloader.install_modules(overlay / "boot/grub", "i386-pc")
    if fmt.disk and options.firmware == "uefi":
        (overlay / "boot/efi").mkdir(parents=True, exist_ok=True)  # the ESP's mount point


def stage(rootfs: Path, tree: Path, overlay: Path) -> None:
    """The tree the disk will hold, for the profile's checks to read: a hard-link copy of
    the image's root (cheap, and the store's files are never opened for writing), with
    the overlay's files put in place of the links they replace."""
    from racker import proc

    proc.run(["cp", "-al", str(rootfs), str(tree)], timeout=600)
    staged = imagetree.Tree(tree)  # the image's links resolve inside the staged tree, as in the disk
    try:
        for path in sorted(overlay.rglob("*")):
            rel = path.relative_to(overlay).as_posix()
            if path.is_symlink():
                staged.symlink(os.readlink(path), rel, replace=True)
            elif path.is_dir():
                if not staged.exists(rel):  # new: as the overlay has it (a user's home); else the image's
                    staged.mkdir(rel)
                    _same_owner_and_mode(path, staged, rel)
            else:
                staged.write_bytes(rel, path.read_bytes(), path.stat().st_mode & 0o7777)
                _same_owner_and_mode(path, staged, rel)
    except OSError as err:
        raise PromoteError(f"cannot stage /{rel} over the image: {err.strerror}") from None


def _same_owner_and_mode(source: Path, tree: imagetree.Tree, rel: str) -> None:
    info = source.lstat()
    tree.chown(rel, info.st_uid, info.st_gid)
    tree.chmod(rel, stat.S_IMODE(info.st_mode))


def root_files(layout: disk.Layout, kernel: prepare.Kernel, cmdline: str, firmware: str) -> dict[str, str]:
    """fstab naming root by UUID, read-write, and the GRUB menu that boots the kernel at once."""
    fstab = f"# Written by racker promote.\nUUID={layout.root_uuid} / ext4 rw,discard,errors=remount-ro 0 1\n"
    if firmware == "uefi":
        fstab += f"UUID={layout.esp_uuid} /boot/efi vfat umask=0077,nofail,x-systemd.automount 0 0\n"
    files = {"etc/fstab": fstab}
    if firmware != "none":
        files["boot/grub/grub.cfg"] = bootloader.grub_cfg(layout.root_uuid, kernel.vmlinuz, kernel.initrd, cmdline, firmware)
    return files


def format_files(fmt: formats.Format, tree: Path) -> dict[str, str]:
    """What a format's platform needs whatever the profile: its datasources first in cloud-init's list."""
    listed = profiles.datasource_list(tree)
    if not fmt.datasources or not listed:  # cloud-init's own default list has every datasource
        return {}
    sources = [*fmt.datasources, *(s for s in listed if s not in fmt.datasources)]
    text = f"# Written by racker promote: a {fmt.name} boots where these datasources are.\ndatasource_list: [{', '.join(sources)}]\n"
    return {f"etc/cloud/cloud.cfg.d/94-racker-{fmt.name}.cfg": text}


def build_disk(raw: Path, layout: disk.Layout, rootfs: Path, overlay: Path, work: Path, arch: str = "amd64") -> None:
    with progress.step("partitioning"):
        disk.create(raw, layout)
    if layout.firmware == "uefi":
        target = bootloader.efi_target(arch)
        with progress.step("writing the ESP"):
            disk.make_esp(raw, layout)
            binary = bootloader.build_efi_binary(layout.root_uuid, work, target, bootloader.grub_lib(target, rootfs, work))
            bootloader.install_efi(raw, layout.esp_offset, binary, layout.epoch)
    with progress.step("writing the root filesystem"):
        disk.make_root(raw, layout, rootfs, overlay)
    if layout.firmware == "bios":
        with progress.step("installing GRUB"):
            bootloader.install_bios(raw, layout.root_uuid, layout.root_offset // disk.SECTOR, work)


def build_firecracker(
    rootfs: Path,
    overlay: Path,
    layout: disk.Layout,
    kernel: prepare.Kernel,
    output: Path,
    work: Path,
    verify: Callable[[Path], None],
    cmdline: str,
) -> dict[str, Path]:
    """Firecracker boots a bare ext4 (no partition table) and an uncompressed ELF kernel;
    beside them, the configuration that boots them (`firecracker --config-file`)."""
    rootfs_only = disk.Layout(
        firmware="bios",
        size=layout.root_size,
        root_offset=0,
        root_size=layout.root_size,
        root_uuid=layout.root_uuid,
        hash_seed=layout.hash_seed,
        epoch=layout.epoch,
    )
    base = output.name.removesuffix(".ext4")
    extra = {
        "vmlinux": output.with_name(base + ".vmlinux"),
        "initrd": output.with_name(base + ".initrd"),
        "config": output.with_name(base + ".firecracker.json"),
    }
    with progress.step("writing the root filesystem"), store.output_file(work, output) as partial:
        with open(partial, "wb") as handle:
            handle.truncate(rootfs_only.size)
        disk.make_root(partial, rootfs_only, rootfs, overlay)
        verify(partial)
        image = imagetree.Tree(rootfs)
        with imagetree.refused(PromoteError, "cannot read the image's kernel"):
            with store.output_file(work, extra["vmlinux"]) as vmlinux, image.path_for_tool(kernel.vmlinuz) as vmlinuz:
                formats.extract_vmlinux(vmlinuz, vmlinux, work)
            with store.output_file(work, extra["initrd"]) as initrd:
                initrd.write_bytes(image.read_bytes(kernel.initrd))
        with store.output_file(work, extra["config"]) as config:
            document = formats.firecracker_config(output, extra["vmlinux"], extra["initrd"], cmdline)
            config.write_text(json.dumps(document, indent=2) + "\n")
    return extra
