"""The ids and times qemu-img draws at random in a disk format's header, derived from the image instead.

qemu-img has no option to choose them, so that two converts of one raw disk differ:

    vmdk   the descriptor's CID (content id)
    vhd    the footer's unique id, its timestamp and its checksum (a dynamic VHD has the footer twice)
    vhdx   the headers' FileWriteGuid, DataWriteGuid and sequence numbers, the log entries' LogGuid,
           the Page83 data (the disk's SCSI id) in the metadata region, and their CRC-32C checksums
    vdi    the image's and its last snapshot's UUIDs

settle() rewrites them in place after the convert: each distinct id becomes a uuid5 named after
the image's digest, what it is and its rank, so ids that were equal stay equal (both VHDX
headers' FileWriteGuid) and those that differed still differ; a zero id (no log, no parent)
stays zero. Without a seed the file is left as qemu-img wrote it.
"""

from __future__ import annotations

import os
import re
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from racker.errors import PromoteError

ZERO = bytes(16)
VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z, where a VHD's timestamps count from


def settle(path: Path, qemu_format: str, seed: str, epoch: int | None = None) -> None:
    """Rewrite the random ids of `path`, a disk of `qemu_format`, from `seed` (the image's digest);
    `epoch` (its SOURCE_DATE_EPOCH) dates a VHD. Formats with no random ids are left alone."""
    settler = SETTLERS.get(qemu_format)
    if settler is None or not seed:
        return
    with open(path, "r+b") as handle:
        settler(_Disk(handle), _Ids(seed, qemu_format), epoch)


class _Disk:
    """The disk file, read and written in place at offsets (a fixed VHD is the whole disk's size)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.size = os.fstat(handle.fileno()).st_size

    def read(self, at: int, length: int) -> bytearray:
        self.handle.seek(at)
        return bytearray(self.handle.read(length))

    def write(self, at: int, blob: bytes) -> None:
        self.handle.seek(at)
        self.handle.write(blob)


class _Ids:
    """Each distinct id seen, in order, mapped to a uuid5 named after the seed and its rank."""

    def __init__(self, seed: str, what: str) -> None:
        self.seed, self.what = seed, what
        self.seen: dict[bytes, bytes] = {}

    def __call__(self, old: bytes) -> bytes:
        if old == ZERO:
            return old
        if old not in self.seen:
            self.seen[old] = self.named(f"id {len(self.seen)}")
        return self.seen[old]

    def named(self, name: str) -> bytes:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"racker-disk:{self.seed}:{self.what} {name}").bytes

    def replace(self, block: bytearray, at: int) -> None:
        """The 16-byte id at `at` in `block`, mapped."""
        block[at : at + 16] = self(bytes(block[at : at + 16]))


# -- vmdk --------------------------------------------------------------------------------------

_CID = re.compile(rb"^CID=[0-9a-fA-F]{1,8}$", re.MULTILINE)  # qemu-img writes it with %x: 1 to 8 digits


def _vmdk(disk: _Disk, ids: _Ids, epoch: int | None) -> None:
    head = disk.read(0, 512)
    if head[:4] != b"KDMV":  # the sparse extent (streamOptimized, monolithicSparse) that holds its descriptor
        raise PromoteError("qemu-img wrote a vmdk without a descriptor racker can read")
    offset, size = (512 * n for n in struct.unpack_from("<QQ", head, 28))
    text = bytes(disk.read(offset, size)).split(b"\0", 1)[0]
    # Always 8 digits: the text may grow by a few bytes into the descriptor's NUL padding.
    settled = _CID.sub(b"CID=" + ids.named("CID").hex()[:8].encode(), text)
    if len(settled) >= size:
        raise PromoteError("qemu-img wrote a vmdk descriptor with no room left")
    disk.write(offset, settled.ljust(size, b"\0"))


# -- vhd (qemu's vpc) --------------------------------------------------------------------------


def _vhd(disk: _Disk, ids: _Ids, epoch: int | None) -> None:
    footers = [disk.size - 512] + ([0] if disk.read(0, 8) == b"conectix" else [])  # a dynamic VHD's copy at the start
    for at in footers:
        footer = disk.read(at, 512)
        if footer[:8] != b"conectix":
            raise PromoteError("qemu-img wrote a vhd without its footer")
        if epoch is not None:
            struct.pack_into(">I", footer, 24, max(0, epoch - VHD_EPOCH))
        ids.replace(footer, 68)  # the unique id
        footer[64:68] = bytes(4)
        struct.pack_into(">I", footer, 64, ~sum(footer) & 0xFFFFFFFF)  # the ones' complement of the bytes' sum
        disk.write(at, footer)


# -- vhdx --------------------------------------------------------------------------------------

_VHDX_HEADERS = (64 << 10, 128 << 10)
_VHDX_REGION_TABLE = 192 << 10
_METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
_PAGE83 = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")


def _vhdx(disk: _Disk, ids: _Ids, epoch: int | None) -> None:
    headers = [disk.read(at, 4096) for at in _VHDX_HEADERS]
    if disk.read(0, 8) != b"vhdxfile" or any(h[:4] != b"head" for h in headers):
        raise PromoteError("qemu-img wrote a vhdx without its two headers")
    # The current header is the one with the higher sequence number: keep their order, from 1.
    first = min(struct.unpack_from("<Q", h, 8)[0] for h in headers)
    for at, header in zip(_VHDX_HEADERS, headers, strict=True):
        struct.pack_into("<Q", header, 8, struct.unpack_from("<Q", header, 8)[0] - first + 1)
        for field in (16, 32, 48):  # FileWriteGuid, DataWriteGuid, LogGuid
            ids.replace(header, field)
        disk.write(at, _checksummed(header))
    log_length, log_offset = struct.unpack_from("<IQ", headers[0], 68)
    at = log_offset
    while at < log_offset + log_length and disk.read(at, 4) == b"loge":  # the log's entries, replayed or not
        length = struct.unpack_from("<I", disk.read(at + 8, 4))[0]
        entry = disk.read(at, length)
        ids.replace(entry, 32)  # its LogGuid
        disk.write(at, _checksummed(entry))
        at += length
    page83 = _metadata_item(disk, _PAGE83)
    if page83 is not None:
        disk.write(page83, ids(bytes(disk.read(page83, 16))))


def _metadata_item(disk: _Disk, item: uuid.UUID) -> int | None:
    """The file offset of a metadata item, through the region table and the metadata table."""
    table = disk.read(_VHDX_REGION_TABLE, 64 << 10)
    for entry in range(16, 16 + 32 * struct.unpack_from("<I", table, 8)[0], 32):
        if uuid.UUID(bytes_le=bytes(table[entry : entry + 16])) == _METADATA_REGION:
            region = struct.unpack_from("<Q", table, entry + 16)[0]
            metadata = disk.read(region, 64 << 10)
            for row in range(32, 32 + 32 * struct.unpack_from("<H", metadata, 10)[0], 32):
                if uuid.UUID(bytes_le=bytes(metadata[row : row + 16])) == item:
                    return region + struct.unpack_from("<I", metadata, row + 16)[0]
    return None


def _checksummed(block: bytearray) -> bytearray:
    """A VHDX structure with its CRC-32C, taken with its checksum field (bytes 4-7) zero."""
    block[4:8] = bytes(4)
    struct.pack_into("<I", block, 4, crc32c(bytes(block)))
    return block


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def crc32c(blob: bytes) -> int:
    """CRC-32C (Castagnoli), as VHDX checksums its headers and log entries."""
    crc = 0xFFFFFFFF
    for byte in blob:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- vdi ---------------------------------------------------------------------------------------


def _vdi(disk: _Disk, ids: _Ids, epoch: int | None) -> None:
    header = disk.read(0, 512)
    if struct.unpack_from("<I", header, 64)[0] != 0xBEDA107F:
        raise PromoteError("qemu-img wrote a vdi without its signature")
    for at in (392, 408):  # the image's UUID, its last snapshot's (the link and the parent stay zero)
        ids.replace(header, at)
    disk.write(0, header)


SETTLERS: dict[str, Callable[[_Disk, _Ids, int | None], None]] = {"vmdk": _vmdk, "vpc": _vhd, "vhdx": _vhdx, "vdi": _vdi}
