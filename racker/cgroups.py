"""The cgroups racker makes for machines where no machined makes them: one per machine, under one per store."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from racker import store


def unified_root() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host."""
    for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (root / "cgroup.controllers").exists():
            return root
    return None


def store_parent() -> Path | None:
    """The parent of this store's machine cgroups: each store (RACKER_HOME) has its own."""
    root = unified_root()
    if root is None:
        return None
    key = hashlib.sha256(str(store.home().resolve()).encode()).hexdigest()[:12]
    return root / "racker" / key


def for_machine(name: str) -> Path | None:
    parent = store_parent()
    return parent / name if parent is not None else None


def make(path: Path) -> None:
    # Another machine's stop may remove the empty store parent between our two mkdirs.
    for _attempt in range(5):
        with contextlib.suppress(FileNotFoundError):
            path.mkdir(parents=True, exist_ok=True)
            return
    path.mkdir(parents=True, exist_ok=True)


def remove(path: str | Path | None) -> None:
    """Remove a machine's cgroup tree, deepest first, and the store's parent once empty.

    Only a cgroup of this store's: a path from a record is never trusted further.
    A cgroup can only be removed when no process is in it: rmdir fails otherwise.
    """
    parent = store_parent()
    if not path or parent is None or Path(path).parent != parent or not os.path.isdir(path):
        return
    for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda entry: -entry[0].count("/")):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)
    with contextlib.suppress(OSError):
        os.rmdir(parent)
