"""https:, http: and file: references: the file is fetched (downloaded and verified, or read where
it is), then told apart by its content, never by its name:

    a disk image (raw, qcow2, vmdk, vhd, vhdx, vdi; compressed; GCE's disk.raw in a tar) ──▶ disk
    anything else ──▶ tarball (a root tarball, or one clear error for bytes racker does not know)

A download whose content turns out unusable is dropped from the cache, so that a
failed pull leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

from racker import download
from racker.catalog import CatalogEntry
from racker.errors import BadArchive, BadDisk
from racker.refs import Reference
from racker.sources import disk, diskfile, tarball

recipe = tarball.recipe


def acquire(ref: Reference, entry: CatalogEntry | None, rootfs: Path) -> dict:
    path, fields = tarball.obtain(ref, rootfs.parent)
    name = fields.get("url") or str(path)
    try:
        if diskfile.is_disk(path):
            found = disk.unpack(path, rootfs, name=name)
            return {"disk": {**fields, **found["disk"]}}
        fields["compression"] = tarball.unpack(path, rootfs, name=name)
        return {"tarball": fields}
    except (BadArchive, BadDisk):
        if "sha256" in fields:
            download.forget(fields["sha256"])
        raise
