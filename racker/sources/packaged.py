"""Packaged VMs: Vagrant boxes and OVAs, tars of a few plain files (descriptor, metadata, disks;
a box from `vagrant package` also an include/ directory its Vagrantfile loads), told from root
tarballs by their first file and unpacked (plain files and directories only) into a directory of their own.

    first file metadata.json, Vagrantfile, info.json, *.img, *.vmdk, *.ovf, *.mf, include/… ──▶ a VM package
    unpacked: metadata.json there ──▶ a Vagrant box (vagrant.py); else ──▶ an OVA (ova.py)

A root tarball never starts with those at its top: its first file is under a directory.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from racker import progress
from racker.sources import compression, extract

NAMES = ("metadata.json", "Vagrantfile", "info.json")
SUFFIXES = (".img", ".vmdk", ".ovf", ".mf", ".qcow2")
INCLUDE = "include/"  # `vagrant package --include`/`--vagrantfile` files: no root tarball has such a top directory
BOX_EXTRAS = (*NAMES, INCLUDE.rstrip("/"))  # what a box holds besides its provider's files
HEAD = 64 << 10  # enough for the headers before the first file (a `./` entry, pax headers)


def first_file(path: Path) -> str | None:
    """The name of the first non-directory member of the (compressed) tar at `path`, or None."""
    head = compression.head(path, HEAD)
    try:
        with tarfile.open(fileobj=io.BytesIO(head), mode="r:") as archive:
            while (member := archive.next()) is not None:
                if not member.isdir():
                    return member.name
    except (tarfile.TarError, EOFError, OSError):
        return None
    return None


def is_package(path: Path) -> bool:
    name = first_file(path)
    if name is None:
        return False
    name = name.removeprefix("./")
    return name.startswith(INCLUDE) or ("/" not in name and (name in NAMES or name.endswith(SUFFIXES)))


def unpack(path: Path, directory: Path, *, name: str) -> str:
    """The package's files into the new `directory`, refused unless each is a plain file or directory; its compression."""
    directory.mkdir()
    with progress.step(f"unpacking {name}"), compression.decompressed(path, name=name) as (kind, stream):
        extract.extract(stream, directory, plain=True, name=name)
    return kind


def is_box(directory: Path) -> bool:
    return (directory / "metadata.json").is_file()
