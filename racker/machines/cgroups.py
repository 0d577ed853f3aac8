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


# On a hybrid host nspawn mirrors a container's cgroup into the v1 name=systemd
# hierarchy, at the same path below its root: removed along with the v2 one.
V1_NAMED = (Path("/sys/fs/cgroup/systemd"),)


def mirrors(path: Path) -> list[Path]:
    """`path`'s twins in the v1 named hierarchies (none on a pure cgroup v2 host)."""
    root = unified_root()
    if root is None or root == Path("/sys/fs/cgroup"):
        return []
    relative = path.relative_to(root)
    return [named / relative for named in V1_NAMED if (named / "cgroup.procs").exists()]


def _ours(path: str | Path | None) -> Path | None:
    """A machine cgroup of this store's, or None: a path from a record is never trusted further."""
    parent = store_parent()
    if not path or parent is None or Path(path).parent != parent:
        return None
    return Path(path)


def populated(path: Path) -> bool:
    try:
        return "populated 1" in (path / "cgroup.events").read_text()
    except FileNotFoundError:
        return False


def kill(path: str | Path | None, timeout: float = 5) -> bool:
    """SIGKILL every process left in a machine's cgroup (a container whose nspawn is gone)
    and wait until it is empty; True if there were any. Only a cgroup of this store's."""
    import time

    cgroup = _ours(path)
    if cgroup is None or not populated(cgroup):
        return False
    try:
        (cgroup / "cgroup.kill").write_text("1")  # the whole subtree, atomically (Linux >= 5.14)
    except FileNotFoundError:
        import signal

        for procs in cgroup.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while populated(cgroup) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def remove(path: str | Path | None) -> bool:
    """Remove a machine's cgroup tree and its v1 mirrors, deepest first, and the store's
    parents once empty; True if nothing of it is left.

    A cgroup can only be removed when no process is in it: rmdir fails otherwise.
    """
    cgroup = _ours(path)
    if cgroup is None:
        return False
    for tree in (cgroup, *mirrors(cgroup)):
        if tree.is_dir():
            for dirpath, _dirs, _files in sorted(os.walk(tree), key=lambda entry: -entry[0].count("/")):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
        with contextlib.suppress(OSError):
            os.rmdir(tree.parent)
    return not any(tree.exists() for tree in (cgroup, *mirrors(cgroup)))


def machine_names() -> set[str]:
    """The machine cgroups this store has, in any hierarchy, by name."""
    parent = store_parent()
    if parent is None:
        return set()
    return {p.name for tree in (parent, *mirrors(parent)) if tree.is_dir() for p in tree.iterdir() if p.is_dir()}
