"""Same inputs, same digest: an image built twice from one archive state, in two stores at two
times, is the same image; a changed input is another (racker/store/reproducible.py)."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import SHARED_HOME, TINY_ENTRY, racker
from racker.sources import archive
from racker.store import reproducible

# -- the clock -----------------------------------------------------------------------------


def test_the_release_date_is_read_from_the_signed_text() -> None:
    text = "Origin: Debian\nSuite: stable\nDate: Sat, 10 Jun 2023 08:52:57 UTC\nSHA256:\n"
    assert archive.release_date(text) == 1686387177
    with pytest.raises(archive.UpstreamError, match="no valid Date"):
        archive.release_date("Origin: Debian\nDate: yesterday\n")


def test_mtimes_newer_than_the_epoch_are_clamped_links_themselves(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/new").write_text("made by the build")
    (root / "etc/old").write_text("from a package")
    os.utime(root / "etc/old", (1000, 1000))
    outside = tmp_path / "outside"
    outside.write_text("the host's")
    (root / "etc/link").symlink_to(outside)
    before = outside.stat().st_mtime

    reproducible.clamp_mtimes(root, 5000)

    assert {p.name: int(p.lstat().st_mtime) for p in (root / "etc").iterdir()} == {"new": 5000, "old": 1000, "link": 5000}
    assert int(root.stat().st_mtime) == 5000 and int((root / "etc").stat().st_mtime) == 5000
    assert outside.stat().st_mtime == before, "a link's target outside the tree was touched"


def test_the_user_s_source_date_epoch_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert reproducible.override() == 1700000000
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "not a number")
    assert reproducible.override() is None
    assert reproducible.of({"source_date_epoch": 5}) == 5 and reproducible.of({}) is None


def test_a_build_compiles_python_with_one_string_hash() -> None:
    """bullseye's Python 3.9 writes a frozenset constant in hash order: its .pyc files differed between two builds."""
    assert reproducible.environment(1700000000) == {"SOURCE_DATE_EPOCH": "1700000000", "PYTHONHASHSEED": "0"}
    assert reproducible.environment(None) == {}


def test_the_pyc_files_there_are_compiled_again_in_their_own_mode_and_none_added(tmp_path: Path) -> None:
    """prepare.RECOMPILE_PYC, run by this Python (the image's own runs it in prepare): a stale .pyc
    is made again in its invalidation mode; a source without one gets none; a .pyc without a source stays."""
    import py_compile
    import sys

    from racker import prepare

    lib = tmp_path / "lib"
    (lib / "__pycache__").mkdir(parents=True)
    for name in ("stamped", "hashed", "bare"):
        (lib / f"{name}.py").write_text(f"def {name}(x):\n    return x in {{'a', 'b', 'c'}}\n")
    tag = sys.implementation.cache_tag
    pyc = {name: lib / "__pycache__" / f"{name}.{tag}.pyc" for name in ("stamped", "hashed", "orphan")}
    py_compile.compile(str(lib / "hashed.py"), cfile=str(pyc["hashed"]), invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    expected = pyc["hashed"].read_bytes()
    pyc["hashed"].write_bytes(expected[:16] + b"stale")
    py_compile.compile(str(lib / "stamped.py"), cfile=str(pyc["stamped"]), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    stamped = pyc["stamped"].read_bytes()
    pyc["stamped"].write_bytes(stamped[:16] + b"stale")
    pyc["orphan"].write_bytes(b"left alone")

    done = subprocess.run([sys.executable, "-c", prepare.RECOMPILE_PYC, str(lib)], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert pyc["hashed"].read_bytes() == expected and pyc["stamped"].read_bytes() == stamped
    assert pyc["orphan"].read_bytes() == b"left alone"
    assert sorted(p.name for p in (lib / "__pycache__").iterdir()) == sorted(p.name for p in pyc.values())


# -- two builds ------------------------------------------------------------------------------


def _built(home: Path, name: str, env: dict[str, str] | None = None) -> dict:
    """`racker pull NAME` in the store at `home`: its stored manifest (digest, upstream, clock)."""
    done = racker("pull", name, env={"RACKER_HOME": str(home), **(env or {})}, timeout=1800)
    assert done.returncode == 0, done.stderr
    ref = json.loads((home / "refs" / f"{name}.json").read_text())
    return ref["manifest"]


def _rootfs(home: Path, manifest: dict) -> Path:
    return home / "images" / manifest["digest"].replace(":", "-") / "rootfs"


def _differences(a: Path, b: Path) -> list[str]:
    """Paths whose type, mode, owner or content differ (what the digest covers), for the failure message."""

    def walk(root: Path) -> dict[str, tuple]:
        found = {}
        for directory, _dirs, files in os.walk(root):
            for name in [*_dirs, *files]:
                path = Path(directory, name)
                info = path.lstat()
                body = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else ""
                link = os.readlink(path) if path.is_symlink() else ""
                found[str(path.relative_to(root))] = (info.st_mode, info.st_uid, info.st_gid, body, link)
        return found

    left, right = walk(a), walk(b)
    return sorted(rel for rel in left.keys() | right.keys() if left.get(rel) != right.get(rel))


def _newer_than(root: Path, epoch: int) -> list[str]:
    found = []
    for directory, dirs, files in os.walk(root):
        found += [str(Path(directory, n).relative_to(root)) for n in [*dirs, *files] if Path(directory, n).lstat().st_mtime > epoch]
    return found


@pytest.mark.slow
@pytest.mark.root
def test_the_tiny_image_built_twice_apart_is_one_image_and_another_package_another(private_store: dict, tmp_path: Path) -> None:
    catalog = Path(private_store["RACKER_CATALOG"])
    # passwd: its postinst writes /etc/shadow, whose last-change day is SOURCE_DATE_EPOCH's.
    (catalog / "tiny-passwd.toml").write_text(TINY_ENTRY.replace("packages = []", 'packages = ["passwd"]'))

    first = _built(tmp_path / "a", "tiny")
    time.sleep(2)  # another second on every clock the build could read
    second = _built(tmp_path / "b", "tiny")
    if first["upstream"]["state"] != second["upstream"]["state"]:
        pytest.skip("the archive moved between the two builds")  # not the same inputs

    a, b = _rootfs(tmp_path / "a", first), _rootfs(tmp_path / "b", second)
    assert first["digest"] == second["digest"], f"differ: {_differences(a, b)[:20]}"
    epoch = first[reproducible.FIELD]
    assert epoch == second[reproducible.FIELD] and epoch < time.time() - 60
    assert _newer_than(a, epoch) == [], "an mtime newer than SOURCE_DATE_EPOCH"
    assert (a / "etc/resolv.conf").read_bytes() == b"", "the build host's resolv.conf is in the image"

    other = _built(tmp_path / "a", "tiny-passwd")
    assert other["digest"] != first["digest"] and "passwd" in {p["name"] for p in other["packages"]}

    # Another SOURCE_DATE_EPOCH (the user's wins over the archive's date): /etc/shadow's day follows it.
    month_earlier = str(epoch - 30 * 86400)
    earlier = _built(tmp_path / "c", "tiny-passwd", {"SOURCE_DATE_EPOCH": month_earlier})
    assert earlier["digest"] != other["digest"] and earlier[reproducible.FIELD] == int(month_earlier)
    day = int(month_earlier) // 86400
    assert f":{day}:" in (_rootfs(tmp_path / "c", earlier) / "etc/shadow").read_text()
    assert _newer_than(_rootfs(tmp_path / "c", earlier), int(month_earlier)) == []


@pytest.mark.slow
@pytest.mark.root
def test_debian_bookworm_and_its_vm_image_built_twice_apart_are_the_same(tmp_path: Path) -> None:
    """The catalogue's stable suite (its archive moves seldom) bootstrapped and prepared in two stores,
    and the two promotes of it: the same bytes. (Another SOURCE_DATE_EPOCH: the tiny image's test.)

    The first store is the suite's shared one, whose build the other tests need anyway (made earlier
    in this run, or in an earlier one); if the archive has moved since, a second store of the test's
    own builds instead."""

    def build(home: Path, disk: Path) -> tuple[dict, dict]:
        image = _built(home, "debian-bookworm")
        done = racker("promote", "debian-bookworm", "--output", str(disk), env={"RACKER_HOME": str(home)}, timeout=1800)
        assert done.returncode == 0, done.stderr
        prepared = json.loads((home / "refs" / "debian-bookworm%2Bvm.json").read_text())["manifest"]
        return image, prepared

    a, a_disk, b, b_disk = SHARED_HOME, tmp_path / "shared.raw", tmp_path / "b", tmp_path / "b.raw"
    first, first_vm = build(a, a_disk)
    time.sleep(2)  # another second on every clock the build could read
    second, second_vm = build(b, b_disk)
    if first["upstream"]["state"] != second["upstream"]["state"]:  # the shared build is of an older archive
        a, a_disk = tmp_path / "a", tmp_path / "a.raw"
        first, first_vm = build(a, a_disk)
    if first["upstream"]["state"] != second["upstream"]["state"]:
        pytest.skip("the archive moved between the two builds")

    assert first["digest"] == second["digest"], f"differ: {_differences(_rootfs(a, first), _rootfs(b, second))[:20]}"
    assert first_vm["digest"] == second_vm["digest"], f"differ: {_differences(_rootfs(a, first_vm), _rootfs(b, second_vm))[:20]}"
    assert _newer_than(_rootfs(a, first_vm), first[reproducible.FIELD]) == []
    assert filecmp.cmp(a_disk, b_disk, shallow=False), "the two stores' promotes made different disks"


def test_a_disk_s_ids_follow_the_image_not_chance() -> None:
    from racker.promote import disk

    one = disk.plan("uefi", 2 << 30, 400 << 20, seed="sha256:aaaa", epoch=1686387177)
    assert one == disk.plan("uefi", 2 << 30, 400 << 20, seed="sha256:aaaa", epoch=1686387177)
    other = disk.plan("uefi", 2 << 30, 400 << 20, seed="sha256:bbbb")
    assert {one.root_uuid, one.esp_uuid, one.disk_id, one.hash_seed}.isdisjoint(
        {other.root_uuid, other.esp_uuid, other.disk_id, other.hash_seed}
    )
    assert f"label-id: {one.disk_id}" in one.sfdisk_script() and f"uuid={one.partition_uuids[1]}" in one.sfdisk_script()
    assert disk.plan("bios", 2 << 30, 400 << 20, seed="sha256:aaaa").sfdisk_script().count("label-id: 0x") == 1
    unseeded = [disk.plan("bios", 2 << 30, 400 << 20) for _ in range(2)]
    assert unseeded[0].root_uuid != unseeded[1].root_uuid  # no image to follow: random, as before


def _qemu_img(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=120)
    assert not check or done.returncode == 0, done.stderr
    return done


@pytest.mark.slow  # builds disks (qemu-img convert)
@pytest.mark.parametrize("name", ["vmdk", "vhd", "vhdx", "vdi", "qcow2"])
def test_a_converted_disk_is_the_same_bytes_and_still_valid(name: str, tmp_path: Path) -> None:
    """qemu-img draws a vmdk's CID, a vhd's unique id and time, a vhdx's GUIDs and sequence numbers,
    a vdi's UUIDs at random: promote settles them from the image's digest (headers.settle)."""
    from racker.promote import formats

    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as handle:  # some data among zero blocks, as a disk has
        handle.truncate(64 << 20)
        for at in (0, 5 << 20, 40 << 20):
            handle.seek(at)
            handle.write(hashlib.sha256(str(at).encode()).digest() * 4096)
    fmt = formats.get(name)

    def convert(seed: str, epoch: int | None = 1686387177) -> bytes:
        out = tmp_path / str(len(list(tmp_path.iterdir()))) / f"disk{fmt.suffix}"  # a vmdk names its file
        out.parent.mkdir()
        formats.convert(raw, fmt, out, out.name, seed=seed, epoch=epoch)
        as_vhd = ["-f", fmt.qemu_format]
        info = json.loads(_qemu_img("info", "--output=json", *as_vhd, out).stdout)
        assert info["format"] == fmt.qemu_format and info["virtual-size"] == 64 << 20
        if name != "vhd":  # qemu-img checks no vpc
            _qemu_img("check", *as_vhd, out)
        compared = _qemu_img("compare", "-f", "raw", "-F", fmt.qemu_format, raw, out, check=False)
        assert compared.returncode == 0, f"the {name} does not hold the raw disk: {compared.stdout}{compared.stderr}"
        return out.read_bytes()

    one = convert("sha256:aaaa")
    assert convert("sha256:aaaa") == one, f"two converts of one image made two {name} files"
    if name != "qcow2":  # qcow2 has no id: the same bytes whatever the image
        assert convert("sha256:bbbb") != one, "another image's disk took the same ids"
        assert convert("") != convert(""), "without an image to follow, qemu-img's own random ids stay"
    if name == "vmdk":  # qemu-img writes the CID with %x: one time in 16 it has fewer than 8 digits
        from racker.promote import headers

        short = tmp_path / "short" / f"disk{fmt.suffix}"
        short.parent.mkdir()
        formats.convert(raw, fmt, short, short.name)
        data = short.read_bytes()
        end = data.index(b"\0", 512)  # the descriptor's text, from sector 1 to its NUL padding
        text = re.sub(rb"\nCID=[0-9a-f]+\n", b"\nCID=f12\n", data[512:end])
        short.write_bytes(data[:512] + text.ljust(end - 512, b"\0") + data[end:])
        headers.settle(short, fmt.qemu_format, "sha256:aaaa", 1686387177)
        assert short.read_bytes() == one, "a short CID was not settled"


@pytest.mark.slow  # builds disks and packs them
@pytest.mark.parametrize("name", ["gce", "ova", "vagrant-virtualbox", "vagrant-libvirt"])
def test_a_packed_disk_is_the_same_bytes_at_another_time(name: str, tmp_path: Path) -> None:
    """The tar's members (and a box's gzip header) carry the image's SOURCE_DATE_EPOCH, not the time of the pack."""
    from racker.promote import boxes, formats

    fmt = formats.get(name)

    def pack(run: int) -> bytes:
        work = tmp_path / str(run)
        work.mkdir()
        raw = work / "scratch.raw"
        with open(raw, "wb") as handle:
            handle.truncate(8 << 20)
            handle.write(b"racker" * 1000)
        output = work / f"out-{run}{fmt.suffix}"  # the temporary name differs too, as a .partial's does
        if fmt.package:
            appliance = boxes.Appliance("disk", "debian", 8 << 20, boxes.mac_for("sha256:aaaa"), seed="sha256:aaaa", epoch=1686387177)
            boxes.pack(raw, fmt, output, appliance)
        else:
            formats.pack_gce(raw, output, epoch=1686387177)
        return output.read_bytes()

    first = pack(1)
    time.sleep(1.1)  # another second on the clock the members took their time from
    assert pack(2) == first


def test_a_bootstrap_whose_archive_moved_meanwhile_runs_again_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The logic only (mmdebstrap and the archive faked): the real bootstraps are the slow tests above."""
    from racker import errors
    from racker.sources import bootstrap
    from racker.store import refs

    states = iter([("old", 100), ("new", 200), ("newer", 300)])
    built: list[int] = []

    def signed_releases(lines: list[str], keys: Path, timeout: float) -> list[archive.SignedRelease]:
        sha, epoch = next(states)
        return [archive.SignedRelease("u/InRelease", "s", ("main",), f"Date: {epoch}", sha)]

    def mmdebstrap(ref: object, distro: str, suite: str, entry: object, rootfs: Path, epoch: int) -> set[str]:
        rootfs.mkdir()
        built.append(epoch)
        return {"new"}  # what apt saw: the state after the first look

    monkeypatch.setattr(archive, "signed_releases", signed_releases)
    monkeypatch.setattr(archive.SignedRelease, "epoch", property(lambda self: int(self.text.split()[1])))
    monkeypatch.setattr(bootstrap, "_mmdebstrap", mmdebstrap)
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)

    fields = bootstrap.acquire(refs.parse("bootstrap:debian/bookworm"), None, tmp_path / "rootfs")
    assert built == [100, 200] and fields[reproducible.FIELD] == 200

    states = iter([("a", 1), ("b", 2)])
    with pytest.raises(errors.UpstreamError, match="moved during two bootstraps"):
        bootstrap.acquire(refs.parse("bootstrap:debian/bookworm"), None, tmp_path / "again")
    assert not (tmp_path / "again").exists()
