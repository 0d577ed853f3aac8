"""What a disk given to a VM is, and whether racker may boot it: format, size, firmware."""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from racker import proc
from racker.errors import BadDisk
from racker.sources.diskfile import SECTOR, qemu_img_info

# qemu-img's format names that racker boots (vpc is VHD).
BOOTABLE_FORMATS = ("raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi")

ESP_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
BIOS_BOOT_GUID = "21686148-6449-6e6f-744e-656564454649"


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
    firmware = boot_firmware(_read_head(path, fmt, scratch), path) if bootable else "bios"
    return DiskInfo(path, fmt, int(info.get("virtual-size", 0)), firmware)


def _read_head(path: Path, fmt: str, scratch: Path, sectors: int = 34) -> bytes:
    if fmt == "raw":
        with open(path, "rb") as handle:
            return handle.read(sectors * SECTOR)
    out = scratch / "head.raw"
    proc.run(["qemu-img", "dd", "-f", fmt, "-O", "raw", f"bs={SECTOR}", f"count={sectors}", f"if={path}", f"of={out}"])
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw))


def boot_firmware(head: bytes, path: Path | str = "disk") -> str:
    """'bios' or 'uefi' from the first sectors of a disk; BadDisk if it cannot boot."""
    if len(head) < 2 * SECTOR or head[510:512] != b"\x55\xaa":
        raise BadDisk(f"{path} is not bootable: it has no boot sector or partition table")
    entries = [head[446 + 16 * i : 446 + 16 * (i + 1)] for i in range(4)]
    types = [entry[4] for entry in entries]
    if 0xEE in types:  # protective MBR: the real table is GPT
        if head[SECTOR : SECTOR + 8] != b"EFI PART":
            raise BadDisk(f"{path} is not bootable: its GPT header is missing")
        entries_lba, count, size = struct.unpack_from("<QII", head, SECTOR + 72)
        table = head[entries_lba * SECTOR :]
        guids = {_guid(table[i * size : i * size + 16]) for i in range(min(count, len(table) // max(size, 1)))}
        if ESP_GUID in guids:
            return "uefi"
        if BIOS_BOOT_GUID in guids and any(head[:440]):
            return "bios"
        raise BadDisk(f"{path} is not bootable: its GPT has neither an EFI system partition nor a BIOS boot partition")
    if 0xEF in types:
        return "uefi"
    if not any(head[:440]):
        raise BadDisk(f"{path} is not bootable: its MBR holds no boot code")
    return "bios"
