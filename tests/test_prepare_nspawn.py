"""prepare.in_container: the nspawn every prepare runs its package manager in."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from racker import machines, prepare

pytestmark = pytest.mark.root


def tiny_rootfs(directory: Path) -> Path:
    """A tree named `rootfs`, as every image in a store is, holding just enough of the host's
    binaries (merged /usr) for nspawn to run `sleep` and `cat` in it; made in milliseconds."""
    rootfs = directory / "rootfs"
    for sub in ("usr/bin", "usr/lib/x86_64-linux-gnu", "usr/lib64", "etc", "proc", "sys", "dev", "run", "tmp", "var"):
        (rootfs / sub).mkdir(parents=True)
    for link in ("bin", "lib", "lib64"):
        (rootfs / link).symlink_to(f"usr/{link}")
    for binary in ("/usr/bin/sleep", "/usr/bin/cat"):
        shutil.copy2(binary, rootfs / "usr/bin")
    for library in ("libc.so.6",):
        shutil.copy2(Path("/lib/x86_64-linux-gnu") / library, rootfs / "usr/lib/x86_64-linux-gnu")
    shutil.copy2("/lib64/ld-linux-x86-64.so.2", rootfs / "usr/lib64")
    (rootfs / "etc/os-release").write_text("ID=tiny\n")
    return rootfs


def test_two_prepares_at_once_have_machines_of_their_own(tmp_path: Path) -> None:
    trees = [tiny_rootfs(tmp_path / side) for side in ("a", "b")]

    def run(rootfs: Path):  # type: ignore[no-untyped-def]
        # Overlapping runs: each sleeps while the other starts and ends.
        slept = prepare.in_container(rootfs, ("/usr/bin/sleep", "1"))
        return slept, prepare.in_container(rootfs, ("/usr/bin/cat", "/proc/sys/kernel/hostname"))

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, trees))
    for result in [r for pair in results for r in pair]:
        assert result.succeeded, result.stderr
        # nspawn's complaint about its propagate directory is left out: it would hide a real error.
        assert "Attempted to remove disk file system" not in result.stderr, result.stderr
    # nspawn names the container's host after its machine. Left to name it after the directory,
    # nspawn called both `rootfs`, and both shared /run/systemd/nspawn/propagate/rootfs.
    names = {hostname.stdout.strip() for _slept, hostname in results}
    assert len(names) == 2 and "rootfs" not in names, names
    assert all(name.startswith("racker-prepare-") for name in names), names
    assert not any((machines.NSPAWN_PROPAGATE / name).exists() for name in names)
