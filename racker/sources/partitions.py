"""A disk's partition table (MBR with its logical partitions, or GPT with its CRCs checked),
and what each partition holds, read from the bytes in Python: no sfdisk, no kernel, no loop device.
The one MBR/GPT reader: pulling a disk, checking a VM's disk boots, reading a built disk back.

It reads through a Reader, (offset, length) -> bytes: a raw file's descriptor (fd_reader), or
whatever gets at a disk packed in another format (qemu-img dd), with its first sectors cached.

A disk with no table is one volume: a bare filesystem (Firecracker's ext4) or an LVM PV.
"""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from racker.errors import BadDisk

SECTOR = 512
GPT_ROOT_X86_64 = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"  # Discoverable Partitions Specification
GPT_USR_X86_64 = "8484680c-9521-48c6-9c11-b0720656f69e"
GPT_ESP = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"  # the EFI system partition
GPT_BIOS_BOOT = "21686148-6449-6e6f-744e-656564454649"  # GRUB's core.img on a BIOS disk with a GPT
MBR_ESP = "ef"
MBR_EXTENDED = (0x05, 0x0F, 0x85)
MBR_PROTECTIVE = 0xEE
MAX_LOGICAL = 128  # an EBR chain longer than this loops
HEAD = 34 * SECTOR  # the MBR, the GPT header and 128 entries: what a table's reading mostly needs

Reader = Callable[[int, int], bytes]  # (offset, length) -> the disk's bytes there (fewer at its end)


@dataclass(frozen=True)
class Volume:
    """A byte range of the disk file that may hold a filesystem: a partition, the whole disk, or an LV."""

    name: str  # "partition 2", "the whole disk", "LV vg0/root"
    offset: int
    size: int
    number: int = 0  # the partition number as Linux counts it (sda5 is the first logical one)
    type: str = ""  # GPT type GUID, or the MBR type as two hex digits
    partuuid: str = ""
    partlabel: str = ""
    ranges: tuple[tuple[int, int], ...] = field(default=())  # (offset, size) pieces of an LV of several segments


@dataclass(frozen=True)
class Filesystem:
    """What a volume's first bytes say it holds."""

    kind: str  # "ext4", "xfs", "lvm2", "swap", "vfat", or "" (unknown)
    uuid: str = ""
    label: str = ""


def read_at(fd: int, offset: int, length: int) -> bytes:
    return os.pread(fd, length, offset)


def fd_reader(fd: int) -> Reader:
    return lambda offset, length: read_at(fd, offset, length)


def cached(read: Reader, length: int = HEAD) -> Reader:
    """`read`, with the disk's first `length` bytes read once: where each read is a qemu-img run."""
    head = read(0, length)

    def reading(offset: int, size: int) -> bytes:
        return head[offset : offset + size] if offset + size <= len(head) else read(offset, size)

    return reading


def table(read: Reader, disk_size: int) -> tuple[str, list[Volume]]:
    """("gpt" | "dos" | "", the partitions in order); a disk with no table is one volume."""
    head = read(0, SECTOR)
    if len(head) < SECTOR:
        raise BadDisk(f"the disk is {disk_size} bytes: too small to hold a partition table or a filesystem")
    if head[510:512] == b"\x55\xaa":
        types = [head[446 + 16 * i + 4] for i in range(4)]
        if MBR_PROTECTIVE in types:
            return "gpt", _gpt(read, disk_size)
        if probe(read, 0).kind == "" and any(types):  # a boot sector of a bare FAT is not a table
            return "dos", _mbr(read, head, disk_size)
    return "", [Volume("the whole disk", 0, disk_size)]


def _mbr(read: Reader, head: bytes, disk_size: int) -> list[Volume]:
    found: list[Volume] = []
    for index in range(4):
        kind, start, count = _mbr_entry(head, index)
        if not kind or not count:
            continue
        if kind in MBR_EXTENDED:
            found += _logical(read, start, disk_size)
        else:
            found.append(_inside(Volume(f"partition {index + 1}", start * SECTOR, count * SECTOR, index + 1, f"{kind:02x}"), disk_size))
    return found


def _mbr_entry(sector: bytes, index: int) -> tuple[int, int, int]:
    entry = sector[446 + 16 * index : 446 + 16 * (index + 1)]
    start, count = struct.unpack_from("<II", entry, 8)
    return entry[4], start, count


def _logical(read: Reader, extended: int, disk_size: int) -> list[Volume]:
    """The chain of EBRs: each holds one logical partition (relative to itself) and a link
    to the next (relative to the extended partition's start)."""
    found: list[Volume] = []
    ebr, seen = extended, set()
    while ebr and len(found) < MAX_LOGICAL and ebr not in seen:
        seen.add(ebr)
        sector = read(ebr * SECTOR, SECTOR)
        if len(sector) < SECTOR or sector[510:512] != b"\x55\xaa":
            raise BadDisk(f"the extended partition's boot record at sector {ebr} is broken")
        kind, start, count = _mbr_entry(sector, 0)
        if kind and count:
            number = 5 + len(found)
            found.append(_inside(Volume(f"partition {number}", (ebr + start) * SECTOR, count * SECTOR, number, f"{kind:02x}"), disk_size))
        _kind, link, _count = _mbr_entry(sector, 1)
        ebr = extended + link if link else 0
    return found


def _gpt(read: Reader, disk_size: int) -> list[Volume]:
    """The primary GPT, or the backup at the disk's end where the primary's CRCs do not match."""
    last_lba = disk_size // SECTOR - 1
    for lba in (1, last_lba):
        parsed = _gpt_at(read, lba, disk_size)
        if parsed is not None:
            return parsed
    raise BadDisk("the disk's GPT is corrupt: neither the primary nor the backup header matches its CRC")


def _gpt_at(read: Reader, lba: int, disk_size: int) -> list[Volume] | None:
    header = read(lba * SECTOR, SECTOR)
    if header[:8] != b"EFI PART":
        return None
    size = struct.unpack_from("<I", header, 12)[0]
    if not 92 <= size <= SECTOR:
        return None
    crc = struct.unpack_from("<I", header, 16)[0]
    if zlib.crc32(header[:16] + b"\0\0\0\0" + header[20:size]) != crc:
        return None
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
    if entry_size < 128 or count * entry_size > 1 << 20:
        return None
    entries = read(entries_lba * SECTOR, count * entry_size)
    if zlib.crc32(entries) != entries_crc:
        return None
    found = []
    for index in range(count):
        entry = entries[index * entry_size : (index + 1) * entry_size]
        kind = uuid.UUID(bytes_le=entry[:16])
        if kind.int == 0:
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        name = entry[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        volume = Volume(
            f"partition {index + 1}",
            first * SECTOR,
            (last - first + 1) * SECTOR,
            index + 1,
            str(kind),
            str(uuid.UUID(bytes_le=entry[16:32])),
            name,
        )
        found.append(_inside(volume, disk_size))
    return found


def _inside(volume: Volume, disk_size: int) -> Volume:
    if volume.size <= 0 or volume.offset + volume.size > disk_size:
        end = volume.offset + volume.size
        raise BadDisk(f"{volume.name} ends at byte {end}, past the disk's end ({disk_size}): the image is truncated or corrupt")
    return volume


# -- what a volume holds ------------------------------------------------------------------


def probe(read: Reader, offset: int) -> Filesystem:
    """The filesystem (or LVM PV) at `offset`, with its UUID and label where it has them."""
    head = read(offset, 4096)
    ext = head[1024:1280]
    if len(ext) == 256 and ext[56:58] == b"\x53\xef":
        return Filesystem("ext4", str(uuid.UUID(bytes=ext[104:120])), _text(ext[120:136]))
    if head[:4] == b"XFSB":
        return Filesystem("xfs", str(uuid.UUID(bytes=head[32:48])), _text(head[108:120]))
    if any(head[s * SECTOR : s * SECTOR + 8] == b"LABELONE" for s in range(4)):
        return Filesystem("lvm2")
    if head[4086:4096] == b"SWAPSPACE2":
        return Filesystem("swap", str(uuid.UUID(bytes=head[1036:1052])), _text(head[1052:1068]))
    if head[510:512] == b"\x55\xaa" and (head[82:87] == b"FAT32" or head[54:59] in (b"FAT12", b"FAT16")):
        serial = head[67:71] if head[82:87] == b"FAT32" else head[39:43]
        number = struct.unpack("<I", serial)[0]
        return Filesystem("vfat", f"{number >> 16:04X}-{number & 0xFFFF:04X}")
    return Filesystem("")


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
