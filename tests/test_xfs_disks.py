"""XFS roots in disk images, which debugfs cannot read: a read-only mount on an offset loop device,
undone after the pull and after a failed one alike."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import loop_devices, pulled, racker
from racker import store

pytestmark = pytest.mark.slow

MiB = 1 << 20
SIZE = 320 * MiB  # mkfs.xfs makes nothing smaller than 300 MiB


def sh(*argv: object, input: str | None = None) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, input=input)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def loops_and_mounts(xfs: dict) -> tuple[list[str], list[str]]:
    """This test's loop devices and XFS mounts: another worker's come and go meanwhile
    (this module's fixture on another worker mounts an XFS of its own)."""
    roots = (xfs["good"].parent, os.environ["RACKER_HOME"])
    loops = loop_devices(*roots)
    devices = {line.split()[0] for line in loops}
    places = [str(Path(root).resolve()) + "/" for root in roots]
    mounts = [
        line
        for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[2] == "xfs" and (line.split()[0] in devices or any(line.split()[1].startswith(p) for p in places))
    ]
    return loops, mounts


def xfs_disk(tree: Path, disk: Path, work: Path) -> None:
    """An MBR disk whose partition 1 is an XFS holding `tree` (made on a loop device, mounted to fill it)."""
    disk.write_bytes(b"")
    os.truncate(disk, SIZE + 2 * MiB)
    sh("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", disk, input="label: dos\nstart=2048, type=83\n")
    loop = sh("losetup", "--find", "--show", "--offset", MiB, disk).strip()
    mnt = work / "mnt"
    mnt.mkdir()
    try:
        sh("mkfs.xfs", "-q", loop)
        sh("mount", "-t", "xfs", loop, mnt)
        try:
            sh("cp", "-a", f"{tree}/.", mnt)
        finally:
            sh("umount", mnt)
    finally:
        sh("losetup", "-d", loop)
        mnt.rmdir()


@pytest.fixture(scope="module")
def xfs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("xfs")
    tree = work / "tree"
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "usr/lib/os-release").write_text("ID=debian\nVERSION_ID=12\n")
    os.symlink("../usr/lib/os-release", tree / "etc/os-release")
    (tree / "etc/marker").write_text("on xfs\n")
    (tree / "usr/bin").mkdir()
    (tree / "usr/bin/su").write_bytes(os.urandom(3000))
    os.chmod(tree / "usr/bin/su", 0o4755)
    (tree / "home/user").mkdir(parents=True)
    os.chown(tree / "home/user", 1000, 1001)
    good = work / "xfs.raw"
    xfs_disk(tree, good, work)
    bad = work / "bad-xfs.raw"
    sh("cp", "--sparse=always", good, bad)
    with open(bad, "r+b") as handle:  # the superblock's magic stays (so it is an XFS), its geometry does not
        handle.seek(MiB + 4)
        handle.write(b"\0" * 200)
    return {"good": good, "bad": bad}


def test_an_xfs_root_is_read_through_a_read_only_mount_that_is_undone(xfs: dict, private_store: dict) -> None:
    before = loops_and_mounts(xfs)
    image = pulled(f"file:{xfs['good']}")
    assert (image.manifest["disk"]["root"], image.manifest["disk"]["table"]) == ("partition 1", "dos")
    with store.reading(image) as rootfs:
        assert (rootfs / "etc/marker").read_text() == "on xfs\n"
        assert os.readlink(rootfs / "etc/os-release") == "../usr/lib/os-release"
        assert os.stat(rootfs / "usr/bin/su").st_mode & 0o7777 == 0o4755
        info = os.stat(rootfs / "home/user")
        assert (info.st_uid, info.st_gid) == (1000, 1001)
    assert loops_and_mounts(xfs) == before


def test_an_xfs_that_does_not_mount_is_one_line_and_leaves_nothing(xfs: dict, private_store: dict) -> None:
    before = loops_and_mounts(xfs)
    result = racker("pull", f"file:{xfs['bad']}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("racker: error:")]
    assert result.returncode == 125 and len(errors) == 1 and "the xfs filesystem cannot be mounted read-only" in errors[0], result.stderr
    assert store.images() == [] and [p.name for p in (store.home() / "tmp").iterdir()] == [".new"]
    assert loops_and_mounts(xfs) == before
