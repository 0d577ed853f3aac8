"""https:, http: and file: references: the file is fetched (downloaded and verified, or read where
it is), then told apart by its content, never by its name:

    a disk image (raw, qcow2, vmdk, vhd, vhdx, vdi; compressed; GCE's disk.raw in a tar) ──▶ disk
    a tar starting with a VM package's file ──packaged──▶ a Vagrant box (metadata.json) ──▶ vagrant
                                                      └──▶ else an OVA (.ovf, disks, .mf) ──▶ ova
    anything else ──▶ tarball (a root tarball, or one clear error for bytes racker does not know)

A `#provider=NAME` fragment chooses a box's provider (the box must be that one).
A download whose content turns out unusable is dropped from the cache, so that a
failed pull leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

from racker.errors import BadArchive, BadDisk, BadReference
from racker.sources import disk, diskfile, download, ova, packaged, tarball, vagrant
from racker.store.catalog import CatalogEntry
from racker.store.refs import Reference


def recipe(ref: Reference) -> str:
    base, provider = vagrant.split_provider(ref)
    return tarball.recipe(base) + (f" provider={provider}" if provider else "")


def upstream_state(ref: Reference, entry: CatalogEntry | None = None, stored: dict | None = None) -> str | None:
    """A download's: its SHA256SUMS line or pin (tarball.upstream_state), whatever the file turns out to hold."""
    return tarball.upstream_state(vagrant.split_provider(ref)[0], entry, stored)


def acquire(ref: Reference, entry: CatalogEntry | None, rootfs: Path) -> dict:
    ref, provider = vagrant.split_provider(ref)
    path, fields = tarball.obtain(ref, rootfs.parent)
    name = fields.get("url") or str(path)
    try:
        if diskfile.is_disk(path):
            found = disk.unpack(path, rootfs, name=name)
            return {"disk": {**fields, **found["disk"]}}
        if packaged.is_package(path):
            return _package(path, rootfs, fields, name, provider)
        if provider is not None:
            raise BadReference(f"{name} is no Vagrant box: #provider={provider} chooses a box's provider")
        fields["compression"] = tarball.unpack(path, rootfs, name=name)
        return {"tarball": fields}
    except (BadArchive, BadDisk, BadReference):
        if "sha256" in fields:
            download.forget(fields["sha256"])
        raise


def _package(path: Path, rootfs: Path, fields: dict, name: str, provider: str | None) -> dict:
    """A Vagrant box or an OVA: unpacked flat beside `rootfs`, then read as what it holds."""
    directory = rootfs.parent / "package"
    compressed = packaged.unpack(path, directory, name=name)
    if packaged.is_box(directory):
        found = vagrant.unpack_dir(directory, rootfs, name=name, provider=provider)
        return {"box": {**fields, "compression": compressed, **found["box"]}}
    if provider is not None:
        raise BadReference(f"{name} is an OVA, not a Vagrant box: #provider={provider} chooses a box's provider")
    found = ova.unpack_dir(directory, rootfs, name=name)
    return {"ova": {**fields, **found["ova"]}}
