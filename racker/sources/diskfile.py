"""A disk image file of any format, compressed or as GCE ships it, made into raw bytes racker can read.

.xz/.gz/.zst ──decompress (sparse)──▶ the image inside; a tar (GCE) ──▶ its disk.raw (sparse)
format told by its own magic (never by qemu-img's probing: a raw disk that starts with
another format's header must stay raw), then checked BEFORE qemu-img opens it:
    qcow2 with a backing file or an external data file, a vmdk whose descriptor names extents
    outside its own directory: refused (a known way to make a tool read host files);
    then `qemu-img info -f FMT` must name no other file either
raw ──▶ read where it is;  others ──qemu-img convert -f FMT -O raw (sparse)──▶ the workdir
"""

from __future__ import annotations

import json
import os
import re
import struct
import tarfile
from pathlib import Path
from typing import IO

from racker import proc, progress
from racker.errors import BadArchive, BadDisk, ToolFailed
from racker.sources import compression, partitions

CHUNK = 1 << 20
GCE_NAMES = ("disk.raw", "./disk.raw")
IN_PROCESS = ("gzip", "bzip2")  # compressions tarfile reads itself
# format: (offset, magic) of its header
MAGICS: dict[str, tuple[int, bytes]] = {
    "qcow2": (0, b"QFI\xfb"),
    "vmdk": (0, b"KDMV"),
    "vmdk-descriptor": (0, b"# Disk DescriptorFile"),
    "vhdx": (0, b"vhdxfile"),
    "vdi": (64, b"\x7f\x10\xda\xbe"),
    "vpc": (0, b"conectix"),  # a dynamic VHD; a fixed one has its footer at the end only
}
QEMU_FORMATS = {"vmdk-descriptor": "vmdk"}
FORMAT_NAMES = {"vpc": "vhd"}  # what racker calls qemu's formats
EXTENT = re.compile(r'^\s*(?:RW|RDONLY|NOACCESS)\s+\d+\s+\w+\s+"([^"]*)"', re.MULTILINE)


SECTOR = 512
VHD_COOKIE = b"conectix"
VHD_FIXED = 2  # the footer's disk type; 3 is dynamic, 4 differencing


def is_fixed_vhd(path: Path) -> bool:
    """A fixed VHD: the raw disk and a 512-byte footer, with no header that qemu-img probes
    (it takes one for raw); `-f vpc` reads it as Azure and Hyper-V do."""
    try:
        with open(path, "rb") as handle:
            handle.seek(-SECTOR, os.SEEK_END)
            footer = handle.read(SECTOR)
    except OSError:
        return False
    return footer[:8] == VHD_COOKIE and struct.unpack_from(">I", footer, 60)[0] == VHD_FIXED


def qemu_img_info(path: Path) -> dict:
    """`qemu-img info` of a disk, a fixed VHD read as one."""
    forced = ["-f", "vpc"] if is_fixed_vhd(path) else []
    return json.loads(proc.run(["qemu-img", "info", "--force-share", "--output=json", *forced, str(path)], timeout=120).stdout)


def disk_reader(path: Path, fmt: str, scratch: Path) -> partitions.Reader:
    """The disk's bytes as a guest sees them, read straight from a raw file, else with qemu-img dd."""

    def read(offset: int, length: int) -> bytes:
        if fmt == "raw":
            with open(path, "rb") as handle:
                handle.seek(offset)
                return handle.read(length)
        first, end = offset // SECTOR, -(-(offset + length) // SECTOR)  # whole sectors around the range
        out = scratch / f"read-{offset}-{length}.raw"
        out.unlink(missing_ok=True)
        try:
            proc.run(
                ["qemu-img", "dd", "-f", fmt, "-O", "raw", f"bs={SECTOR}", f"skip={first}", f"count={end - first}", f"if={path}",
                 f"of={out}"],
                timeout=600,
            )  # fmt: skip
            skip = offset - first * SECTOR
            return out.read_bytes()[skip : skip + length]
        finally:
            out.unlink(missing_ok=True)

    return read


def image_format(head: bytes, path: Path | None = None) -> str | None:
    """qemu-img's name for a disk image format from its first bytes (and a fixed VHD's footer), or None."""
    for name, (offset, magic) in MAGICS.items():
        if head[offset : offset + len(magic)] == magic:
            return name
    if path is not None and path.stat().st_size >= 1024:
        with open(path, "rb") as handle:
            handle.seek(-512, os.SEEK_END)
            if handle.read(8) == b"conectix":
                return "vpc"
    return None


def looks_raw(head: bytes) -> bool:
    """A partition table, an ext or XFS filesystem or an LVM label at the start: a raw disk."""
    return (
        head[510:512] == b"\x55\xaa"
        or head[1080:1082] == b"\x53\xef"
        or head[:4] == b"XFSB"
        or any(head[s * 512 : s * 512 + 8] == b"LABELONE" for s in range(4))
    )


def is_gce_tar(head: bytes) -> bool:
    return head[compression.TAR_MAGIC_OFFSET : compression.TAR_MAGIC_OFFSET + 5] == b"ustar" and (
        head[:100].split(b"\0", 1)[0].decode("utf-8", "replace") in GCE_NAMES
    )


def is_disk(path: Path) -> bool:
    """Whether the file (after decompression) is a disk image rather than a tarball."""
    head = compression.head(path, 4096)
    return is_gce_tar(head) or image_format(head) is not None or looks_raw(head) or image_format(b"", path) is not None


def to_raw(path: Path, work: Path, name: str) -> tuple[Path, dict]:
    """The raw disk in `path` (the file itself where it is raw), and what it was: manifest fields."""
    fields: dict = {}
    kind = compression.detect_file(path)
    if kind not in (None, "tar"):
        fields["compression"] = kind
        if kind in IN_PROCESS and is_gce_tar(compression.head(path, 512)):
            kind = "tar"  # tarfile reads it compressed: the tar is never written out
        else:
            path = _decompress(path, kind, work / "disk.decompressed", name)
            kind = compression.detect_file(path)
    if kind == "tar":
        fields["packed"] = "tar (GCE)"
        path = _gce_disk(path, work / "disk.unpacked", name)
    with open(path, "rb") as handle:
        head = handle.read(4096)
    fmt = image_format(head, path)
    if fmt is None:
        if not looks_raw(head):
            raise BadDisk(f"{name} is not a disk image racker reads (raw, qcow2, vmdk, vhd, vhdx, vdi) nor a tarball")
        fields["format"] = "raw"
        return path, fields
    qemu_format = QEMU_FORMATS.get(fmt, fmt)
    fields["format"] = FORMAT_NAMES.get(qemu_format, qemu_format)
    refuse_references(path, fmt, head, name)
    check_whole(path, qemu_format, fields["format"], name)
    raw = work / "disk.raw"
    with progress.step(f"converting {name} from {fields['format']} to raw"):
        try:
            proc.run(["qemu-img", "convert", "-f", qemu_format, "-O", "raw", "-W", str(path), str(raw)], timeout=3600)
        except ToolFailed as failed:
            raise BadDisk(f"{name} is not a readable {fields['format']} image: {_reason(failed)}") from None
    return raw, fields


def refuse_references(path: Path, fmt: str, head: bytes, name: str) -> None:
    """BadDisk for an image that names other files: read from its header first, then from qemu-img info."""
    if fmt == "qcow2":
        backing_offset = struct.unpack_from(">Q", head, 8)[0]
        version = struct.unpack_from(">I", head, 4)[0]
        incompatible = struct.unpack_from(">Q", head, 72)[0] if version >= 3 else 0
        if backing_offset:
            raise BadDisk(f"{name} is a qcow2 with a backing file: refused (racker reads self-contained images only)")
        if incompatible & 4:
            raise BadDisk(f"{name} is a qcow2 with an external data file: refused (racker reads self-contained images only)")
    if fmt in ("vmdk", "vmdk-descriptor"):
        _check_extents(path, fmt, head, name)
    qemu_format = QEMU_FORMATS.get(fmt, fmt)
    try:
        info = json.loads(proc.run(["qemu-img", "info", "-f", qemu_format, "--output=json", str(path)], timeout=120).stdout)
    except ToolFailed as failed:
        raise BadDisk(f"{name} is not a readable {FORMAT_NAMES.get(qemu_format, qemu_format)} image: {_reason(failed)}") from None
    data = info.get("format-specific", {}).get("data", {})
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise BadDisk(f"{name} has a backing file: refused (racker reads self-contained images only)")
    if data.get("data-file"):
        raise BadDisk(f"{name} has an external data file: refused (racker reads self-contained images only)")
    for extent in data.get("extents", []):
        other = Path(extent.get("filename", ""))
        if other.parent.resolve() != path.parent.resolve():
            raise BadDisk(f"{name} names an extent outside its own directory ({other}): refused")


def check_whole(path: Path, qemu_format: str, fmt: str, name: str) -> None:
    """BadDisk for a truncated or corrupt image: `qemu-img convert` reads what a truncated qcow2
    lacks as zeros, and the disk would look merely empty. 3 (leaks) and 63 (no check) are fine."""
    checked = proc.run(["qemu-img", "check", "-f", qemu_format, str(path)], timeout=600, check=False)
    if checked.returncode in (1, 2):
        said = [line for line in (checked.stderr + checked.stdout).splitlines() if line.strip()]
        reason = said[0].removeprefix("qemu-img: ") if said else f"qemu-img check exit status {checked.returncode}"
        raise BadDisk(f"{name} is a truncated or corrupt {fmt} image: {reason}")


def _check_extents(path: Path, fmt: str, head: bytes, name: str) -> None:
    """A vmdk's extents must be files beside it; read from its descriptor before qemu-img opens any."""
    if fmt == "vmdk-descriptor":
        with open(path, "rb") as handle:
            text = handle.read(64 << 10).decode("utf-8", "replace")
    else:
        capacity, _grain, offset, size = struct.unpack_from("<QQQQ", head, 12)
        if capacity:  # a sparse extent with a disk of its own: qemu reads no other file
            return
        with open(path, "rb") as handle:
            handle.seek(offset * 512)
            text = handle.read(min(size * 512, 64 << 10)).decode("utf-8", "replace")
    for extent in EXTENT.findall(text):
        if "/" in extent or extent in ("", ".", ".."):
            raise BadDisk(f"{name} is a vmdk whose descriptor names an extent outside its own directory ({extent}): refused")
        beside = path.parent / extent
        if beside.is_symlink() or not beside.is_file():
            raise BadDisk(f"{name} is a vmdk whose extent {extent} is not a file beside it")


def _reason(failed: ToolFailed) -> str:
    lines = failed.stderr.strip().splitlines()
    return lines[-1].removeprefix("qemu-img: ") if lines else f"exit status {failed.returncode}"


def _decompress(path: Path, kind: str, out: Path, name: str) -> Path:
    with progress.step(f"decompressing {name}"), compression.decompressed(path, name=name) as (_kind, stream):
        _write_sparse(stream, out)
    return out


def _gce_disk(path: Path, out: Path, name: str) -> Path:
    """GCE's tar's disk.raw: its first member, a regular file (a link could name a host file)."""
    try:
        with progress.step(f"unpacking the disk of {name}"), tarfile.open(path, "r:*") as archive:
            member = archive.next()
            if member is None or member.name not in GCE_NAMES or not member.isreg():
                raise BadDisk(f"{name} is a tar whose first member is not a disk.raw file")
            source = archive.extractfile(member)
            assert source is not None
            _write_sparse(source, out)
    except (tarfile.TarError, EOFError) as error:
        raise BadArchive(f"{name} is not a readable tar archive: {error}") from None
    return out


def _write_sparse(stream: IO[bytes], out: Path) -> None:
    """Copy a stream into a new file, leaving holes where whole chunks are zero."""
    zero = bytes(CHUNK)
    with open(out, "xb") as handle:
        while chunk := stream.read(CHUNK):
            if chunk == zero[: len(chunk)]:
                handle.seek(len(chunk), os.SEEK_CUR)
            else:
                handle.write(chunk)
        handle.truncate()
