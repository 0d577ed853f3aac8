"""Filesystems debugfs cannot read (XFS): a read-only mount on an offset loop device, always undone.

    the volume's byte range ──losetup --read-only --offset --sizelimit──▶ /dev/loopN (detached in `finally`)
        ──unshare --mount --propagation private──▶ this module as a helper, in a mount namespace of its own:
              mount -o ro,norecovery,nodev,nosuid,noexec, then tar (numeric owners, file capabilities) to stdout
        ──▶ the one safe extractor ──▶ the root filesystem

The mount exists only in the helper's namespace: no other process sees it, a container started
meanwhile (nspawn, podman) cannot take a copy that keeps the loop device busy, and it is gone when
the helper ends, however it ends (error, Ctrl-C, kill -9). `norecovery`: a dirty log is not replayed.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import racker
from racker import proc, progress
from racker.errors import BadDisk, ToolFailed
from racker.sources import extract
from racker.store import imagetree

OPTIONS = {"xfs": "ro,norecovery,nodev,nosuid,noexec"}  # kind: mount options; the kinds read this way
MOUNT_FAILED = 3  # the helper's exit status when the filesystem does not mount


@contextlib.contextmanager
def loop_device(image: Path, offset: int, size: int) -> Iterator[str]:
    """A read-only loop device over a byte range of `image`, detached after the block."""
    argv = ["losetup", "--find", "--show", "--read-only", "--offset", str(offset), "--sizelimit", str(size), str(image)]
    loop = proc.run(argv, timeout=60).stdout.strip()
    try:
        yield loop
    finally:
        proc.run(["losetup", "-d", loop], timeout=60, check=False)


def _helper(kind: str, loop: str, target: Path, mode: str) -> list[str]:
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        sys.executable,
        "-m",
        "racker.sources.mounted",
        mode,
        kind,
        loop,
        str(target),
    ]


def _env() -> dict[str, str]:
    """The helper imports this racker, wherever it is installed or checked out."""
    return {"PYTHONPATH": str(Path(racker.__file__).resolve().parent.parent)}


def exists(image: Path, offset: int, size: int, kind: str, paths: list[str], work: Path, name: str) -> list[bool]:
    """Whether each absolute path is in the filesystem (a symlink counts: it is never followed)."""
    target = work / "mnt"
    target.mkdir(exist_ok=True)
    with loop_device(image, offset, size) as loop:
        done = proc.run([*_helper(kind, loop, target, "exists"), *paths], timeout=300, check=False, env=_env())
    _raise_for(done.returncode, done.stderr, kind, name)
    return json.loads(done.stdout)


def copy_tree(image: Path, offset: int, size: int, kind: str, target: Path, work: Path, name: str) -> None:
    """The filesystem's tree into the existing directory `target`, through the safe extractor."""
    mount_point = work / "mnt"
    mount_point.mkdir(exist_ok=True)
    with loop_device(image, offset, size) as loop, progress.step(f"copying the files of {name}"):
        argv = _helper(kind, loop, mount_point, "tar")
        with proc.spawn(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE) as child:
            assert child.stdout is not None and child.stderr is not None
            try:
                extract.extract(child.stdout, target, name=name)
            except Exception:
                if child.wait() == 0:
                    raise
                _raise_for(child.returncode, child.stderr.read().decode(errors="replace"), kind, name)
                raise
            child.stdout.read()
            _raise_for(child.wait(), child.stderr.read().decode(errors="replace"), kind, name)


def _raise_for(returncode: int, stderr: str, kind: str, name: str) -> None:
    said = [line for line in stderr.strip().splitlines() if line.strip()]
    reason = f": {said[-1]}" if said else ""
    if returncode == MOUNT_FAILED:
        raise BadDisk(f"{name}: the {kind} filesystem cannot be mounted read-only{reason}")
    if returncode not in (0, 1):  # tar's 1: a file changed as it was read, which a read-only mount cannot
        raise BadDisk(f"{name}: reading the mounted {kind} filesystem failed (exit status {returncode}){reason}")


def _main(argv: list[str]) -> int:
    """In the helper's own mount namespace: mount, then answer `exists` (JSON) or write a tar of the tree."""
    mode, kind, loop, target, *paths = argv
    try:
        proc.run(["mount", "-t", kind, "-o", OPTIONS[kind], loop, target], timeout=120)
    except ToolFailed as failed:
        print(str(failed), file=sys.stderr)
        return MOUNT_FAILED
    if mode == "exists":
        tree = imagetree.Tree(target)  # the disk's links resolve inside it, never on the host
        print(json.dumps([tree.lexists(p) for p in paths]))
        return 0
    tar = ["tar", "-C", target, "--numeric-owner", "--xattrs", "--xattrs-include=security.capability", "-cf", "-", "."]
    sys.stdout.flush()
    return proc.run(tar, timeout=None, check=False, capture=False, stdout=sys.stdout.buffer).returncode


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
