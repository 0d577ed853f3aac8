"""Choosing from Vagrant box metadata and reading OVA manifests and descriptors: no server, no disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from racker.errors import BadArchive, BadReference
from racker.sources import ova, vagrant
from racker.store import refs

VERSIONS = {
    "versions": [
        {"version": "1.9.0", "status": "active", "providers": [{"name": "virtualbox"}]},
        {"version": "1.10.0", "status": "active", "providers": [{"name": "virtualbox"}, {"name": "libvirt", "architecture": "arm64"}]},
        {"version": "2.0.0", "status": "unreleased", "providers": [{"name": "libvirt"}]},
    ]
}


def test_the_newest_active_version_is_chosen_by_number_not_text() -> None:
    assert vagrant.choose_version(VERSIONS, None, "vagrant:a/b")["version"] == "1.10.0"
    assert vagrant.choose_version(VERSIONS, "1.9.0", "vagrant:a/b")["version"] == "1.9.0"
    with pytest.raises(BadReference, match=r"has no version 2.0.0 \(versions: 1.9.0, 1.10.0\)"):
        vagrant.choose_version(VERSIONS, "2.0.0", "vagrant:a/b")


def test_libvirt_is_preferred_but_only_for_this_hosts_architecture() -> None:
    both = {"providers": [{"name": "virtualbox"}, {"name": "libvirt", "architecture": "amd64"}]}
    assert vagrant.choose_provider(both, None, "x")["name"] == "libvirt"
    newest = vagrant.choose_version(VERSIONS, None, "x")
    assert vagrant.choose_provider(newest, None, "x")["name"] == "virtualbox"  # its libvirt box is arm64
    with pytest.raises(BadReference, match=r"has no libvirt box \(providers: virtualbox\)"):
        vagrant.choose_provider(newest, "libvirt", "x")
    with pytest.raises(BadReference, match="has no box racker reads"):
        vagrant.choose_provider({"providers": [{"name": "hyperv"}]}, None, "x")


def test_the_provider_fragment_leaves_a_pin_in_place() -> None:
    ref = refs.parse(f"https://host/a.box#sha256={'a' * 64}&provider=libvirt")
    base, provider = vagrant.split_provider(ref)
    assert (str(base), provider) == (f"https://host/a.box#sha256={'a' * 64}", "libvirt")
    assert vagrant.split_provider(refs.parse("file:/a.box")) == (refs.parse("file:/a.box"), None)


def _ova(directory: Path, files: dict[str, bytes], algorithm: str = "SHA1") -> None:
    directory.mkdir()
    lines = []
    for name, data in files.items():
        (directory / name).write_bytes(data)
        lines.append(f"{algorithm}({name})= {hashlib.new(algorithm.lower(), data).hexdigest()}\n")
    (directory / "vm.mf").write_text("".join(lines))


def test_a_manifest_must_list_every_member_with_its_digest(tmp_path: Path) -> None:
    _ova(tmp_path / "good", {"vm.ovf": b"<x/>", "disk.vmdk": b"disk"})
    assert ova.verify_manifest(tmp_path / "good", "good.ova") == "SHA1"
    _ova(tmp_path / "extra", {"vm.ovf": b"<x/>"})
    (tmp_path / "extra/disk.vmdk").write_bytes(b"unlisted")
    with pytest.raises(BadArchive, match=r"disk.vmdk not in the manifest vm.mf: refused"):
        ova.verify_manifest(tmp_path / "extra", "extra.ova")
    _ova(tmp_path / "changed", {"vm.ovf": b"<x/>", "disk.vmdk": b"disk"}, "SHA256")
    (tmp_path / "changed/disk.vmdk").write_bytes(b"DISK")
    with pytest.raises(BadArchive, match=r"disk\.vmdk does not match the manifest: SHA256"):
        ova.verify_manifest(tmp_path / "changed", "changed.ova")


OVF = """<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/2" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/2">
<References><File ovf:id="f1" ovf:href="{href}"/></References>
<DiskSection><Disk ovf:diskId="d1" ovf:fileRef="f1"/></DiskSection></Envelope>"""


@pytest.mark.parametrize("href", ["../disk.vmdk", "/etc/shadow", "sub/disk.vmdk", "file:///etc/shadow"])
def test_a_descriptor_naming_a_disk_outside_the_ova_is_refused(tmp_path: Path, href: str) -> None:
    (tmp_path / "vm.ovf").write_text(OVF.format(href=href))
    with pytest.raises(BadArchive, match="names a disk outside the OVA"):
        ova.first_disk(tmp_path / "vm.ovf", "vm.ova")


def test_the_first_disk_of_an_ovf_2_descriptor(tmp_path: Path) -> None:
    (tmp_path / "vm.ovf").write_text(OVF.format(href="disk.vmdk"))
    (tmp_path / "disk.vmdk").write_bytes(b"x")
    assert ova.first_disk(tmp_path / "vm.ovf", "vm.ova") == (tmp_path / "disk.vmdk", 1)
