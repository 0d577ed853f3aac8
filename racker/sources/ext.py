"""ext2/3/4 read without a mount: e2fsprogs' debugfs on the filesystem's byte range of a file.

    listing ──▶ every directory read with `ls -p <inode>`, one debugfs per tree level:
                names, modes, owners, sizes; a hostile tree (a '/' or a repeated name in a
                directory, a directory reached twice) and one past the size limit are refused here,
                before a byte is written
    rdump ──▶ the tree, files and symlinks written by debugfs (it writes nothing else)
    fix up ──▶ what rdump leaves out, from the listing: set-uid/set-gid/sticky bits (under the
               extractor's rules), symlink owners, hard links, file capabilities (`ea_get`)

Device nodes, FIFOs and sockets are skipped, as the extractor skips them.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from racker import proc, progress, sizes
from racker.errors import BadArchive, BadDisk
from racker.sources import extract

ROOT_INODE = 2
BATCH = 4000  # debugfs requests per run


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the filesystem's root
    inode: int
    mode: int
    uid: int
    gid: int
    size: int


def device(image: Path, offset: int) -> str:
    """debugfs's name for the filesystem at `offset` of `image` (the unix io manager's offset= option)."""
    if "?" in str(image):
        raise BadDisk(f"{image}: a disk path with '?' in it cannot be read by debugfs")
    return f"{image}?offset={offset}" if offset else str(image)


def debugfs(fs: str, requests: list[str], work: Path, timeout: float = 600) -> list[tuple[str, str]]:
    """(request, its output) for each request, run read-only in one debugfs (catastrophic mode:
    no bitmaps are read, nothing is needed from them)."""
    script = work / "debugfs.requests"
    script.write_text("".join(f"{r}\n" for r in requests))
    try:
        result = proc.run(["debugfs", "-c", "-f", str(script), fs], timeout=timeout, check=False)
    finally:
        script.unlink()
    if result.failed or ("debugfs: " not in result.stdout and requests):
        reason = result.stderr.strip().splitlines()
        raise BadDisk(f"the ext filesystem cannot be read: {reason[-1] if reason else 'debugfs failed'}")
    answers = []
    for chunk in result.stdout.split("debugfs: ")[1:]:
        request, _, output = chunk.partition("\n")
        answers.append((request, output))
    return answers


def read_file(fs: str, path: str, work: Path) -> bytes | None:
    """A small file of the filesystem (not following a final symlink), or None if it is not a regular file there."""
    out = work / "debugfs.file"
    out.unlink(missing_ok=True)
    try:
        answers = debugfs(fs, [f'dump "{path}" {out}'], work, timeout=60)
        if "File not found" in answers[0][1] or not out.is_file():
            return None
        return out.read_bytes()
    finally:
        out.unlink(missing_ok=True)


def exists(fs: str, paths: list[str], work: Path) -> list[bool]:
    """Whether each path is in the filesystem (as anything: a symlink counts)."""
    answers = debugfs(fs, [f'stat "{p}"' for p in paths], work, timeout=60)
    return ["File not found" not in output and "Inode:" in output for _request, output in answers]


def listing(fs: str, work: Path, name: str) -> list[Entry]:
    """Every entry of the tree, breadth first; BadDisk where the tree is hostile or too large."""
    entries: list[Entry] = []
    seen_dirs = {ROOT_INODE}
    level = [(ROOT_INODE, "")]
    limit, total = extract.size_limit(), 0
    while level:
        following: list[tuple[int, str]] = []
        for start in range(0, len(level), BATCH):
            batch = level[start : start + BATCH]
            answers = debugfs(fs, [f"ls -p <{inode}>" for inode, _path in batch], work)
            if len(answers) != len(batch):
                raise BadDisk(f"{name}: debugfs did not list every directory")
            for (_inode, parent), (_request, output) in zip(batch, answers, strict=True):
                names: set[str] = set()
                for line in output.splitlines():
                    if not line:
                        continue
                    entry = _entry(line, parent, name)
                    if entry is None:
                        continue
                    base = entry.path.rsplit("/", 1)[-1]
                    if base in names:
                        raise BadDisk(f"{name}: directory /{parent} holds {base!r} twice: refused as hostile")
                    names.add(base)
                    if stat.S_ISDIR(entry.mode):
                        if entry.inode in seen_dirs:
                            raise BadDisk(f"{name}: directory /{entry.path} is reached twice: refused as hostile")
                        seen_dirs.add(entry.inode)
                        following.append((entry.inode, entry.path))
                    total += extract.HEADER + (entry.size if stat.S_ISREG(entry.mode) else 0)
                    if total > limit:
                        raise BadArchive(
                            f"{name} holds more than {sizes.human(limit)} of files: refused",
                            hint="if the image really is that large, raise RACKER_EXTRACT_LIMIT (e.g. RACKER_EXTRACT_LIMIT=128G)",
                        )
                    entries.append(entry)
        level = following
    return entries


def _entry(line: str, parent: str, name: str) -> Entry | None:
    """One `ls -p` line: /INODE/MODE/UID/GID/NAME/SIZE/; None for . and .."""
    fields = line.split("/")
    if len(fields) < 8 or fields[0] or fields[-1]:
        if line.startswith("/"):
            raise BadDisk(f"{name}: an entry of /{parent} has a '/' in its name: refused as hostile")
        raise BadDisk(f"{name}: cannot read directory /{parent}: {line.strip()}")
    if len(fields) != 8:
        raise BadDisk(f"{name}: an entry of /{parent} has a '/' in its name: refused as hostile")
    _empty, inode, mode, uid, gid, base, size, _end = fields
    if base in (".", "..") or inode == "0":  # inode 0: an unused slot (lost+found has many)
        return None
    if not base or "\0" in base:
        raise BadDisk(f"{name}: an entry of /{parent} has an empty name or a NUL in it: refused as hostile")
    try:
        return Entry(f"{parent}/{base}" if parent else base, int(inode), int(mode, 8), int(uid), int(gid), int(size or 0))
    except ValueError:
        raise BadDisk(f"{name}: cannot read directory /{parent}: {line.strip()}") from None


def extract_tree(fs: str, target: Path, work: Path, name: str, *, at: str = "") -> list[Entry]:
    """The filesystem's tree into the existing directory `target` (the image's `at`, e.g. "usr/"):
    its files, as the listing says."""
    entries = listing(fs, work, name)
    with progress.step(f"copying the files of {name}"):
        answers = debugfs(fs, [f'rdump / "{target}"'], work, timeout=3600)
        failed = [line for _request, output in answers for line in output.splitlines() if line.startswith("rdump:")]
        if failed:
            raise BadDisk(f"{name}: debugfs could not copy every file ({failed[0]})")
    fix_up(fs, target, entries, work, name, at)
    return entries


def fix_up(fs: str, target: Path, entries: list[Entry], work: Path, name: str, at: str = "") -> None:
    """Give what rdump wrote the modes, owners, links and capabilities the filesystem has."""
    first_of: dict[int, str] = {}
    skipped, cleared = 0, 0
    candidates: list[Entry] = []
    for entry in entries:
        path = target / entry.path
        kind = stat.S_IFMT(entry.mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
            skipped += 1
            continue
        if kind == stat.S_IFREG:
            if entry.inode in first_of:  # rdump copies each name of a hard-linked file
                os.unlink(path)
                os.link(target / first_of[entry.inode], path)
                continue
            first_of[entry.inode] = entry.path
            if entry.mode & 0o111:
                candidates.append(entry)
        info = os.lstat(path)
        if (info.st_uid, info.st_gid) != (entry.uid, entry.gid) and os.geteuid() == 0:
            os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
        if kind == stat.S_IFLNK:
            continue
        mode = entry.mode & 0o7777
        if mode & (stat.S_ISUID | stat.S_ISGID) and kind == stat.S_IFREG and not extract.setid_allowed(at + entry.path):
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
            cleared += 1
        if stat.S_IMODE(info.st_mode) != mode:
            os.chmod(path, mode)
    _capabilities(fs, target, candidates, work)
    if skipped or cleared:
        progress.warn(f"{name}: skipped {skipped} device node(s), FIFO(s) or socket(s), cleared set-uid/set-gid on {cleared} file(s)")


def _capabilities(fs: str, target: Path, candidates: list[Entry], work: Path) -> None:
    """security.capability of every executable (where file capabilities live), read with ea_get."""
    caps = work / "caps"
    caps.mkdir()
    try:
        for start in range(0, len(candidates), BATCH):
            batch = candidates[start : start + BATCH]
            debugfs(fs, [f"ea_get -f {caps / str(e.inode)} <{e.inode}> {extract.KEPT_XATTRS[0]}" for e in batch], work)
            for entry in batch:
                found = caps / str(entry.inode)
                if found.is_file() and found.stat().st_size:  # ea_get makes an empty file where there is none
                    os.setxattr(target / entry.path, extract.KEPT_XATTRS[0], found.read_bytes(), follow_symlinks=False)
    finally:
        with contextlib.suppress(FileNotFoundError):
            for leftover in caps.iterdir():
                leftover.unlink()
            caps.rmdir()
