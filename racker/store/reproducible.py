"""Same inputs, same image: the build's one clock (SOURCE_DATE_EPOCH) and what it normalises.

An image's digest is over content, modes and owners (store.tree_digest), so what a build
stamps with the time or with chance must not reach a file: the archive's Release date stands
for "now" (as Debian's reproducible images and mkosi take it), and mtimes newer than it are
clamped to it, so that a disk or a tarball made from the tree is the same bytes too.
"""

from __future__ import annotations

import os
from pathlib import Path

# The manifest field holding the image's SOURCE_DATE_EPOCH, in seconds; prepared images inherit it.
FIELD = "source_date_epoch"
ENV = "SOURCE_DATE_EPOCH"


def override() -> int | None:
    """SOURCE_DATE_EPOCH from the environment, if the user set one (it wins over the archive's date)."""
    text = os.environ.get(ENV, "").strip()
    return int(text) if text.isdigit() else None


def of(manifest: dict) -> int | None:
    """The SOURCE_DATE_EPOCH an image was built with, if it recorded one."""
    value = manifest.get(FIELD)
    return value if isinstance(value, int) else None


def environment(epoch: int | None) -> dict[str, str]:
    """SOURCE_DATE_EPOCH for the tools that read the build's clock from it (mmdebstrap, shadow's
    useradd and pwconv, mkinitramfs); nothing without a clock.

    And one string hash: Python before 3.11 marshals a frozenset constant (`x in {"a", "b"}`) in
    its hash order, which PYTHONHASHSEED draws anew in each process, so the .pyc files that the
    packages' postinst compiles (py3compile) came out in another order on each build (bullseye's
    Python 3.9). reproducible-builds.org's advice: a fixed seed while building."""
    return {} if epoch is None else {ENV: str(epoch), "PYTHONHASHSEED": "0"}


def clamp_mtimes(root: Path, epoch: int) -> int:
    """Set every mtime (and atime) in `root` newer than `epoch` to `epoch`, links themselves, never
    their targets; what is older keeps its time (a package's files keep theirs). Returns how many."""
    clamped = 0
    for directory, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            clamped += _clamp(os.path.join(directory, name), epoch)
    return clamped + _clamp(str(root), epoch)


def _clamp(path: str, epoch: int) -> int:
    info = os.lstat(path)
    if info.st_mtime <= epoch:
        return 0
    os.utime(path, (epoch, epoch), follow_symlinks=False)
    return 1
