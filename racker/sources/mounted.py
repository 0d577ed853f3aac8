"""Filesystems debugfs cannot read (XFS): a read-only mount on an offset loop device, always undone.

    the volume's byte range ──losetup --read-only --offset --sizelimit──▶ /dev/loopN
        ──mount -o ro,norecovery,nodev,nosuid,noexec──▶ a directory in the pull's workdir
        ──tar (numeric owners, file capabilities) ──▶ the one safe extractor ──▶ the root filesystem
    then umount and losetup -d, in `finally`: on errors and Ctrl-C as well

`norecovery`: a dirty log is not replayed, so not a byte of the image is written.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from racker import proc, progress
from racker.errors import BadDisk, ToolFailed
from racker.sources import extract

OPTIONS = {"xfs": "ro,norecovery,nodev,nosuid,noexec"}  # kind: mount options; the kinds read this way


@contextlib.contextmanager
def mounted(image: Path, offset: int, size: int, kind: str, work: Path, name: str) -> Iterator[Path]:
    """The filesystem of `kind` at `offset` of `image`, mounted read-only for the block; undone after it."""
    loop = proc.run(
        ["losetup", "--find", "--show", "--read-only", "--offset", str(offset), "--sizelimit", str(size), str(image)],
        timeout=60,
    ).stdout.strip()
    target = work / "mnt"
    try:
        target.mkdir()
        try:
            proc.run(["mount", "-t", kind, "-o", OPTIONS[kind], loop, str(target)], timeout=120)
        except ToolFailed as failed:
            raise BadDisk(f"{name}: the {kind} filesystem cannot be mounted read-only: {failed}") from None
        try:
            yield target
        finally:
            _umount(target)
    finally:
        proc.run(["losetup", "-d", loop], timeout=60, check=False)
        with contextlib.suppress(OSError):
            target.rmdir()


def _umount(target: Path) -> None:
    """umount, and if something still holds it, detach it lazily (the kernel frees it when it can)."""
    if proc.run(["umount", str(target)], timeout=120, check=False).returncode != 0:
        proc.run(["umount", "--lazy", str(target)], timeout=60, check=False)


def exists(root: Path, paths: list[str]) -> list[bool]:
    """Whether each absolute path is in the mounted tree (a symlink counts: it is never followed out of it)."""
    return [os.path.lexists(root / p.lstrip("/")) for p in paths]


def copy_tree(root: Path, target: Path, name: str) -> None:
    """The mounted tree into the existing directory `target`, through the safe extractor."""
    argv = ["tar", "-C", str(root), "--numeric-owner", "--xattrs", "--xattrs-include=security.capability", "-cf", "-", "."]
    with progress.step(f"copying the files of {name}"), proc.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as child:
        assert child.stdout is not None and child.stderr is not None
        extract.extract(child.stdout, target, name=name)
        child.stdout.read()
        said = child.stderr.read().decode(errors="replace").strip().splitlines()
        if child.wait() not in (0, 1):  # 1: a file changed as it was read, which a read-only mount cannot
            raise BadDisk(f"{name}: reading the mounted filesystem failed" + (f": {said[-1]}" if said else ""))
