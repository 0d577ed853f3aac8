"""The one safe extractor: a tar stream (an image layer, an exported container, a
root tarball) unpacked into a staging root, as if that root were `/`.

- Names are normalised: a leading `/` or `./` is dropped; a `..` component is refused.
- Paths resolve the way they would inside the image: a symlink already in the
  tree is followed within the root (an absolute target starts at the root, a
  `..` stops at it), never out of it. The last component is never followed: a
  member replaces what is there.
- A hard link must name a file already inside the root.
- Device nodes and FIFOs are skipped: a container manager provides /dev.
- Set-uid and set-gid bits are kept only where distributions install such
  programs (SETID_DIRS); elsewhere they are cleared. Of extended attributes only
  file capabilities (security.capability) are kept, never overlayfs' or
  anyone else's.
- OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`), with whiteouts=True, remove from
  the tree what an earlier layer put there, and only inside the root.

- What an archive unpacks to is limited (RACKER_EXTRACT_LIMIT bytes, default
  64 GiB, counting each member's data and header): a decompression bomb stops
  at the limit with one error, before the member that would pass it is written.

- With plain=True (OVAs, Vagrant boxes): only regular files and directories (a
  box from `vagrant package` may hold an include/ directory), no absolute path,
  no link of either kind, no device node or FIFO: nothing that could lead out.

Anything else is a BadArchive naming the member, raised before it is written.
"""

from __future__ import annotations

import contextlib
import gzip
import lzma
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from racker import progress, settings, sizes, store
from racker.errors import BadArchive

# Where set-uid/set-gid programs live in the distributions racker boots.
SETID_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "usr/libexec", "usr/lib", "usr/lib64", "usr/lib32", "lib", "lib64")
KEPT_XATTRS = ("security.capability",)
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_LINK_HOPS = 40
HEADER = 512  # a tar header block: counted too, so that millions of empty members also reach the limit


def size_limit() -> int:
    """RACKER_EXTRACT_LIMIT: the most bytes one archive may unpack to (suffixes K, M, G, T)."""
    return settings.EXTRACT_LIMIT.value()


@dataclass
class Report:
    """What an extraction did besides writing members as they were."""

    members: int = 0
    skipped_devices: list[str] = field(default_factory=list)
    cleared_setid: list[str] = field(default_factory=list)
    removed: int = 0  # by whiteouts
    unpacked: int = 0  # bytes of data and headers, against the size limit


def member_parts(name: str) -> list[str]:
    """A member name as path components inside the root; BadArchive for one that climbs out."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadArchive(f"member {name!r} climbs out of the root with '..'")
    if "\0" in name:
        raise BadArchive(f"member {name!r} has a NUL in its name")
    return parts


class Root:
    """A directory being filled as if it were `/`: every path is resolved inside it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def real(self, parts: list[str]) -> Path:
        return self.path.joinpath(*parts) if parts else self.path

    def resolve_dir(self, parts: list[str], *, create: bool) -> list[str]:
        """Resolve a directory path inside the root, following symlinks within it.

        Missing directories are made when `create`; a component that is a file
        (not a directory) is a BadArchive.
        """
        resolved: list[str] = []
        pending = list(parts)
        hops = 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = self.real([*resolved, part])
            try:
                info = os.lstat(candidate)
            except FileNotFoundError:
                if not create:
                    raise BadArchive(f"{'/'.join(parts)!r} does not exist in the image") from None
                os.mkdir(candidate, 0o755)
                resolved.append(part)
                continue
            if stat.S_ISLNK(info.st_mode):
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise BadArchive(f"too many symbolic links resolving {'/'.join(parts)!r}")
                target = os.readlink(candidate)
                if target.startswith("/"):
                    resolved = []
                pending = [p for p in target.split("/") if p] + pending
                continue
            if not stat.S_ISDIR(info.st_mode):
                raise BadArchive(f"{'/'.join(parts)!r} goes through {'/'.join([*resolved, part])!r}, which is not a directory")
            resolved.append(part)
        return resolved

    def locate(self, parts: list[str], *, create: bool = True) -> tuple[list[str], str]:
        """(the resolved parent directory, the last component) of a member path."""
        if not parts:
            return [], ""
        return self.resolve_dir(parts[:-1], create=create), parts[-1]

    def clear(self, path: Path) -> None:
        """Remove what is at `path` (never following it) so that a member can take its place."""
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode):
                store.remove_tree(path)
            else:
                os.unlink(path)


def extract(stream: IO[bytes], root: Path, *, whiteouts: bool = False, plain: bool = False, name: str = "archive") -> Report:
    """Unpack the tar stream into `root` (an existing directory); BadArchive on hostile or broken input.

    Reads the stream once, front to back (a pipe from `docker export` will do).
    """
    report = Report()
    limit = size_limit()
    tree = Root(root)
    written: set[tuple[str, ...]] = set()  # by this stream: an opaque whiteout keeps these
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                report.members += 1
                report.unpacked += HEADER + (member.size if member.isreg() else 0)
                if report.unpacked > limit:
                    raise BadArchive(
                        f"{name} unpacks to more than {sizes.human(limit)}: refused as a decompression bomb",
                        hint="if the image really is that large, raise RACKER_EXTRACT_LIMIT (e.g. RACKER_EXTRACT_LIMIT=128G)",
                    )
                if plain:
                    _check_plain(member, name)
                try:
                    _extract_member(archive, member, tree, report, written, whiteouts)
                except OSError as error:
                    raise BadArchive(f"{name}: cannot unpack {member.name!r}: {error.strerror or error}") from None
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as error:
        raise BadArchive(f"{name} is not a readable tar archive: {error}") from None
    if report.skipped_devices or report.cleared_setid:  # contained, not refused: said once, everywhere
        progress.warn(
            f"{name}: skipped {len(report.skipped_devices)} device node(s), "
            f"cleared set-uid/set-gid on {len(report.cleared_setid)} file(s) outside the system directories"
        )
    return report


def _check_plain(member: tarfile.TarInfo, name: str) -> None:
    """BadArchive for a member of a VM package (an OVA, a box) that is neither a regular file nor a directory."""
    if member.name.startswith("/"):
        raise BadArchive(f"{name}: member {member.name!r} has an absolute path: refused")
    member_parts(member.name)  # no `..`
    if not (member.isreg() or member.isdir()):
        raise BadArchive(f"{name}: member {member.name!r} is not a plain file or directory: refused")


def _extract_member(
    archive: tarfile.TarFile,
    member: tarfile.TarInfo,
    tree: Root,
    report: Report,
    written: set[tuple[str, ...]],
    whiteouts: bool,
) -> None:
    parts = member_parts(member.name)
    if not parts:
        if member.isdir():
            return  # the root itself: its mode stays the staging directory's
        raise BadArchive(f"member {member.name!r} has no name")
    base = parts[-1]
    if whiteouts and base.startswith(WHITEOUT):
        _whiteout(tree, parts, report, written)
        return
    if member.ischr() or member.isblk() or member.isfifo():
        report.skipped_devices.append("/".join(parts))
        return
    parent, last = tree.locate(parts)
    target = tree.real([*parent, last])
    written.add(tuple([*parent, last]))
    if member.isdir():
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISDIR(os.lstat(target).st_mode):
                tree.clear(target)
        with contextlib.suppress(FileExistsError):
            os.mkdir(target, 0o700)
    elif member.issym():
        if not member.linkname:
            raise BadArchive(f"symbolic link {member.name!r} has an empty target")
        tree.clear(target)
        os.symlink(member.linkname, target)
    elif member.islnk():
        link_parts = member_parts(member.linkname)
        link_parent, link_last = tree.locate(link_parts, create=False)
        source = tree.real([*link_parent, link_last])
        try:
            source_info = os.lstat(source)
        except FileNotFoundError:
            raise BadArchive(f"hard link {member.name!r} points at {member.linkname!r}, which is not in the image") from None
        if stat.S_ISDIR(source_info.st_mode):
            raise BadArchive(f"hard link {member.name!r} points at a directory")
        if source != target:
            tree.clear(target)
            os.link(source, target, follow_symlinks=False)
        return  # a hard link shares its source's mode, owner and times
    elif member.isreg():
        tree.clear(target)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            source = archive.extractfile(member)
            assert source is not None
            while chunk := source.read(1 << 20):
                out.write(chunk)
    else:
        raise BadArchive(f"member {member.name!r} is of a kind racker does not unpack ({member.type!r})")
    _apply_metadata(member, target, "/".join([*parent, last]), report)


def _apply_metadata(member: tarfile.TarInfo, target: Path, rel: str, report: Report) -> None:
    if os.geteuid() == 0:  # unprivileged, files stay the caller's (as umoci --rootless does)
        os.chown(target, member.uid, member.gid, follow_symlinks=False)
    if not member.issym():
        mode = member.mode & 0o7777
        if mode & (stat.S_ISUID | stat.S_ISGID) and not member.isdir() and not setid_allowed(rel):
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
            report.cleared_setid.append(rel)
        os.chmod(target, mode)
        for key, value in (member.pax_headers or {}).items():
            attribute = key.removeprefix("SCHILY.xattr.")
            if key.startswith("SCHILY.xattr.") and attribute in KEPT_XATTRS:
                os.setxattr(target, attribute, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
    os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)


def setid_allowed(rel: str) -> bool:
    directory = rel.rsplit("/", 1)[0] if "/" in rel else ""
    return any(directory == d or directory.startswith(d + "/") for d in SETID_DIRS)


def _whiteout(tree: Root, parts: list[str], report: Report, written: set[tuple[str, ...]]) -> None:
    """An OCI whiteout: remove what an earlier layer put at the named path (inside the root)."""
    base = parts[-1]
    try:
        parent = tree.resolve_dir(parts[:-1], create=False)
    except BadArchive:
        return  # whiting out under a directory that is not there: nothing to remove
    if base == OPAQUE:
        directory = tree.real(parent)
        for child in list(_children(directory)):
            if tuple([*parent, child]) not in written:
                tree.clear(directory / child)
                report.removed += 1
        return
    hidden = base.removeprefix(WHITEOUT)
    if hidden in ("", ".", "..") or "/" in hidden:
        raise BadArchive(f"whiteout {'/'.join(parts)!r} names no entry of its directory")
    victim = tree.real([*parent, hidden])
    if os.path.lexists(victim):
        tree.clear(victim)
        report.removed += 1


def _children(directory: Path) -> Iterator[str]:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        yield from os.listdir(directory)
