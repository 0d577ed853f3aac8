"""Bootloaders written straight into a disk file: GRUB for BIOS and for UEFI.

No grub-install, no loop device, no mount. BIOS: GRUB's boot.img goes into the
MBR's code area (the partition table is left alone) and core.img into the gap
between the MBR and the first partition, exactly where grub-bios-setup would
put them. UEFI: a standalone GRUB EFI binary is copied onto the ESP with
mtools. Both find the root filesystem by UUID and read the same
/boot/grub/grub.cfg, which names the kernel directly: no menu, no delay.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from racker import files, proc
from racker.errors import PromoteError
from racker.store import imagetree

GRUB_LIB = Path("/usr/lib/grub")
SECTOR = 512

# Offsets in GRUB's boot.img (grub-core/boot/i386/pc/boot.S).
KERNEL_SECTOR_OFFSET = 0x5C  # 8 bytes: LBA of core.img's first sector
BOOT_DRIVE_CHECK_OFFSET = 0x66  # a 2-byte jmp; nop'd for hard disks, as grub-bios-setup does
MBR_CODE_SIZE = 440  # boot code ends where the disk signature and partition table start
DISKBOOT_BLOCKLIST = SECTOR - 12  # in diskboot.img (core.img's first sector): where its blocklist starts

# Modules built into the images, so that nothing has to be found before the root is.
SHARED_MODULES = (
    "part_msdos", "part_gpt", "ext2", "search", "search_fs_uuid",
    "normal", "linux", "echo", "test", "serial", "terminal", "gzio",
)  # fmt: skip
BIOS_MODULES = ("biosdisk", "linux16", *SHARED_MODULES)
EFI_MODULES = (*SHARED_MODULES, "fat", "efi_gop")


@dataclass(frozen=True)
class EfiTarget:
    """GRUB for one architecture's UEFI: its platform, the removable-media file name firmware looks for,
    where its modules come from, and the serial console its kernel logs to."""

    grub: str
    binary: str
    console: str
    from_image: bool = False  # modules from the image's own GRUB (prepare installs it), not the host's


# Debian architecture -> its UEFI GRUB. arm64 boots UEFI only (AAVMF); the host's grub-mkimage
# builds its GRUB from the image's arm64-efi modules (grub-efi-arm64-bin, installed by prepare).
EFI_TARGETS = {
    "amd64": EfiTarget("x86_64-efi", "BOOTX64.EFI", "ttyS0"),
    "arm64": EfiTarget("arm64-efi", "BOOTAA64.EFI", "ttyAMA0", from_image=True),
}


def efi_target(arch: str) -> EfiTarget:
    try:
        return EFI_TARGETS[arch]
    except KeyError:
        raise PromoteError(f"racker does not make {arch} disks yet", hint="architectures: " + ", ".join(EFI_TARGETS)) from None


def grub_lib(target: EfiTarget, rootfs: Path, work: Path) -> Path:
    """Where `target`'s GRUB modules are read from: the host's /usr/lib/grub, or a copy in `work` of
    the image's, read through imagetree (grub-mkimage and install_modules follow links: a module
    that is a link to a host file must not carry that file into the disk)."""
    if not target.from_image:
        return GRUB_LIB
    copy = work / "image-grub-lib"
    if (copy / target.grub / "normal.mod").is_file():
        return copy  # copied already, for this promote
    tree = imagetree.Tree(rootfs)
    source = f"usr/lib/grub/{target.grub}"
    with imagetree.refused(PromoteError, f"cannot read /{source} in the image"):
        for name in tree.listdir(source):
            if tree.is_file(f"{source}/{name}"):  # links resolve inside the image
                (copy / target.grub).mkdir(parents=True, exist_ok=True)
                (copy / target.grub / name).write_bytes(tree.read_bytes(f"{source}/{name}"))
    return copy


def early_config(root_uuid: str) -> str:
    return f"search --no-floppy --fs-uuid --set=root {root_uuid}\nset prefix=($root)/boot/grub\n"


def grub_cfg(root_uuid: str, kernel: str, initrd: str, cmdline: str, firmware: str = "bios") -> str:
    """The one menu entry, booted at once.

    BIOS boots with linux16. GRUB's `linux` reserves the kernel's whole
    decompression buffer (some 60 MB) at the kernel's preferred address, loads
    it elsewhere and moves all of it there a byte at a time before jumping in:
    over a second under emulation. linux16 loads the kernel at 1 MB, and the
    kernel's own decompressor moves what it needs, eight bytes at a time.
    """
    linux, initrd_command = ("linux16", "initrd16") if firmware == "bios" else ("linux", "initrd")
    return (
        "# Written by racker promote.\n"
        "set timeout=0\n"
        "set timeout_style=hidden\n"
        "set default=0\n"
        "serial --unit=0 --speed=115200\n"
        # Output on the serial port too, for clouds' serial consoles. Not input:
        # GRUB's serial input costs seconds of polling under emulation, and with
        # no menu and no delay there is nothing to type.
        "terminal_output serial console\n"
        f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
        "menuentry 'racker' {\n"
        f"  {linux} /{kernel} root=UUID={root_uuid} {cmdline}\n"
        f"  {initrd_command} /{initrd}\n"
        "}\n"
    )


def _platform_dir(platform: str, lib: Path = GRUB_LIB) -> Path:
    path = lib / platform
    if not (path / "normal.mod").is_file():
        package = {"i386-pc": "grub-pc-bin", "x86_64-efi": "grub-efi-amd64-bin", "arm64-efi": "grub-efi-arm64-bin"}[platform]
        where = "" if lib == GRUB_LIB else " in the image"
        raise PromoteError(f"GRUB for {platform} is not installed{where}", hint=f"apt-get install {package}")
    return path


def install_modules(boot_grub: Path, platform: str, lib: Path = GRUB_LIB) -> None:
    """Copy GRUB's modules for `platform` into the image's /boot/grub, as grub-install would.

    Each file is a new one renamed over what the image has: the staged tree is
    hard links into the store, and an image that ships /boot/grub/<platform>
    must not have the host's modules written through into its files.
    """
    source = _platform_dir(platform, lib)
    target = boot_grub / platform
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.suffix in (".mod", ".lst", ".img"):
            copied = target / path.name
            files.write_atomic(copied, path.read_bytes(), path.stat().st_mode & 0o7777)
            shutil.copystat(path, copied)


def _mkimage(platform: str, output: Path, config: Path, modules: tuple[str, ...], lib: Path = GRUB_LIB) -> None:
    directory = _platform_dir(platform, lib)
    proc.run(["grub-mkimage", "-O", platform, "-d", str(directory), "-o", str(output), "-c", str(config), "-p", "/boot/grub", *modules])


def install_bios(disk: Path, root_uuid: str, first_partition_lba: int, work: Path) -> None:
    """boot.img into the MBR, core.img right after it, before the first partition."""
    directory = _platform_dir("i386-pc")
    config = work / "early-bios.cfg"
    config.write_text(early_config(root_uuid))
    core = work / "core.img"
    _mkimage("i386-pc", core, config, BIOS_MODULES)
    core_bytes = core.read_bytes()
    sectors = (len(core_bytes) + SECTOR - 1) // SECTOR
    if 1 + sectors > first_partition_lba:
        raise PromoteError(f"GRUB's core.img ({sectors} sectors) does not fit before the first partition")
    # diskboot.img (core.img's first sector) loads the rest from LBA 2 onwards;
    # grub-mkimage already wrote that blocklist, so core.img goes at LBA 1.
    start, length, _segment = struct.unpack_from("<QHH", core_bytes, DISKBOOT_BLOCKLIST)
    if start != 2 or length != sectors - 1:
        raise PromoteError(f"unexpected blocklist in GRUB's core.img (start {start}, length {length})")
    boot = bytearray((directory / "boot.img").read_bytes())
    struct.pack_into("<Q", boot, KERNEL_SECTOR_OFFSET, 1)
    boot[BOOT_DRIVE_CHECK_OFFSET : BOOT_DRIVE_CHECK_OFFSET + 2] = b"\x90\x90"
    with open(disk, "r+b") as handle:
        mbr = bytearray(handle.read(SECTOR))
        if mbr[510:512] != b"\x55\xaa":
            raise PromoteError(f"{disk} has no partition table to install GRUB beside")
        mbr[:MBR_CODE_SIZE] = boot[:MBR_CODE_SIZE]
        handle.seek(0)
        handle.write(mbr)
        handle.seek(SECTOR)
        handle.write(core_bytes)


def build_efi_binary(root_uuid: str, work: Path, target: EfiTarget = EFI_TARGETS["amd64"], lib: Path = GRUB_LIB) -> Path:
    """A standalone GRUB for `target`'s UEFI that finds the root by UUID."""
    config = work / "early-efi.cfg"
    config.write_text(early_config(root_uuid))
    binary = work / target.binary
    _mkimage(target.grub, binary, config, EFI_MODULES, lib)
    return binary


def install_efi(disk: Path, esp_offset: int, binary: Path, epoch: int | None = None) -> None:
    """Copy the EFI binary to the removable-media path on the ESP (its own name: BOOTX64.EFI,
    BOOTAA64.EFI), with mtools (its FAT entries dated SOURCE_DATE_EPOCH `epoch`, when there is one:
    Debian 12's mtools does not read it, so the files are dated and mcopy -m keeps their dates)."""
    tree = binary.parent / "esp"
    (tree / "EFI/BOOT").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(binary, tree / "EFI/BOOT" / binary.name)
    keep_dates = []
    if epoch is not None:
        for path in (tree / "EFI/BOOT" / binary.name, tree / "EFI/BOOT", tree / "EFI"):
            os.utime(path, (epoch, epoch))
        keep_dates = ["-m"]
    env = {"MTOOLS_SKIP_CHECK": "1"}
    proc.run(["mcopy", "-s", "-Q", *keep_dates, "-i", f"{disk}@@{esp_offset}", str(tree / "EFI"), "::/"], env=env)
