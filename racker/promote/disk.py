"""A partitioned raw disk built in a plain file: no loop device, no mount, no root needed.

The partition table is written by sfdisk on the file, the ESP by mkfs.vfat at
its offset, the root filesystem by `mkfs.ext4 -d` at its offset, populated
straight from the image's tree in the store; the few files promote adds or
replaces (an overlay directory) are then written into it by debugfs.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from racker import proc, sizes
from racker.errors import PromoteError
from racker.store import imagetree

SECTOR = 512
MiB = 1024 * 1024
ALIGN = MiB  # partitions start on 1 MiB boundaries (the gap before holds GRUB's core.img)
ESP_SIZE = 64 * MiB
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPE_GPT = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # Linux root (x86-64), discoverable partitions spec
ROOT_TYPE_DOS = "83"
GPT_TRAILER = 34 * SECTOR  # backup GPT header and entries at the end of the disk

# New e2fsprogs features that older kernels, e2fsck and GRUB (before 2.12) cannot read.
EXT4_FEATURES = "^orphan_file,^metadata_csum_seed"


def parse_size(text: str) -> int:
    """'4G', '512M', '2.5G', '1073741824' -> bytes (binary units)."""
    try:
        return sizes.parse(text)
    except ValueError:
        raise PromoteError(f"cannot read disk size {text!r}", hint="use a number with a unit, e.g. 4G or 512M") from None


def min_root_size(tree_bytes: int) -> int:
    """The smallest ext4 that holds a tree: data, inode tables, journal, and some room."""
    return int(tree_bytes * 1.12) + 128 * MiB


@dataclass(frozen=True)
class Layout:
    """Where each partition sits in the disk file, in bytes."""

    firmware: str  # "bios" or "uefi"
    size: int
    root_offset: int
    root_size: int
    esp_offset: int = 0
    esp_size: int = 0
    root_uuid: str = ""
    esp_uuid: str = ""  # FAT volume id, as XXXX-XXXX
    # What would otherwise be chance or the clock, fixed so that one image makes one disk, byte for byte:
    disk_id: str = ""  # the partition table's id: a GUID (gpt) or 0xXXXXXXXX (dos)
    partition_uuids: tuple[str, ...] = ()  # gpt: the ESP's then root's
    hash_seed: str = ""  # ext4's directory hash seed
    epoch: int | None = None  # SOURCE_DATE_EPOCH: every time mkfs and debugfs write

    @property
    def label(self) -> str:
        return "gpt" if self.firmware == "uefi" else "dos"

    def sfdisk_script(self) -> str:
        lines = [f"label: {self.label}", "unit: sectors"]
        if self.disk_id:
            lines.append(f"label-id: {self.disk_id}")
        if self.firmware == "uefi":
            esp, root = (f", uuid={u}" for u in self.partition_uuids) if self.partition_uuids else ("", "")
            lines.append(f'start={self.esp_offset // SECTOR}, size={self.esp_size // SECTOR}, type={ESP_TYPE}, name="esp"{esp}')
            lines.append(f'start={self.root_offset // SECTOR}, size={self.root_size // SECTOR}, type={ROOT_TYPE_GPT}, name="root"{root}')
        else:
            lines.append(f"start={self.root_offset // SECTOR}, size={self.root_size // SECTOR}, type={ROOT_TYPE_DOS}, bootable")
        return "\n".join(lines) + "\n"


def plan(firmware: str, size: int, tree_bytes: int, seed: str = "", epoch: int | None = None) -> Layout:
    """Partition a disk of `size` bytes; PromoteError if the tree cannot fit.

    `seed` (the image's digest): its ids are derived from it, not drawn at random, and `epoch`
    is its SOURCE_DATE_EPOCH, so that two promotes of one image make the same bytes. An image's
    disks then share their filesystem UUID, as every instance of a distribution's cloud image does.
    """
    if firmware not in ("bios", "uefi"):
        raise PromoteError(f"unknown firmware {firmware!r}: bios or uefi")
    size = size // ALIGN * ALIGN
    start = ALIGN
    esp_offset = esp_size = 0
    if firmware == "uefi":
        esp_offset, esp_size = start, ESP_SIZE
        start += ESP_SIZE
    end = size - (GPT_TRAILER if firmware == "uefi" else 0)
    root_size = (end - start) // ALIGN * ALIGN
    needed = min_root_size(tree_bytes)
    if root_size < needed:
        overhead = size - root_size
        raise PromoteError(
            f"a {sizes.human(size)} disk is too small: the root filesystem needs {sizes.human(needed)}"
            f" for {sizes.human(tree_bytes)} of files",
            hint=f"use --size {(needed + overhead) // MiB + 1}M or more",
        )
    ids = _Ids(seed)
    volume = ids.uuid("esp volume").hex[:8].upper()
    return Layout(
        firmware=firmware,
        size=size,
        root_offset=start,
        root_size=root_size,
        esp_offset=esp_offset,
        esp_size=esp_size,
        root_uuid=str(ids.uuid("root")),
        esp_uuid=f"{volume[:4]}-{volume[4:]}",
        disk_id=str(ids.uuid("gpt")).upper() if firmware == "uefi" else f"0x{ids.uuid('dos').hex[:8]}",
        partition_uuids=(str(ids.uuid("esp partition")).upper(), str(ids.uuid("root partition")).upper()) if firmware == "uefi" else (),
        hash_seed=str(ids.uuid("ext4 hash seed")),
        epoch=epoch,
    )


@dataclass(frozen=True)
class _Ids:
    """UUIDs named after `seed` and what they are for (uuid5), or random without a seed."""

    seed: str

    def uuid(self, what: str) -> uuid.UUID:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"racker-disk:{self.seed}:{what}") if self.seed else uuid.uuid4()


def create(path: Path, layout: Layout) -> None:
    """A sparse file with the partition table written into it."""
    with open(path, "wb") as handle:
        handle.truncate(layout.size)
    proc.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)], input=layout.sfdisk_script().encode())
    written = partitions(path)
    expected = [layout.root_offset] if layout.firmware == "bios" else [layout.esp_offset, layout.root_offset]
    if [p["start"] * SECTOR for p in written] != expected:
        raise PromoteError(f"sfdisk did not write the partitions asked for: {written}")


def partitions(path: Path) -> list[dict]:
    table = json.loads(proc.run(["sfdisk", "--json", str(path)]).stdout)["partitiontable"]
    return table.get("partitions", [])


def _fake_time(layout: Layout) -> dict[str, str] | None:
    """Reproducible timestamps: mkfs and debugfs read E2FSPROGS_FAKE_TIME, mkfs.vfat and mtools
    SOURCE_DATE_EPOCH (the layout's, else the user's)."""
    epoch = str(layout.epoch) if layout.epoch is not None else os.environ.get("SOURCE_DATE_EPOCH")
    return {"E2FSPROGS_FAKE_TIME": epoch, "SOURCE_DATE_EPOCH": epoch} if epoch else None


def make_root(path: Path, layout: Layout, tree: Path, overlay: Path | None = None) -> None:
    """An ext4 filesystem at the root partition's offset, populated from `tree`, then `overlay` over it.

    The file is new and sparse, so its blocks read as zeros already:
    assume_storage_prezeroed skips writing zeros into the inode tables and
    the journal (and still marks the tables initialised, so the guest's
    kernel has no lazy zeroing to do at first mount).
    """
    blocks = layout.root_size // 4096
    proc.run(
        [
            "mkfs.ext4",
            "-F",
            "-q",
            "-b",
            "4096",
            "-L",
            "root",
            "-U",
            layout.root_uuid,
            "-O",
            EXT4_FEATURES,
            "-E",
            f"offset={layout.root_offset},lazy_itable_init=0,nodiscard,assume_storage_prezeroed=1"
            + (f",hash_seed={layout.hash_seed}" if layout.hash_seed else ""),
            "-d",
            str(tree),
            str(path),
            str(blocks),
        ],
        env=_fake_time(layout),
        timeout=1200,
    )
    if layout.epoch is not None:
        settle_times(path, layout, tree)
    if overlay is not None:
        write_overlay(path, layout, overlay, tree)


def settle_times(path: Path, layout: Layout, tree: Path) -> None:
    """Every inode's ctime and atime at the layout's epoch: mkfs.ext4 -d copies them from the tree's
    files in the store, where no one can set a ctime and every read may move an atime (the mtimes
    it copies are the image's own, clamped at build)."""
    lines = []
    for directory, dirs, files in os.walk(tree):
        inside = Path(directory).relative_to(tree)
        rel = "" if inside == Path() else "/" + inside.as_posix()
        for name in ("", *dirs, *files):
            target = f"{rel}/{name}" if name else rel or "/"
            if '"' in target or "\n" in target:
                continue  # no way to name it to debugfs (a backslash is read as itself): it keeps the store's times
            lines += [f'sif "{target}" ctime @{layout.epoch}', f'sif "{target}" atime @{layout.epoch}']
    script = ("\n".join(lines) + "\n").encode()
    proc.run(["debugfs", "-w", "-f", "-", f"{path}?offset={layout.root_offset}"], input=script, env=_fake_time(layout), timeout=1200)


# debugfs goes on after a failed command and exits 0: its stderr is read instead.
# These two are expected: `rm` of a file the image does not have, `mkdir` of a
# directory it has (or a symlink to one, which `cd` then follows, inside the image).
_DEBUGFS_EXPECTED = ("File not found by ext2_lookup", "directory already exists", "Allocated inode", "debugfs 1.")


def debugfs_script(overlay: Path, tree: Path) -> str:
    """debugfs commands that put each file, symlink and directory of `overlay` into the
    filesystem at the same path, replacing what is there (a new inode: never written through),
    with the overlay's owners and modes; a directory `tree` (the image) has already keeps its own."""
    lines = []
    for directory, dirs, files in os.walk(overlay):
        for name in [d for d in dirs if Path(directory, d).is_symlink()]:
            dirs.remove(name)  # a link, whatever it points to on this host
            files.append(name)
        dirs.sort()
        rel = "/" + Path(directory).relative_to(overlay).as_posix().strip(".")
        for name in (rel, *dirs, *files):
            if '"' in name or "\n" in name:
                raise PromoteError(f"cannot write {name!r} into the disk: a quote or newline in its name")
        if rel != "/":
            # In its parent: debugfs looks a top-level "/NAME"'s empty parent up from the current directory.
            parent, name = rel.rsplit("/", 1)
            lines += [f'cd "{parent}/."', f'mkdir "{name}"']
            if not imagetree.Tree(tree).exists(rel):
                lines += _owner_and_mode(f'"{rel}"', Path(directory).lstat(), stat.S_IFDIR)
        lines.append(f'cd "{rel.rstrip("/")}/."')  # "/.": a symlink to a directory is followed, as the kernel would
        for name in sorted(files):
            source = Path(directory, name)
            info = source.lstat()
            lines.append(f'rm "{name}"')
            if stat.S_ISLNK(info.st_mode):
                lines.append(f'symlink "{name}" "{os.readlink(source)}"')
            else:
                lines.append(f'write "{source}" "{name}"')
                lines += _owner_and_mode(f'"{name}"', info, stat.S_IFREG)
    return "\n".join(lines) + "\n"


def _owner_and_mode(name: str, info: os.stat_result, kind: int) -> list[str]:
    return [f"sif {name} mode 0{kind | stat.S_IMODE(info.st_mode):o}", f"sif {name} uid {info.st_uid}", f"sif {name} gid {info.st_gid}"]


def write_overlay(path: Path, layout: Layout, overlay: Path, tree: Path) -> None:
    script = overlay.parent / f"{overlay.name}.debugfs"
    script.write_text(debugfs_script(overlay, tree))
    argv = ["debugfs", "-w", "-f", str(script), f"{path}?offset={layout.root_offset}"]
    result = proc.run(argv, env=_fake_time(layout), timeout=600)
    failed = [line for line in result.stderr.splitlines() if line.strip() and not any(e in line for e in _DEBUGFS_EXPECTED)]
    if failed:
        raise PromoteError(f"debugfs could not write promote's files into the disk: {failed[0]}")


def make_esp(path: Path, layout: Layout) -> None:
    """A FAT32 ESP at its offset."""
    volume_id = layout.esp_uuid.replace("-", "")
    proc.run(
        [
            "mkfs.vfat",
            "-F",
            "32",
            # One sector per cluster: enough clusters for a valid FAT32 at this size.
            "-S",
            "512",
            "-s",
            "1",
            "-n",
            "ESP",
            "-i",
            volume_id,
            # The volume label's entry dated by a constant, not the clock (Debian 12's dosfstools
            # does not read SOURCE_DATE_EPOCH).
            *(["--invariant"] if layout.epoch is not None else []),
            f"--offset={layout.esp_offset // SECTOR}",
            str(path),
            str(layout.esp_size // 1024),
        ],
        env=_fake_time(layout),
    )
