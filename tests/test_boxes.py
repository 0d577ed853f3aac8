"""Vagrant boxes and OVAs pulled into the store: a libvirt box (qcow2) through a Vagrant Cloud
metadata API the test serves, a VirtualBox box and an OVA (OVF + vmdk + .mf), all
made from one promoted bookworm disk with a marker file written into it; and every bad box or OVA
one clear line that leaves nothing behind."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import SHARED_HOME, StaticServer, in_store, loop_devices, passes_checks, racker
from conftest import pulled as _pulled
from racker import store

pytestmark = pytest.mark.slow

MARKER = "etc/racker-box-marker"
VAGRANTFILE = 'Vagrant.configure("2") do |config|\nend\n'
INCLUDING = (  # the Vagrantfile `vagrant package --vagrantfile` writes
    'include_vagrantfile = File.expand_path("../include/_Vagrantfile", __FILE__)\n'
    "load include_vagrantfile if File.exist?(include_vagrantfile)\n"
)
OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope ovf:version="1.0" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References><File ovf:id="file1" ovf:href="{disk}"/></References>
  <DiskSection><Info>disks</Info>
    <Disk ovf:capacity="{capacity}" ovf:diskId="vmdisk1" ovf:fileRef="file1"
          ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#sparse"/>
  </DiskSection>
  <VirtualSystem ovf:id="racker-test"><Info>a test VM</Info></VirtualSystem>
</Envelope>
"""


def sh(*argv: object, input: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, input=input)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done


def sha(path: Path, algorithm: str = "sha256") -> str:
    return hashlib.new(algorithm, path.read_bytes()).hexdigest()


def pack(archive: Path, directory: Path, names: list[str], *, gzip: bool = False) -> None:
    """A tar of `names` in `directory`, in that order, as GNU tar writes them (gzipped if asked)."""
    sh("tar", "-czf" if gzip else "-cf", archive, "-C", directory, *names)


def ova(directory: Path, disk: Path, out: Path, *, algorithm: str = "SHA256", wrong: bool = False) -> None:
    """An OVA: vm.ovf first, the disk, then vm.mf with each file's digest (one of them wrong if asked)."""
    directory.mkdir()
    os.link(disk, directory / disk.name)
    (directory / "vm.ovf").write_text(OVF.format(disk=disk.name, capacity=1 << 31))
    lines = []
    for name in ("vm.ovf", disk.name):
        digest = sha(directory / name, algorithm.lower())
        lines.append(f"{algorithm}({name})= {'0' * len(digest) if wrong and name == disk.name else digest}\n")
    (directory / "vm.mf").write_text("".join(lines))
    pack(out, directory, ["vm.ovf", disk.name, "vm.mf"])


def box(directory: Path, provider: str, files: dict[str, Path], out: Path, *, gzip: bool = False, include: bool = False) -> None:
    """A Vagrant box: metadata.json, a Vagrantfile, and the provider's files (linked in); with `include`,
    as `vagrant package --vagrantfile` makes one: the Vagrantfile loads include/_Vagrantfile."""
    directory.mkdir()
    metadata = {"provider": provider, **({"format": "qcow2", "virtual_size": 2} if provider == "libvirt" else {})}
    (directory / "metadata.json").write_text(json.dumps(metadata))
    (directory / "Vagrantfile").write_text(INCLUDING if include else VAGRANTFILE)
    if include:
        (directory / "include/scripts").mkdir(parents=True)
        (directory / "include/_Vagrantfile").write_text(VAGRANTFILE)
        (directory / "include/scripts/setup.sh").write_text("#!/bin/sh\n")
    for name, source in files.items():
        os.link(source, directory / name)
    pack(out, directory, ["metadata.json", "Vagrantfile", *(["include"] if include else []), *files], gzip=gzip)


def api(static_server: StaticServer, box_name: str, versions: list[dict]) -> None:
    """What a Vagrant Cloud answers to GET /api/v2/box/racker/NAME."""
    path = static_server.root / "api/v2/box/racker" / box_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"tag": f"racker/{box_name}", "versions": versions}))


def provider(name: str, url: str, box_file: Path, checksum_type: str = "sha1", checksum: str | None = None) -> dict:
    digest = checksum or sha(box_file, checksum_type)
    return {"name": name, "download_url": url, "checksum_type": checksum_type, "checksum": digest, "architecture": "amd64"}


def disk(tree: Path, out: Path, size: int) -> None:
    """An MBR disk of `size` bytes whose one partition mkfs.ext4 -d fills from `tree` (no mount, no QEMU),
    then MARKER written in with debugfs."""
    out.write_bytes(b"")
    os.truncate(out, size)
    sh("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", out, input="label: dos\nstart=2048, type=83, bootable\n")
    start = json.loads(sh("sfdisk", "--json", out).stdout)["partitiontable"]["partitions"][0]["start"] * 512
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", f"offset={start}", "-d", tree, out, (size - start) // 4096)
    marker = out.with_suffix(".marker")
    marker.write_text("put there by test_boxes\n")
    sh("debugfs", "-w", "-R", f"write {marker} /{MARKER}", f"{out}?offset={start}")
    marker.unlink()


@pytest.fixture(scope="module")
def boxes(static_server: StaticServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A libvirt box of the shared debian-bookworm's files (served, in the metadata API as
    racker/bookworm 2.0.0); a VirtualBox box and an OVA (served, with a SHA256SUMS) of one small disk
    (an os-release and a few files: a second bookworm would cost a pull's time and prove nothing more)."""
    from racker import images

    work = tmp_path_factory.mktemp("boxes")
    with in_store(SHARED_HOME):
        bookworm = store.image_dir(images.pull("debian-bookworm").digest) / "rootfs"  # only read
    disk(bookworm, work / "bookworm.raw", 1 << 30)
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", work / "bookworm.raw", work / "box.img")
    (work / "bookworm.raw").unlink()
    small = work / "small"
    (small / "etc").mkdir(parents=True)
    (small / "etc/os-release").write_text("ID=debian\nVERSION_ID=12\n")
    (small / "usr/bin").mkdir(parents=True)
    (small / "usr/bin/tool").write_bytes(os.urandom(100_000))
    disk(small, work / "small.raw", 32 << 20)
    # monolithicSparse, not the streamOptimized OVAs usually hold: the same reader, without the deflate
    sh("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", work / "small.raw", work / "disk1.vmdk")
    served = static_server.root / "boxes"
    served.mkdir()
    box(work / "libvirt", "libvirt", {"box.img": work / "box.img"}, served / "libvirt.box")  # a plain tar: gzip costs 20 s
    (work / "box.img").unlink()
    os.link(work / "disk1.vmdk", work / "box-disk001.vmdk")
    (work / "box.ovf").write_text(OVF.format(disk="box-disk001.vmdk", capacity=32 << 20))
    vbox_files = {"box.ovf": work / "box.ovf", "box-disk001.vmdk": work / "box-disk001.vmdk"}
    box(work / "vbox", "virtualbox", vbox_files, work / "vbox.box", include=True)  # as `vagrant package` makes them
    ova(work / "ova", work / "disk1.vmdk", served / "vm.ova")
    shutil.rmtree(work / "ova")
    shutil.rmtree(work / "libvirt")
    (served / "SHA256SUMS").write_text(f"{sha(served / 'vm.ova')}  vm.ova\n")
    url = f"{static_server.url}/boxes"
    libvirt = provider("libvirt", f"{url}/libvirt.box", served / "libvirt.box")
    vbox = provider("virtualbox", f"{url}/vbox.box", work / "vbox.box", "sha256")
    api(
        static_server,
        "bookworm",
        [
            {"version": "1.0.0", "status": "active", "providers": [vbox]},
            {"version": "2.0.0", "status": "active", "providers": [vbox, libvirt]},
            {"version": "3.0.0", "status": "unreleased", "providers": [vbox, libvirt]},
        ],
    )
    return {"work": work, "small": small, "vbox": work / "vbox.box", "ova": f"{url}/vm.ova"}


@pytest.fixture
def served_env(static_server: StaticServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"SSL_CERT_FILE": str(static_server.ca), "RACKER_VAGRANT_SERVER": static_server.url}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_a_vagrant_box_through_the_metadata_api_boots_and_passes_checks(boxes: dict, served_env: dict, private_store: dict) -> None:
    image = _pulled("vagrant:racker/bookworm")
    fields = image.manifest["box"]
    assert (fields["box"], fields["version"], fields["provider"], fields["format"]) == ("racker/bookworm", "2.0.0", "libvirt", "qcow2")
    assert (fields["verified_by"], fields["compression"]) == ("metadata sha1", "tar")
    with store.reading(image) as rootfs:
        assert (rootfs / MARKER).read_text() == "put there by test_boxes\n"
        assert "ID=debian" in (rootfs / "usr/lib/os-release").read_text()
    passes_checks("vagrant:racker/bookworm", env=served_env)


def test_a_virtualbox_box_and_an_ova_of_one_disk_are_one_image(boxes: dict, served_env: dict, private_store: dict) -> None:
    vbox = _pulled(f"file:{boxes['vbox']}#provider=virtualbox")
    assert (vbox.manifest["box"]["provider"], vbox.manifest["box"]["format"]) == ("virtualbox", "vmdk")
    with store.reading(vbox) as rootfs:
        assert (rootfs / MARKER).read_text() == "put there by test_boxes\n"
        assert (rootfs / "etc/os-release").read_text() == (boxes["small"] / "etc/os-release").read_text()
        assert (rootfs / "usr/bin/tool").read_bytes() == (boxes["small"] / "usr/bin/tool").read_bytes()
    from_ova = _pulled(boxes["ova"])
    assert from_ova.digest == vbox.digest
    fields = from_ova.manifest["ova"]
    assert (fields["manifest"], fields["disk_file"], fields["verified_by"]) == ("SHA256", "disk1.vmdk", "SHA256SUMS")


# -- bad input ---------------------------------------------------------------------------------


def _tar(out: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(out, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def _bad(directory: Path, static_server: StaticServer) -> None:
    """Small artefacts: each fails before a disk would be read, so none needs a real one."""
    tiny = directory.parent / "tiny.img"
    sh("qemu-img", "create", "-q", "-f", "qcow2", tiny, "16M")
    ova(directory.parent / "mismatch", tiny, directory / "mismatch.ova", wrong=True)
    ovf = OVF.format(disk="disk.vmdk", capacity=1 << 20).encode()
    _tar(directory / "dotdot.ova", {"vm.ovf": ovf, "../escaped.vmdk": b"x"})
    _tar(directory / "absolute.ova", {"vm.ovf": ovf, "/tmp/racker-test-absolute.vmdk": b"x"})
    _tar(directory / "nested.ova", {"vm.ovf": ovf, "disks/disk.vmdk": b"x"})
    descriptor = (
        b'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n'
        b'RW 2048 FLAT "../../etc/shadow" 0\n\nddb.adapterType = "ide"\n'
    )
    mf = f"SHA256(vm.ovf)= {hashlib.sha256(ovf).hexdigest()}\nSHA256(disk.vmdk)= {hashlib.sha256(descriptor).hexdigest()}\n"
    _tar(directory / "extent.ova", {"vm.ovf": ovf, "disk.vmdk": descriptor, "vm.mf": mf.encode()})
    box(directory.parent / "libvirt", "libvirt", {"box.img": tiny}, directory / "libvirt.box", gzip=True)
    nowhere = {"name": "virtualbox", "download_url": f"{static_server.url}/nowhere.box", "checksum_type": "sha256", "checksum": "0" * 64}
    api(
        static_server,
        "versions",
        [
            {"version": "1.0.0", "status": "active", "providers": [nowhere]},
            {"version": "2.0.0", "status": "active", "providers": [nowhere, {**nowhere, "name": "libvirt"}]},
            {"version": "3.0.0", "status": "unreleased", "providers": [nowhere]},
        ],
    )
    broken = static_server.root / "broken"
    broken.mkdir()
    box(directory.parent / "broken", "libvirt", {"box.img": tiny}, broken / "broken.box", gzip=True)
    api(
        static_server,
        "broken",
        [
            {
                "version": "1.0",
                "providers": [provider("libvirt", f"{static_server.url}/broken/broken.box", broken / "broken.box", checksum="0" * 40)],
            }
        ],
    )


BAD = [
    ("file:{dir}/mismatch.ova", "tiny.img does not match the manifest: SHA256"),
    ("file:{dir}/dotdot.ova", "climbs out of the root with '..'"),
    ("file:{dir}/absolute.ova", "member '/tmp/racker-test-absolute.vmdk' has an absolute path: refused"),
    ("file:{dir}/nested.ova", "nested.ova: disks/ is a directory: an OVA holds files at its top only"),
    ("file:{dir}/extent.ova", "names an extent outside its own directory (../../etc/shadow): refused"),
    ("file:{dir}/libvirt.box#provider=virtualbox", "libvirt.box is a libvirt box, not virtualbox"),
    ("vagrant:racker/versions@9.9", "vagrant:racker/versions has no version 9.9 (versions: 1.0.0, 2.0.0)"),
    ("vagrant:racker/versions@3.0.0", "vagrant:racker/versions has no version 3.0.0 (versions: 1.0.0, 2.0.0)"),
    ("vagrant:racker/versions@1.0.0#provider=libvirt", "has no libvirt box (providers: virtualbox)"),
    ("vagrant:racker/versions#provider=hyperv", "racker reads libvirt and virtualbox boxes, not hyperv"),
    ("vagrant:racker/broken", "broken.box does not match its checksum: sha1 "),
    ("vagrant:racker/missing", "has no such box"),
]


@pytest.fixture(scope="module")
def bad_boxes(static_server: StaticServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bad-boxes") / "inside"
    directory.mkdir(parents=True)
    _bad(directory, static_server)
    return directory


def _loops(bad_boxes: Path) -> list[str]:
    """This test's loop devices: of its files, or of its store (another worker's are not its business)."""
    return loop_devices(bad_boxes.parent, os.environ["RACKER_HOME"])


@pytest.mark.parametrize(("reference", "said"), BAD, ids=[r.split("/")[-1] for r, _ in BAD])
def test_a_bad_box_or_ova_is_one_line_and_leaves_nothing(
    bad_boxes: Path, served_env: dict, private_store: dict, reference: str, said: str
) -> None:
    before, loops = sorted(p.name for p in bad_boxes.iterdir()), _loops(bad_boxes)
    result = racker("pull", reference.format(dir=bad_boxes))
    errors = [line for line in result.stderr.splitlines() if line.startswith("racker: error:")]
    assert result.returncode == 125 and len(errors) == 1 and said in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert store.images() == []
    assert [p.name for p in (store.home() / "tmp").iterdir()] == [".new"]
    downloads = store.home() / "downloads"
    assert not [p for p in downloads.rglob("*") if p.is_file()] if downloads.exists() else True
    assert sorted(p.name for p in bad_boxes.iterdir()) == before and _loops(bad_boxes) == loops
    assert not Path("/tmp/racker-test-absolute.vmdk").exists() and not (bad_boxes.parent / "escaped.vmdk").exists()
