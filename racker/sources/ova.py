"""OVA files (`file:vm.ova`, `https://…/vm.ova`), and the OVF descriptor a VirtualBox box holds too.

.ova (a tar: the .ovf first, the disks, a .mf manifest)
    ──extract (plain files and directories, nothing else)──▶ a work directory holding only the OVA's members
    ──flat──▶ an OVA's members are files at its top (a box may carry an include/ directory besides)
    ──manifest──▶ every member's SHA1/SHA256 checked against the .mf, before any disk is read
    ──descriptor──▶ the first disk the .ovf names (References/File of DiskSection/Disk)
    ──disk──▶ the root filesystem, as from any disk image (a vmdk's extents must be OVA members)
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from racker import progress, untrusted
from racker.errors import BadArchive
from racker.sources import disk

MANIFEST_LINE = re.compile(r"^(?P<algorithm>SHA1|SHA256|SHA512)\s*\((?P<name>[^)]+)\)\s*=\s*(?P<hex>[0-9a-fA-F]+)$")
ALGORITHMS = {"SHA1": hashlib.sha1, "SHA256": hashlib.sha256, "SHA512": hashlib.sha512}
UNLISTED = (".mf", ".cert")  # the manifest and its signature vouch for the rest, not for themselves
CHUNK = 1 << 20


def unpack_dir(directory: Path, rootfs: Path, *, name: str, besides: tuple[str, ...] = ()) -> dict:
    """The root filesystem of the OVA unpacked in `directory` into the new `rootfs`; manifest fields.
    `besides`: files that are not the OVF's (a box's metadata.json, its include/), which no manifest
    lists; a box needs no manifest either (its own checksum vouches for it)."""
    if nested := sorted(p.name for p in directory.iterdir() if p.is_dir() and p.name not in besides):
        raise BadArchive(f"{name}: {nested[0]}/ is a directory: an OVA holds files at its top only")
    descriptors = sorted(p for p in directory.iterdir() if p.suffix == ".ovf")
    if len(descriptors) != 1:
        raise BadArchive(f"{name} holds {len(descriptors)} OVF descriptors (.ovf); an OVA has one")
    verified = verify_manifest(directory, name, besides)
    disk_file, count = first_disk(descriptors[0], name)
    found = disk.unpack(disk_file, rootfs, name=f"{name}: {disk_file.name}")
    return {"ova": {"descriptor": descriptors[0].name, "disk_file": disk_file.name, "disks": count, "manifest": verified, **found["disk"]}}


def verify_manifest(directory: Path, name: str, besides: tuple[str, ...] = ()) -> str:
    """BadArchive unless the .mf lists every other member with the digest it has; the algorithms used.
    An OVA without a manifest is read with a warning (the OVF standard makes it optional)."""
    manifests = [p for p in directory.iterdir() if p.suffix == ".mf"]
    if not manifests:
        if besides:
            return "none"
        progress.warn(f"{name} has no manifest (.mf): its members are not checked")
        return "none"
    if len(manifests) > 1:
        raise BadArchive(f"{name} holds {len(manifests)} manifests (.mf); an OVA has one")
    listed: dict[str, tuple[str, str]] = {}
    for line in manifests[0].read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        match = MANIFEST_LINE.match(line.strip())
        if match is None:
            raise BadArchive(f"{name}: {manifests[0].name} has a line that is no checksum: {line.strip()[:80]!r}")
        listed[match["name"]] = (match["algorithm"], match["hex"].lower())
    members = {p.name for p in directory.iterdir() if p.suffix not in UNLISTED and p.name not in besides}
    if unlisted := sorted(members - set(listed)):
        raise BadArchive(f"{name}: {', '.join(unlisted)} not in the manifest {manifests[0].name}: refused")
    if missing := sorted(set(listed) - members):
        raise BadArchive(f"{name}: the manifest lists {', '.join(missing)}, which the OVA does not hold")
    with progress.step(f"checking {name} against its manifest"):
        for member, (algorithm, want) in sorted(listed.items()):
            got = _digest(directory / member, algorithm)
            if got != want:
                raise BadArchive(f"{name}: {member} does not match the manifest: {algorithm} {got}, expected {want}")
    return "+".join(sorted({algorithm for algorithm, _ in listed.values()}))


def _digest(path: Path, algorithm: str) -> str:
    hasher = ALGORITHMS[algorithm]()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def first_disk(descriptor: Path, name: str) -> tuple[Path, int]:
    """(the file of the first disk an OVF descriptor names, how many disks it names); it must sit beside the descriptor."""
    envelope = untrusted.load_xml(descriptor, name=f"{name}: the OVF descriptor {descriptor.name}")
    files = {_attribute(e, "id"): _attribute(e, "href") for e in envelope.iter() if _local(e.tag) == "File"}
    disks = [_attribute(e, "fileRef") for e in envelope.iter() if _local(e.tag) == "Disk"]
    if not disks:
        raise BadArchive(f"{name}: {descriptor.name} names no disk (no DiskSection/Disk)")
    href = files.get(disks[0])
    if not href:
        raise BadArchive(f"{name}: {descriptor.name}'s first disk refers to file {disks[0]!r}, which References does not list")
    if "/" in href or "\\" in href or href in (".", "..") or ":" in href:
        raise BadArchive(f"{name}: {descriptor.name} names a disk outside the OVA ({href}): refused")
    path = descriptor.parent / href
    if path.is_symlink() or not path.is_file():
        raise BadArchive(f"{name}: {descriptor.name} names the disk {href}, which the OVA does not hold")
    return path, len(disks)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attribute(element: ElementTree.Element, wanted: str) -> str:
    """An attribute by its local name: ovf:href in OVF 1.x and 2.x namespaces alike."""
    return next((value for key, value in element.attrib.items() if _local(key) == wanted), "")
