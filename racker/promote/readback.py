"""Reading a built output back: its format, its size, and the disk's own bytes.

Whatever the disk is packed in (raw, a qemu-img format, GCE's tar.gz), the
profile checks read what was built through here, never what was asked for.
"""

from __future__ import annotations

import contextlib
import lzma
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from racker import proc
from racker.errors import PromoteError
from racker.promote import formats
from racker.sources import diskfile, partitions

SECTOR = 512
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def qemu_info(path: Path) -> dict:
    return diskfile.qemu_img_info(path)


def probe_format(path: Path) -> str:
    """The format the file is, by its content: racker's name for it (vpc is vhd), or tar.gz / gzip."""
    if is_gzip(path):
        try:
            with tarfile.open(path, "r:gz") as tar:
                tar.next()
            return "tar.gz"
        except (tarfile.TarError, OSError, EOFError):
            return "gzip"
    name = qemu_info(path)["format"]
    return formats.QEMU_NAMES.get(name, name)


@dataclass(frozen=True)
class TarMember:
    name: str
    type: bytes
    size: int


def tar_members(path: Path) -> list[TarMember]:
    """Every member of a tar.gz (reads all of it)."""
    with tarfile.open(path, "r:gz") as tar:
        return [TarMember(m.name, m.type, m.size) for m in tar]


def virtual_size(path: Path) -> int:
    """The disk's size as a guest sees it: qemu-img's virtual size, or the tar.gz's disk file's size."""
    if is_gzip(path):
        with _tar_disk(path) as (member, _handle):
            return member.size
    return int(qemu_info(path)["virtual-size"])


@contextlib.contextmanager
def _tar_disk(path: Path) -> Iterator[tuple[tarfile.TarInfo, object]]:
    with tarfile.open(path, "r:gz") as tar:
        member = tar.next()
        handle = tar.extractfile(member) if member is not None else None
        if member is None or handle is None:
            raise PromoteError(f"{path.name} holds no disk file")
        yield member, handle


def read_disk(path: Path, offset: int, length: int, work: Path) -> bytes:
    """`length` bytes of the disk at `offset`, read out of whatever holds it."""
    if is_gzip(path):
        with _tar_disk(path) as (_member, handle):
            handle.seek(offset)  # type: ignore[attr-defined]
            return handle.read(length)  # type: ignore[attr-defined]
    return diskfile.disk_reader(path, qemu_info(path)["format"], work)(offset, length)


def disk_table(path: Path, work: Path) -> tuple[str, list[partitions.Volume]]:
    """The built disk's partition table (partitions.table), read out of whatever holds it."""
    read = partitions.cached(lambda offset, length: read_disk(path, offset, length, work))
    return partitions.table(read, virtual_size(path))


def esp_extent(path: Path, work: Path) -> tuple[int, int] | None:
    """(offset, size) in bytes of the GPT's EFI system partition, or None."""
    label, volumes = disk_table(path, work)
    esp = next((v for v in volumes if label == "gpt" and v.type == partitions.GPT_ESP), None)
    return (esp.offset, esp.size) if esp else None


def esp_file(path: Path, rel: str, work: Path) -> bytes | None:
    """A file on the disk's ESP, read with mtools; None if there is no ESP or no such file."""
    extent = esp_extent(path, work)
    if extent is None:
        return None
    offset, size = extent
    if not is_gzip(path) and qemu_info(path)["format"] == "raw":
        image = f"{path}@@{offset}"
    else:
        esp = work / "esp-readback.img"
        esp.write_bytes(read_disk(path, offset, size, work))
        image = str(esp)
    out = work / "esp-readback.file"
    out.unlink(missing_ok=True)
    try:
        copied = proc.run(["mcopy", "-n", "-i", image, f"::/{rel}", str(out)], env=MTOOLS_ENV, check=False)
        return out.read_bytes() if copied.succeeded and out.is_file() else None
    finally:
        out.unlink(missing_ok=True)
        (work / "esp-readback.img").unlink(missing_ok=True)


def partition_starts(path: Path, work: Path) -> list[int]:
    """The byte offset of every partition in the disk's MBR or GPT."""
    label, volumes = disk_table(path, work)
    return [volume.offset for volume in volumes] if label else []


def is_fixed_vhd(path: Path) -> bool:
    return diskfile.is_fixed_vhd(path)


# An initramfs is one or more cpio archives (newc), each plain or compressed, one after another.
CPIO_MAGIC = b"070701"
CPIO_TRAILER = "TRAILER!!!"
_DECOMPRESSORS: dict[bytes, Callable[[], object]] = {
    b"\x1f\x8b": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    b"\xfd7zXZ": lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ),
}


def initramfs_files(data: bytes) -> list[str]:
    """The paths in an initramfs (gzip or xz archives; the early uncompressed ones too).

    PromoteError for a compression read here without a tool (zstd, lz4): say so, never guess."""
    names: list[str] = []
    while data:
        data = data.lstrip(b"\0")
        if data.startswith(CPIO_MAGIC):
            data = _cpio_names(data, names)
            continue
        if not data:
            break
        make = next((make for magic, make in _DECOMPRESSORS.items() if data.startswith(magic)), None)
        if make is None:
            raise PromoteError(f"an initramfs part racker cannot read (starts {data[:6].hex()})", hint="build it with COMPRESS=gzip or xz")
        decompressor = make()
        try:
            inner = decompressor.decompress(data)  # type: ignore[attr-defined]
        except (zlib.error, lzma.LZMAError) as error:
            raise PromoteError(f"a damaged initramfs: {error}") from None
        _cpio_names(inner, names)
        data = decompressor.unused_data  # type: ignore[attr-defined]
    return names


def _cpio_names(data: bytes, names: list[str]) -> bytes:
    """Append the names of one newc cpio archive at the start of `data`; what follows it."""
    offset = 0
    while data[offset : offset + 6] == CPIO_MAGIC:
        header = data[offset : offset + 110]
        size, name_size = int(header[54:62], 16), int(header[94:102], 16)
        name = data[offset + 110 : offset + 110 + name_size - 1].decode(errors="replace")
        offset = (offset + 110 + name_size + 3) // 4 * 4
        offset = (offset + size + 3) // 4 * 4
        if name == CPIO_TRAILER:
            return data[offset:]
        names.append(name)
    raise PromoteError("a truncated cpio archive in the initramfs")
