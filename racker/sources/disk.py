"""Disk images: a whole disk's root filesystem into the store, without a mount or device-mapper.

    file ──diskfile──▶ raw bytes (decompressed, unpacked, converted; references refused first)
         ──partitions──▶ MBR (with logical partitions) or GPT (CRCs checked), or one bare volume
         ──lvm──▶ the linear LVs of any LVM2 PVs, as byte ranges
         ──the root──▶ the x86-64 root partition of the Discoverable Partitions Specification,
                       else the first ext filesystem holding etc/os-release or usr/lib/os-release
         ──ext──▶ its files (debugfs), then /usr and /boot where the root's fstab puts them
         ──mounted──▶ XFS, which debugfs cannot read: a read-only mount on an offset loop device, always undone

The image's own kernel and initramfs come along with /boot. Other filesystems are
not read: a root on one is one clear error.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from racker import progress
from racker.errors import BadDisk
from racker.sources import diskfile, ext, lvm, mounted, partitions
from racker.sources.partitions import Filesystem, Volume
from racker.store import imagetree

MERGED = ("usr", "boot")  # mount points a root's fstab may put on filesystems of their own
OS_RELEASE = ["/etc/os-release", "/usr/lib/os-release"]


@dataclass(frozen=True)
class Found:
    volume: Volume
    fs: Filesystem
    lv: tuple[str, str] | None = None  # (vg, lv) of a logical volume


def unpack(path: Path, rootfs: Path, *, name: str) -> dict:
    """The root filesystem of the disk image at `path` into the new directory `rootfs`; manifest fields."""
    work = rootfs.parent / "disk"
    work.mkdir()
    raw, fields = diskfile.to_raw(path, work, name)
    fd = os.open(raw, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        label, found, unreadable = volumes(fd, size)
        root = find_root(raw, found, work, name, unreadable)
        rootfs.mkdir()
        _copy(raw, fd, root, rootfs, work, f"{name}: {root.volume.name}")
        merged = merge_mounts(raw, fd, rootfs, root, found, work, name)
    finally:
        os.close(fd)
    fields.update(table=label or "none", root=root.volume.name, merged=merged)
    return {"disk": fields}


def volumes(fd: int, size: int) -> tuple[str, list[Found], list[str]]:
    """(the table's kind, every volume with what it holds, why the LVs that cannot be read cannot)."""
    read = partitions.fd_reader(fd)
    label, parts = partitions.table(read, size)
    found: list[Found] = []
    pvs: list[Volume] = []
    for volume in parts:
        fs = partitions.probe(read, volume.offset)
        if fs.kind == "lvm2":
            pvs.append(volume)
        else:
            found.append(Found(volume, fs))
    unreadable = []
    if pvs:
        for lv in lvm.logical_volumes(fd, pvs):
            if lv.volume is None:
                unreadable.append(lv.why_not)
            else:
                found.append(Found(lv.volume, partitions.probe(read, lv.volume.offset), (lv.vg, lv.name)))
    return label, found, unreadable


def find_root(raw: Path, found: list[Found], work: Path, name: str, unreadable: list[str]) -> Found:
    """The x86-64 root partition by its GPT type, else the first ext filesystem with an os-release."""
    for item in found:
        if item.volume.type == partitions.GPT_ROOT_X86_64:
            if item.fs.kind not in READABLE:
                holds = item.fs.kind or "no known filesystem"
                raise BadDisk(f"{name}: the root partition ({item.volume.name}) holds {holds}: {_readable_kinds()}")
            return item
    others = []
    for item in found:
        if item.fs.kind not in READABLE:
            if item.fs.kind not in ("", "swap", "vfat"):
                others.append(f"{item.volume.name} ({item.fs.kind})")
            continue
        if _has_os_release(raw, item, work, name):
            return item
    said = f" ({'; '.join(unreadable)})" if unreadable else ""
    if others:
        said += f"; not read: {', '.join(others)}: {_readable_kinds()}"
    raise BadDisk(f"{name} holds no Linux root filesystem: no partition has etc/os-release or usr/lib/os-release{said}")


def _readable_kinds() -> str:
    return "racker reads ext2/3/4 and XFS filesystems only"


def merge_mounts(raw: Path, fd: int, rootfs: Path, root: Found, found: list[Found], work: Path, name: str) -> list[str]:
    """/usr and /boot from the filesystems the root's fstab names for them, in their places."""
    with imagetree.refused(BadDisk, f"{name}: cannot merge /usr or /boot into the root"):
        return _merge_mounts(raw, fd, rootfs, root, found, work, name)


def _merge_mounts(raw: Path, fd: int, rootfs: Path, root: Found, found: list[Found], work: Path, name: str) -> list[str]:
    tree = imagetree.Tree(rootfs)  # the disk's links resolve inside it, never on the host
    if tree.is_symlink("etc/fstab") or not tree.is_file("etc/fstab"):
        return []
    merged = []
    for spec, mount_point in fstab_entries(tree.read_text("etc/fstab", errors="replace")):
        rel = mount_point.strip("/")
        if rel not in MERGED:
            continue
        item = resolve(spec, found)
        if item is None:
            raise BadDisk(f"{name}: the root's fstab mounts {mount_point} from {spec}, which is not on this disk")
        if item is root:
            continue
        if item.fs.kind not in READABLE:
            progress.warn(f"{name}: {mount_point} is on {item.fs.kind or 'an unknown filesystem'} ({item.volume.name}): not read")
            continue
        if "/" in rel or tree.is_symlink(rel) or (tree.exists(rel) and not tree.is_dir(rel)):
            raise BadDisk(f"{name}: the root's /{rel} is not a directory, so {mount_point} cannot be put there")
        tree.mkdir(rel, 0o755)
        _copy(raw, fd, item, rootfs / rel, work, f"{name}: {item.volume.name} ({mount_point})", at=f"{rel}/")
        merged.append(mount_point)
    if merged:
        _comment_out(tree, merged)
    return merged


def _comment_out(tree: imagetree.Tree, mount_points: list[str]) -> None:
    """The fstab lines of what is now part of the root become comments: left in, a remount of a
    /usr that is no mount point fails the boot (systemd-remount-fs)."""
    lines = []
    for line in tree.read_text("etc/fstab", errors="replace").splitlines(keepends=True):
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and _unescape(fields[1]) in mount_points:
            line = f"# racker: merged into the root filesystem: {line}"
        lines.append(line)
    old = tree.lstat("etc/fstab")
    tree.write_text("etc/fstab", "".join(lines), stat.S_IMODE(old.st_mode))  # its mode and owner stay
    tree.chown("etc/fstab", old.st_uid, old.st_gid)


def fstab_entries(text: str) -> list[tuple[str, str]]:
    """(device, mount point) of each fstab line, octal escapes (\\040) decoded."""
    entries = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2:
            entries.append((_unescape(fields[0]), _unescape(fields[1])))
    return entries


def _unescape(text: str) -> str:
    return text.encode().decode("unicode_escape") if "\\" in text else text


# fstab's device syntax: (prefix, what of a volume it names)
_BY = {
    "UUID=": lambda f: f.fs.uuid.lower(),
    "LABEL=": lambda f: f.fs.label,
    "PARTUUID=": lambda f: f.volume.partuuid.lower(),
    "PARTLABEL=": lambda f: f.volume.partlabel,
    "/dev/disk/by-uuid/": lambda f: f.fs.uuid.lower(),
    "/dev/disk/by-label/": lambda f: f.fs.label,
    "/dev/disk/by-partuuid/": lambda f: f.volume.partuuid.lower(),
    "/dev/disk/by-partlabel/": lambda f: f.volume.partlabel,
}
_DISKS = ("/dev/sda", "/dev/vda", "/dev/xvda", "/dev/hda", "/dev/nvme0n1p", "/dev/mmcblk0p")


def resolve(spec: str, found: list[Found]) -> Found | None:
    """The volume an fstab device names: by UUID, label, PARTUUID, partition label, LV path or partition device."""
    for prefix, key in _BY.items():
        if spec.startswith(prefix):
            wanted = spec[len(prefix) :]
            wanted = wanted.lower() if "UUID" in prefix.upper() else wanted
            return next((f for f in found if wanted and key(f) == wanted), None)
    for item in found:
        if item.lv is not None:
            vg, lv = item.lv
            if spec in (f"/dev/{vg}/{lv}", f"/dev/mapper/{vg.replace('-', '--')}-{lv.replace('-', '--')}"):
                return item
    for disk in _DISKS:
        number = spec.removeprefix(disk)
        if number != spec and number.isdigit():
            return next((f for f in found if f.lv is None and f.volume.number == int(number)), None)
    return None


def _ext_has(raw: Path, offset: int, size: int, work: Path, name: str) -> bool:
    return any(ext.exists(ext.device(raw, offset), OS_RELEASE, work))


def _ext_copy(raw: Path, offset: int, size: int, target: Path, work: Path, name: str, at: str) -> None:
    ext.extract_tree(ext.device(raw, offset), target, work, name, at=at)


def _mounted_has(kind: str):  # type: ignore[no-untyped-def]
    def has(raw: Path, offset: int, size: int, work: Path, name: str) -> bool:
        return any(mounted.exists(raw, offset, size, kind, OS_RELEASE, work, name))

    return has


def _mounted_copy(kind: str):  # type: ignore[no-untyped-def]
    def copy(raw: Path, offset: int, size: int, target: Path, work: Path, name: str, at: str) -> None:
        mounted.copy_tree(raw, offset, size, kind, target, work, name)

    return copy


# filesystem kind: (whether it holds an os-release, copy its files); ext without a mount, others mounted
READERS = {
    "ext4": (_ext_has, _ext_copy),
    **{kind: (_mounted_has(kind), _mounted_copy(kind)) for kind in mounted.OPTIONS},
}
READABLE = tuple(READERS)


def _has_os_release(raw: Path, item: Found, work: Path, name: str) -> bool:
    with _readable(raw, -1, item.volume, work) as (path, offset, size):
        return READERS[item.fs.kind][0](path, offset, size, work, f"{name}: {item.volume.name}")


def _copy(raw: Path, fd: int, item: Found, target: Path, work: Path, name: str, at: str = "") -> None:
    with _readable(raw, fd, item.volume, work) as (path, offset, size):
        READERS[item.fs.kind][1](path, offset, size, target, work, name, at)


@contextlib.contextmanager
def _readable(raw: Path, fd: int, volume: Volume, work: Path) -> Iterator[tuple[Path, int, int]]:
    """(file, offset, size) of a volume: the disk at an offset, or an LV of several pieces put together."""
    if not volume.ranges:
        yield raw, volume.offset, volume.size
        return
    joined = work / "lv.img"
    source = fd if fd >= 0 else os.open(raw, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with open(joined, "xb") as out:
            for offset, length in volume.ranges:
                _copy_range(source, out.fileno(), offset, length)
        yield joined, 0, volume.size
    finally:
        if source != fd:
            os.close(source)
        joined.unlink(missing_ok=True)


def _copy_range(source: int, target: int, offset: int, length: int) -> None:
    """`length` bytes of `source` from `offset` appended to `target` (reflinked or copied in the kernel)."""
    done = 0
    while done < length:
        copied = os.copy_file_range(source, target, length - done, offset + done)
        if copied == 0:
            raise BadDisk(f"the disk ends inside a logical volume at byte {offset + done}: truncated")
        done += copied
