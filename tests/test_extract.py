"""The safe extractor, against hostile archives: nothing is ever written outside the root."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tree_snapshot
from racker.errors import BadArchive
from racker.sources import extract


def _tar(members: Iterable[tuple[tarfile.TarInfo, bytes | None]]) -> io.BytesIO:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, content in members:
            if content is not None:
                info.size = len(content)
            archive.addfile(info, io.BytesIO(content) if content is not None else None)
    data.seek(0)
    return data


def file(name: str, content: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, content


def entry(name: str, kind: bytes, link: str = "", mode: int = 0o755) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    return info, None


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path]:
    """(outer, root): the root to fill sits inside `outer`, beside files an attack would aim at."""
    outer = tmp_path / "outer"
    (outer / "victim").mkdir(parents=True)
    (outer / "victim" / "passwd").write_text("host's\n")
    (outer / "secret").write_text("secret\n")
    root = outer / "root"
    root.mkdir()
    return outer, root


def unpack(root: Path, members, **options) -> extract.Report:  # type: ignore[no-untyped-def]
    return extract.extract(_tar(members), root, **options)


# -- the attacks, one by one ----------------------------------------------------


def test_dotdot_is_refused(world) -> None:  # type: ignore[no-untyped-def]
    outer, root = world
    with pytest.raises(BadArchive, match="climbs out"):
        unpack(root, [file("../secret", b"pwned")])
    assert (outer / "secret").read_text() == "secret\n"


def test_absolute_names_land_inside(world) -> None:  # type: ignore[no-untyped-def]
    outer, root = world
    unpack(root, [file(str(outer / "secret"), b"inside")])
    assert (outer / "secret").read_text() == "secret\n"
    assert (root / str(outer / "secret").lstrip("/")).read_bytes() == b"inside"


@pytest.mark.parametrize("link", ["../victim", "/", "/../../..", "../../../../../../", "a/../../victim"])
def test_writing_through_a_symlink_stays_inside(world, link: str) -> None:  # type: ignore[no-untyped-def]
    outer, root = world
    before = tree_snapshot(outer, (root.name,))
    unpack(root, [entry("evil", tarfile.SYMTYPE, link), file("evil/passwd", b"pwned")])
    assert tree_snapshot(outer, (root.name,)) == before
    assert os.readlink(root / "evil") == link  # the link itself is kept as it is
    assert b"pwned" in b"".join(p.read_bytes() for p in root.rglob("passwd") if p.is_file() and not p.is_symlink())


def test_a_symlink_chain_is_resolved_inside(world) -> None:  # type: ignore[no-untyped-def]
    outer, root = world
    before = tree_snapshot(outer, (root.name,))
    unpack(root, [entry("a", tarfile.SYMTYPE, "b"), entry("b", tarfile.SYMTYPE, "/../victim"), file("a/passwd", b"pwned")])
    assert tree_snapshot(outer, (root.name,)) == before
    assert (root / "victim" / "passwd").read_bytes() == b"pwned"


def test_symlink_loops_are_refused(world) -> None:  # type: ignore[no-untyped-def]
    _outer, root = world
    with pytest.raises(BadArchive, match="too many symbolic links"):
        unpack(root, [entry("a", tarfile.SYMTYPE, "b"), entry("b", tarfile.SYMTYPE, "a"), file("a/x")])


def test_a_hard_link_to_outside_is_refused(world) -> None:  # type: ignore[no-untyped-def]
    outer, root = world
    with pytest.raises(BadArchive):
        unpack(root, [entry("link", tarfile.LNKTYPE, "../secret")])
    unpack(root, [entry("escape", tarfile.SYMTYPE, "/"), entry("x", tarfile.SYMTYPE, "..")])
    with pytest.raises(BadArchive, match="not in the image"):
        unpack(root, [entry("link", tarfile.LNKTYPE, "x/secret")])
    assert (outer / "secret").stat().st_nlink == 1


def test_a_hard_link_inside_is_a_hard_link(world) -> None:  # type: ignore[no-untyped-def]
    _outer, root = world
    unpack(root, [file("usr/bin/a", b"prog"), entry("usr/bin/b", tarfile.LNKTYPE, "usr/bin/a")])
    assert os.stat(root / "usr/bin/a").st_ino == os.stat(root / "usr/bin/b").st_ino


def test_device_nodes_are_skipped(world) -> None:  # type: ignore[no-untyped-def]
    _outer, root = world
    null = tarfile.TarInfo("dev/sda")
    null.type, null.devmajor, null.devminor = tarfile.BLKTYPE, 8, 0
    report = unpack(root, [(null, None), entry("dev/fifo", tarfile.FIFOTYPE), file("etc/hostname")])
    assert report.skipped_devices == ["dev/sda", "dev/fifo"]
    assert not os.path.lexists(root / "dev/sda") and (root / "etc/hostname").exists()


def test_setuid_is_kept_where_distributions_put_it_and_cleared_elsewhere(world) -> None:  # type: ignore[no-untyped-def]
    _outer, root = world
    report = unpack(root, [file("usr/bin/sudo", mode=0o4755), file("tmp/backdoor", mode=0o6755), file("home/x/sh", mode=0o4755)])
    assert (root / "usr/bin/sudo").stat().st_mode & 0o7777 == 0o4755
    assert (root / "tmp/backdoor").stat().st_mode & 0o7777 == 0o755
    assert report.cleared_setid == ["tmp/backdoor", "home/x/sh"]


def test_only_file_capabilities_are_kept_of_xattrs(world) -> None:  # type: ignore[no-untyped-def]
    _outer, root = world
    info, content = file("usr/bin/ping")
    info.pax_headers = {"SCHILY.xattr.trusted.overlay.opaque": "y", "SCHILY.xattr.user.x": "1"}
    unpack(root, [(info, content)])
    assert os.listxattr(root / "usr/bin/ping") == []


def test_whiteouts_remove_inside_and_refuse_tricks(world) -> None:  # type: ignore[no-untyped-def]
    outer, root = world
    unpack(root, [file("etc/a"), file("etc/b"), file("opt/x/1"), entry("up", tarfile.SYMTYPE, "/..")], whiteouts=True)
    report = unpack(root, [file("etc/.wh.a"), file("opt/x/.wh..wh..opq"), file("opt/x/2"), file("up/.wh.secret")], whiteouts=True)
    assert not (root / "etc/a").exists() and (root / "etc/b").exists()
    assert sorted(os.listdir(root / "opt/x")) == ["2"]
    assert (outer / "secret").exists(), "a whiteout through a symlink stays inside"
    assert report.removed == 2
    for trick in ("etc/.wh..", "etc/.wh."):
        with pytest.raises(BadArchive):
            unpack(root, [file(trick)], whiteouts=True)
    assert (outer / "secret").exists() and (root / "etc").is_dir()


def test_an_empty_symlink_target_is_refused(world) -> None:  # type: ignore[no-untyped-def]
    _outer, root = world
    with pytest.raises(BadArchive, match="empty target"):
        unpack(root, [file("a"), entry("a", tarfile.SYMTYPE, "")])


def test_a_corrupt_archive_is_one_error(world) -> None:  # type: ignore[no-untyped-def]
    _outer, root = world
    whole = _tar([file("a", b"y" * 5000)]).getvalue()
    with pytest.raises(BadArchive, match="not a readable tar archive"):
        extract.extract(io.BytesIO(whole[:700]), root, name="layer.tar")
    with pytest.raises(BadArchive, match="not a readable tar archive"):
        extract.extract(io.BytesIO(b"\x1f\x8b" + os.urandom(200)), root, name="layer.tar.gz")


# -- VM packages (boxes, OVAs): plain files and directories, nothing else -----------


def test_a_package_may_hold_directories_as_vagrant_package_writes_them(world) -> None:  # type: ignore[no-untyped-def]
    _outer, root = world
    members = [
        file("./Vagrantfile", b"load File.expand_path('include/_Vagrantfile', __dir__)\n"),
        entry("./include", tarfile.DIRTYPE),
        file("./include/_Vagrantfile", b"Vagrant.configure('2') do |c| end\n"),
        file("./include/scripts/setup.sh", b"#!/bin/sh\n", 0o755),
        file("./metadata.json", b"{}"),
    ]
    unpack(root, members, plain=True)
    assert (root / "include/scripts/setup.sh").read_bytes() == b"#!/bin/sh\n"
    assert sorted(p.name for p in root.iterdir()) == ["Vagrantfile", "include", "metadata.json"]


PACKAGE_TRICKS = [
    ([file("/tmp/racker-test-plain-absolute")], "has an absolute path"),
    ([file("include/../../secret", b"pwned")], "climbs out of the root with '..'"),
    ([entry("include", tarfile.DIRTYPE), entry("include/link", tarfile.SYMTYPE, "../../victim")], "not a plain file or directory"),
    ([file("box.img"), entry("include/again", tarfile.LNKTYPE, "box.img")], "not a plain file or directory"),
    ([entry("include/tty", tarfile.CHRTYPE)], "not a plain file or directory"),
    ([entry("include/fifo", tarfile.FIFOTYPE)], "not a plain file or directory"),
]


@pytest.mark.parametrize(("members", "said"), PACKAGE_TRICKS, ids=["absolute", "dotdot", "symlink", "hardlink", "device", "fifo"])
def test_a_package_member_that_is_no_file_or_directory_is_refused(world, members, said: str) -> None:  # type: ignore[no-untyped-def]
    outer, root = world
    before = tree_snapshot(outer, (root.name,))
    with pytest.raises(BadArchive, match=said):
        unpack(root, members, plain=True, name="x.box")
    assert tree_snapshot(outer, (root.name,)) == before
    assert not Path("/tmp/racker-test-plain-absolute").exists()
    assert not [p for p in root.rglob("*") if p.is_symlink() or not (p.is_file() or p.is_dir())]


def test_a_box_starting_with_its_include_directory_is_a_package(tmp_path: Path) -> None:
    from racker.sources import packaged

    for first, expected in (("include/_Vagrantfile", True), ("./Vagrantfile", True), ("etc/os-release", False)):
        path = tmp_path / "x.tar"
        path.write_bytes(_tar([file(first), file("metadata.json")]).getvalue())
        assert packaged.is_package(path) is expected, first


# -- whatever an archive holds: nothing outside the root changes ----------------

PARTS = ["a", "b", "..", ".", "", "victim", "etc", ".wh.a", ".wh..wh..opq", ".wh..."]
NAMES = st.lists(st.sampled_from(PARTS), min_size=1, max_size=4).map("/".join)
TARGETS = st.one_of(NAMES, NAMES.map(lambda n: "/" + n), st.sampled_from(["/", "..", "../..", "../victim", "/../secret"]))
MEMBERS = st.lists(
    st.tuples(st.sampled_from(["file", "dir", "symlink", "hardlink"]), NAMES, TARGETS),
    min_size=1,
    max_size=8,
)


def _member(kind: str, name: str, target: str):  # type: ignore[no-untyped-def]
    if kind == "file":
        return file(name, b"pwned", 0o6777)
    if kind == "dir":
        return entry(name, tarfile.DIRTYPE)
    return entry(name, tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE, target)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=MEMBERS, whiteouts=st.booleans())
def test_no_archive_writes_outside_its_root(tmp_path: Path, members, whiteouts: bool) -> None:  # type: ignore[no-untyped-def]
    import shutil
    import tempfile

    outer = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        (outer / "victim").mkdir()
        (outer / "victim" / "a").write_text("host's\n")
        (outer / "secret").write_text("secret\n")
        os.symlink("victim", outer / "etc")
        root = outer / "root"
        root.mkdir()
        before = tree_snapshot(outer, (root.name,))
        with contextlib.suppress(BadArchive):
            extract.extract(_tar(_member(*m) for m in members), root, whiteouts=whiteouts)
        assert tree_snapshot(outer, (root.name,)) == before
        for path in root.rglob("*"):
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode) and info.st_mode & (stat.S_ISUID | stat.S_ISGID):
                pytest.fail(f"a set-id file outside the system directories: {path}")
    finally:
        shutil.rmtree(outer)
