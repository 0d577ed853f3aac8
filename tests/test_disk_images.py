"""Disk images pulled into the store: racker's own promote output in every format, a disk made
by hand (sfdisk + mkfs.ext4 -d, MBR, a separate /usr), a GPT disk with LVM (lvm2's own tools
on a loop device), served over HTTPS with a SHA256SUMS; and every bad image one clear line
that leaves nothing behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import SHARED_HOME, StaticServer, in_store, loop_devices, passes_checks, racker
from conftest import pulled as _pulled  # tests here name their results `pulled`
from racker import store

pytestmark = pytest.mark.slow

MiB = 1 << 20
LVM_CONFIG = "global { activation = 0 } devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 } backup { backup = 0 archive = 0 }"
PROMOTE_ADDS = ("boot/grub", "lost+found")  # and etc/fstab, which promote rewrites

# A volume group's name is the host's: two workers building the LVM disk at once must not share one.
VG = f"vg-test{os.getpid()}"


def listing(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Every path under `root`: mode, owner, size, link target, file capability (not times)."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            rel = str(path.relative_to(root))
            if any(rel == s or rel.startswith(s + "/") for s in skip):
                continue
            info = os.lstat(path)
            cap = None
            if stat.S_ISREG(info.st_mode):
                try:
                    cap = os.getxattr(path, "security.capability", follow_symlinks=False)
                except OSError as error:
                    if error.errno != errno.ENODATA:  # an invalid capability (EINVAL) is a failure, not "none"
                        raise
                    cap = None
            size = 0 if stat.S_ISDIR(info.st_mode) else info.st_size
            target = os.readlink(path) if stat.S_ISLNK(info.st_mode) else ""
            found[rel] = (stat.filemode(info.st_mode), info.st_uid, info.st_gid, size, target, cap)
    return found


def assert_same(source: dict, pulled: dict) -> None:
    missing, extra = sorted(set(source) - set(pulled)), sorted(set(pulled) - set(source))
    differ = {k: (source[k], pulled[k]) for k in sorted(set(source) & set(pulled)) if source[k] != pulled[k]}
    assert not missing and not extra and not differ, f"missing {missing[:10]}, extra {extra[:10]}, differ {list(differ.items())[:10]}"


def sh(*argv: object, **options) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **options)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done


def mkfs(disk: Path, offset: int, size: int, tree: Path, *extra: str) -> str:
    """An ext4 at `offset` of `disk`, populated from `tree` without a mount: its UUID."""
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", *extra, "-E", f"offset={offset}", "-d", tree, disk, size // 4096)
    return sh("blkid", "-p", "-o", "value", "-s", "UUID", "-O", offset, disk).stdout.strip()


def sfdisk(disk: Path, script: str) -> list[dict]:
    sh("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", disk, input=script)
    return json.loads(sh("sfdisk", "--json", disk).stdout)["partitiontable"]["partitions"]


def unpack_rootfs(image_name: str, target: Path, work: Path) -> None:
    """A catalogue image as a person would get it: exported to a tarball, unpacked with GNU tar."""
    tar = work / f"{image_name}.tar"
    exported = racker("export", image_name, "-o", str(tar), "--format", "rootfs-tar", env={"RACKER_HOME": str(SHARED_HOME)})
    assert exported.returncode == 0, exported.stderr
    target.mkdir()
    sh("tar", "-xpf", tar, "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", target)
    tar.unlink()


def hand_made_mbr(rootfs: Path, disk: Path) -> None:
    """MBR: /usr on partition 1, the root on partition 2 (an fstab line mounting /usr by UUID)."""
    usr = rootfs.parent / "usr-tree"
    rootfs.joinpath("usr").rename(usr)
    rootfs.joinpath("usr").mkdir()
    disk.write_bytes(b"")
    os.truncate(disk, 1536 * MiB)
    parts = sfdisk(disk, "label: dos\nstart=2048, size=1228800, type=83\nstart=1230848, type=83, bootable\n")
    usr_uuid = mkfs(disk, parts[0]["start"] * 512, parts[0]["size"] * 512, usr)
    (rootfs / "etc/fstab").write_text(f"# by hand\nUUID={usr_uuid} /usr ext4 defaults 0 2\n")
    mkfs(disk, parts[1]["start"] * 512, parts[1]["size"] * 512, rootfs)
    rootfs.joinpath("usr").rmdir()
    usr.rename(rootfs / "usr")


def small_tree(root: Path) -> None:
    """What a faithful reader must keep: set-uid, sticky, owners, a capability, hard and symbolic links."""
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text("ID=debian\nVERSION_ID=12\n")
    (root / "usr/bin").mkdir(parents=True)
    for name, mode in (("su", 0o4755), ("wall", 0o2755), ("ping", 0o755)):
        (root / "usr/bin" / name).write_bytes(os.urandom(5000))
        os.chmod(root / "usr/bin" / name, mode)
    sh("setcap", "cap_net_raw+ep", root / "usr/bin/ping")
    os.link(root / "usr/bin/su", root / "usr/bin/su-again")
    (root / "tmp").mkdir(mode=0o1777)
    os.chmod(root / "tmp", 0o1777)
    (root / "home/user").mkdir(parents=True)
    (root / "home/user/notes").write_text("mine\n")
    os.chown(root / "home/user", 1000, 1000)
    os.chown(root / "home/user/notes", 1000, 1001)
    os.symlink("/usr/bin/su", root / "home/user/link")
    os.chown(root / "home/user/link", 1000, 1000, follow_symlinks=False)
    (root / "boot").mkdir()
    os.mkfifo(root / "fifo")


def lvm_gpt(tree: Path, boot_tree: Path, disk: Path, work: Path) -> None:
    """GPT: an ext4 without a root on partition 1, an LVM PV on partition 2 with LVs `data`, `boot`
    and `root` (root in two segments), made by lvm2 itself on a loop device (detached after)."""
    disk.write_bytes(b"")
    os.truncate(disk, 160 * MiB)
    parts = sfdisk(
        disk, "label: gpt\nstart=2048, size=40960, type=L\nstart=43008, size=270336, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n"
    )
    empty = work / "empty"
    empty.mkdir()
    mkfs(disk, parts[0]["start"] * 512, parts[0]["size"] * 512, empty)
    pv_offset, pv_size = parts[1]["start"] * 512, parts[1]["size"] * 512
    loop = sh("losetup", "--find", "--show", "--offset", pv_offset, "--sizelimit", pv_size, disk).stdout.strip()
    lvm = ["--config", LVM_CONFIG]
    try:
        sh("pvcreate", *lvm, "-ff", "-y", loop)
        sh("vgcreate", *lvm, "-s", "1M", VG, loop)
        for name, size in (("data", "8M"), ("root", "40M"), ("boot", "8M")):
            sh("lvcreate", *lvm, "-an", "-Zn", "-L", size, "-n", name, VG)
        sh("lvextend", *lvm, "-L", "+24M", f"{VG}/root")  # a second segment, after boot's
        pe_start = int(sh("pvs", *lvm, "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", loop).stdout)
        segments = sh("lvs", *lvm, "--noheadings", "-o", "lv_name,seg_pe_ranges", VG).stdout.split("\n")
    finally:
        sh("losetup", "-d", loop)
    ranges: dict[str, list[tuple[int, int]]] = {}
    for line in segments:
        if line.strip():
            name, pe_range = line.split()
            first, last = pe_range.rsplit(":", 1)[1].split("-")
            ranges.setdefault(name, []).append((pv_offset + pe_start + int(first) * MiB, (int(last) - int(first) + 1) * MiB))
    assert len(ranges["root"]) == 2, segments
    mkfs(disk, ranges["data"][0][0], ranges["data"][0][1], empty)
    mkfs(disk, ranges["boot"][0][0], ranges["boot"][0][1], boot_tree)
    mapper = VG.replace("-", "--")
    (tree / "etc/fstab").write_text(f"/dev/mapper/{mapper}-root / ext4 defaults 0 1\n/dev/{VG}/boot /boot ext4 defaults 0 2\n")
    root_fs = work / "root.ext4"
    root_fs.write_bytes(b"")
    os.truncate(root_fs, sum(length for _o, length in ranges["root"]))
    mkfs(root_fs, 0, root_fs.stat().st_size, tree)
    with open(root_fs, "rb") as source, open(disk, "r+b") as target:
        for offset, length in ranges["root"]:
            target.seek(offset)
            target.write(source.read(length))
    root_fs.unlink()


def sums(directory: Path) -> None:
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in sorted(directory.iterdir()) if p.name != "SHA256SUMS"]
    (directory / "SHA256SUMS").write_text("".join(lines))


@pytest.fixture(scope="module")
def disks(static_server: StaticServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """promoted/: the shared prepared bookworm promoted to raw, then qemu-img converted; served/: the
    hand-made MBR disk xz-compressed, with a SHA256SUMS; lvm/: the GPT + LVM disk and its tree."""
    from racker import promote

    work = tmp_path_factory.mktemp("disks")
    with in_store(SHARED_HOME):
        from racker import images, prepare

        vm_image = prepare.prepare(images.pull("debian-bookworm"))
        raw = promote.cached_disk(vm_image)  # racker promote's raw output, kept in the shared store
        vm_rootfs = store.image_dir(vm_image.digest) / "rootfs"
    promoted = work / "promoted"
    promoted.mkdir()
    # A copy, not a link: a link's ctime moves whenever another test links the cached disk, and tar
    # then says "file changed as we read it".
    sh("cp", "--sparse=always", raw, promoted / "disk.raw")
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", promoted / "disk.raw", promoted / "disk.qcow2")
    with open(promoted / "disk.tar.gz", "wb") as out:  # GCE's layout, as promote --format gce packs it
        tar = subprocess.Popen(["tar", "--format=oldgnu", "--sparse", "-cf", "-", "-C", promoted, "disk.raw"], stdout=subprocess.PIPE)
        subprocess.run(["gzip", "-1"], stdin=tar.stdout, stdout=out, check=True)
        assert tar.wait() == 0

    rootfs = work / "bookworm"
    unpack_rootfs("debian-bookworm", rootfs, work)
    served = static_server.root / "disks"
    served.mkdir()
    hand = work / "hand.raw"
    hand_made_mbr(rootfs, hand)
    sh("xz", "-0", "-T2", hand)
    (work / "hand.raw.xz").rename(served / "hand.raw.xz")
    sums(served)

    tree, boot_tree = work / "small", work / "small-boot"
    small_tree(tree)
    boot_tree.mkdir()
    (boot_tree / "vmlinuz-6.1.0-test").write_bytes(os.urandom(3000))
    lvm_gpt(tree, boot_tree, work / "lvm.raw", work)
    return {
        "promoted": promoted,
        "vm_rootfs": vm_rootfs,
        "bookworm": rootfs,
        "url": f"{static_server.url}/disks/hand.raw.xz",
        "lvm": work / "lvm.raw",
        "small": tree,
        "small_boot": boot_tree,
        "work": work,
    }


def test_promoted_disks_in_every_format_pull_back_to_the_same_files(disks: dict, private_store: dict) -> None:
    promoted = disks["promoted"]
    first = _pulled(f"file:{promoted / 'disk.raw'}")
    assert first.manifest["disk"]["format"] == "raw" and first.manifest["disk"]["table"] == "dos"
    with store.reading(first) as rootfs:
        pulled = listing(rootfs, skip=(*PROMOTE_ADDS, "etc/fstab"))
    source = listing(disks["vm_rootfs"], skip=("etc/fstab", "etc/hostname", "etc/machine-id"))
    pulled.pop("etc/machine-id")  # emptied by normalise
    assert_same(source, pulled)
    for name, fmt in (("disk.qcow2", "qcow2"), ("disk.tar.gz", "raw")):  # vmdk, vhdx, vdi: on the small LVM disk below
        image = _pulled(f"file:{promoted / name}")
        assert image.digest == first.digest, name
        assert image.manifest["disk"]["format"] == fmt
    assert sorted(p.name for p in promoted.iterdir()) == ["disk.qcow2", "disk.raw", "disk.tar.gz"]


def test_a_hand_made_disk_over_https_with_a_separate_usr_boots_and_passes_checks(
    disks: dict, static_server: StaticServer, private_store: dict, monkeypatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(static_server.ca))
    image = _pulled(disks["url"])
    fields = image.manifest["disk"]
    assert (fields["compression"], fields["table"], fields["root"], fields["merged"]) == ("xz", "dos", "partition 2", ["/usr"])
    assert fields["verified_by"] == "SHA256SUMS"
    with store.reading(image) as rootfs:
        pulled = listing(rootfs, skip=("lost+found", "usr/lost+found", "etc/fstab"))
        assert (rootfs / "etc/fstab").read_text().splitlines()[1].startswith("# racker: merged into the root filesystem: UUID=")
    assert_same(
        listing(disks["bookworm"], skip=("etc/fstab", "etc/hostname", "etc/machine-id")),
        {k: v for k, v in pulled.items() if k != "etc/machine-id"},
    )
    passes_checks(disks["url"], env={"SSL_CERT_FILE": str(static_server.ca)})


def test_a_gpt_disk_with_lvm_root_in_two_segments_and_boot_in_an_lv(disks: dict, private_store: dict, tmp_path: Path) -> None:
    image = _pulled(f"file:{disks['lvm']}")
    fields = image.manifest["disk"]
    assert (fields["table"], fields["root"], fields["merged"]) == ("gpt", f"LV {VG}/root", ["/boot"])
    with store.reading(image) as rootfs:
        pulled = listing(rootfs, skip=("lost+found", "boot/lost+found", "etc/fstab"))
        assert (rootfs / "etc/fstab").read_text().splitlines()[
            1
        ] == f"# racker: merged into the root filesystem: /dev/{VG}/boot /boot ext4 defaults 0 2"
    source = listing(disks["small"], skip=("fifo", "etc/fstab"))  # a FIFO is skipped, as the extractor skips it
    source.update({f"boot/{k}": v for k, v in listing(disks["small_boot"]).items()})
    pulled["etc/machine-id"] = source["etc/machine-id"] = None  # type: ignore[assignment]  # written by normalise
    assert_same(source, pulled)
    with store.reading(image) as rootfs:
        assert os.stat(rootfs / "usr/bin/su").st_ino == os.stat(rootfs / "usr/bin/su-again").st_ino
    for fmt, options in (("vmdk", ("-o", "subformat=monolithicSparse")), ("vhdx", ()), ("vdi", ()), ("vpc", ())):
        converted = tmp_path / f"disk.{fmt}"
        sh("qemu-img", "convert", "-f", "raw", "-O", fmt, *options, disks["lvm"], converted)
        again = _pulled(f"file:{converted}")
        assert again.digest == image.digest and again.manifest["disk"]["format"] == {"vpc": "vhd"}.get(fmt, fmt)


# -- bad input ---------------------------------------------------------------------------------


def _bad_disks(directory: Path, disks: dict) -> None:
    outside = directory.parent / "outside"
    outside.mkdir(exist_ok=True)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", directory / "backing.qcow2", "1M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={outside / 'data.raw'}", directory / "data-file.qcow2", "16M")
    (directory / "extent.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n'
        'RW 2048 FLAT "../../etc/shadow" 0\n\nddb.adapterType = "ide"\n'
    )
    no_root = directory / "no-root.raw"
    no_root.write_bytes(b"")
    os.truncate(no_root, 48 * MiB)
    parts = sfdisk(no_root, "label: dos\nstart=2048, type=83\n")
    empty = directory.parent / "empty-tree"
    empty.mkdir(exist_ok=True)
    (empty / "hello").write_text("no os-release here\n")
    mkfs(no_root, parts[0]["start"] * 512, parts[0]["size"] * 512, empty)
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", disks["lvm"], directory / "whole.qcow2")
    whole = (directory / "whole.qcow2").read_bytes()
    (directory / "truncated.qcow2").write_bytes(whole[: len(whole) // 2])
    (directory / "whole.qcow2").unlink()
    lvm_raw = disks["lvm"].read_bytes()
    (directory / "truncated.raw").write_bytes(lvm_raw[: len(lvm_raw) // 2])
    (directory / "unknown.raw.lzma").write_bytes(b"\x5d\x00\x00\x80\x00" + os.urandom(1 << 16))


BAD = [
    ("backing.qcow2", "is a qcow2 with a backing file: refused"),
    ("data-file.qcow2", "is a qcow2 with an external data file: refused"),
    ("extent.vmdk", "names an extent outside its own directory (../../etc/shadow): refused"),
    ("no-root.raw", "holds no Linux root filesystem"),
    ("truncated.qcow2", "is a truncated or corrupt qcow2 image"),
    ("truncated.raw", "the image is truncated or corrupt"),
    ("unknown.raw.lzma", "neither a tar archive nor compressed with a known method"),
]


@pytest.fixture(scope="module")
def bad_disks(disks: dict, static_server: StaticServer) -> Path:
    directory = disks["work"] / "bad" / "inside"
    directory.mkdir(parents=True)
    _bad_disks(directory, disks)
    served = static_server.root / "bad-disks"
    served.mkdir()
    os.link(directory / "no-root.raw", served / "no-root.raw")
    sums(served)
    return directory


def _loops(bad_disks: Path) -> list[str]:
    """This test's loop devices: of its files, or of its store (another worker's are not its business)."""
    return loop_devices(bad_disks.parent, os.environ["RACKER_HOME"])


@pytest.mark.parametrize(("name", "said"), BAD, ids=[n for n, _ in BAD])
def test_a_bad_disk_is_one_line_and_leaves_nothing(bad_disks: Path, private_store: dict, name: str, said: str) -> None:
    before, loops = sorted(p.name for p in bad_disks.iterdir()), _loops(bad_disks)
    result = racker("pull", f"file:{bad_disks / name}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("racker: error:")]
    assert result.returncode == 125 and len(errors) == 1 and said in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert store.images() == []
    assert [p.name for p in (store.home() / "tmp").iterdir()] == [".new"]
    assert sorted(p.name for p in bad_disks.iterdir()) == before and _loops(bad_disks) == loops
    if name == "data-file.qcow2":
        assert not (bad_disks.parent / "outside" / "data.raw").read_bytes().strip(b"\0"), "nothing written to the data file"


def test_a_bad_download_is_dropped_from_the_cache(bad_disks: Path, static_server: StaticServer, private_store: dict, monkeypatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(static_server.ca))
    result = racker("pull", f"{static_server.url}/bad-disks/no-root.raw")
    assert result.returncode == 125 and "holds no Linux root filesystem" in result.stderr, result.stderr
    assert store.images() == []
    assert not [p for p in (store.home() / "downloads").rglob("*") if p.is_file()]


def test_a_tarball_is_still_a_tarball(tmp_path: Path, private_store: dict) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text("ID=debian\nVERSION_ID=12\n")
    with tarfile.open(tmp_path / "root.tar.gz", "w:gz") as archive:
        archive.add(tree, arcname=".")
    image = _pulled(f"file:{tmp_path / 'root.tar.gz'}")
    assert image.manifest["tarball"]["compression"] == "gzip"
