"""What a disk given to a VM is, and whether racker may boot it: format, size, firmware."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from racker.errors import BadDisk
from racker.sources import diskfile, partitions
from racker.sources.diskfile import SECTOR, qemu_img_info

# qemu-img's format names that racker boots (vpc is VHD).
BOOTABLE_FORMATS = ("raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi")


@dataclass(frozen=True)
class DiskInfo:
    path: Path
    format: str
    virtual_size: int
    firmware: str  # what the disk boots with: "bios" or "uefi"


def inspect_disk(path: Path, scratch: Path, *, bootable: bool = True) -> DiskInfo:
    """What a user-supplied disk is; BadDisk for anything racker must not boot.

    A backing file or external data file is refused: it would let a disk read
    any file on this host into the guest.
    """
    if not path.is_file():
        raise BadDisk(f"{path} is not a file")
    info = qemu_img_info(path)
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise BadDisk(f"{path} has a backing file ({info.get('backing-filename')}); racker boots self-contained disks only")
    data = info.get("format-specific", {}).get("data", {})
    extents = [extent.get("filename") for extent in data.get("extents", [])]
    if data.get("data-file") or any(name and os.path.abspath(name) != str(path.absolute()) for name in extents):
        raise BadDisk(f"{path} refers to other files; racker boots self-contained disks only")
    fmt = info.get("format", "")
    if fmt not in BOOTABLE_FORMATS:
        raise BadDisk(f"{path} is a {fmt or 'unknown'} file, not a disk image racker boots ({', '.join(BOOTABLE_FORMATS)})")
    size = int(info.get("virtual-size", 0))
    firmware = boot_firmware(partitions.cached(diskfile.disk_reader(path, fmt, scratch)), size, path) if bootable else "bios"
    return DiskInfo(path, fmt, size, firmware)


def boot_firmware(read: partitions.Reader, disk_size: int, path: Path | str = "disk") -> str:
    """'bios' or 'uefi' from a disk's partition table; BadDisk if it cannot boot."""
    head = read(0, SECTOR)
    if len(head) < SECTOR or head[510:512] != b"\x55\xaa":
        raise BadDisk(f"{path} is not bootable: it has no boot sector or partition table")
    try:
        label, volumes = partitions.table(read, disk_size)
    except BadDisk as error:
        raise BadDisk(f"{path} is not bootable: {error}") from None
    types = {volume.type for volume in volumes}
    if label == "gpt":
        if partitions.GPT_ESP in types:
            return "uefi"
        if partitions.GPT_BIOS_BOOT in types and any(head[:440]):
            return "bios"
        raise BadDisk(f"{path} is not bootable: its GPT has neither an EFI system partition nor a BIOS boot partition")
    if partitions.MBR_ESP in types:
        return "uefi"
    if not any(head[:440]):
        raise BadDisk(f"{path} is not bootable: its MBR holds no boot code")
    return "bios"
