"""Vagrant boxes: `vagrant:ORG/NAME[@VERSION]` from a Vagrant Cloud metadata API, and box files
(`file:NAME.box`, `https://…/NAME.box`), which fetched.py tells by their content and hands here.

    vagrant:ORG/NAME[@VERSION][#provider=P]
        ──GET {RACKER_VAGRANT_SERVER}/api/v2/box/ORG/NAME──▶ versions (the newest active one if none is named),
          each with providers: name, download_url (or url), checksum, checksum_type
        ──provider──▶ P if given, else libvirt, else virtualbox
        ──download──▶ the download cache, checked against the metadata's checksum
    a box (a tar, usually gzipped: metadata.json, Vagrantfile, the provider's disk)
        ──libvirt──▶ box.img (qcow2, or metadata.json's disks[0].path) ──disk──▶ the root filesystem
        ──virtualbox──▶ box.ovf ──▶ its first disk (a vmdk) ──disk──▶ the root filesystem

The provider is chosen with a `#provider=NAME` fragment, so that the reference alone names the image.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from dataclasses import replace
from pathlib import Path

from racker import progress, redact, settings, untrusted
from racker.errors import BadArchive, BadReference, DownloadError, RackerError
from racker.sources import disk, download, insecure, ova, packaged
from racker.sources.oci import is_loopback
from racker.store.catalog import CatalogEntry
from racker.store.refs import Reference

PROVIDERS = ("libvirt", "virtualbox")  # in the order racker prefers them
CHECKSUMS = {"md5": hashlib.md5, "sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}
ARCHITECTURES = ("amd64", "x86_64", "unknown", "")  # what this host boots; "" where the metadata says none
_FRAGMENT = re.compile(r"^provider=(?P<provider>[a-z0-9_-]+)$")
CHUNK = 1 << 20
METADATA_LIMIT = 1 << 20  # a box's metadata.json is a few lines


def server() -> str:
    """RACKER_VAGRANT_SERVER: the Vagrant Cloud (or a company mirror) that vagrant: references ask."""
    return settings.VAGRANT_SERVER.value().rstrip("/")


def split_provider(ref: Reference) -> tuple[Reference, str | None]:
    """(the reference without a `provider=NAME` in its fragment, NAME or None). Other fragment
    items (a `sha256=` pin) stay, joined by `&`."""
    base, sep, fragment = ref.target.partition("#")
    if not sep:
        return ref, None
    provider, rest = None, []
    for item in fragment.split("&"):
        match = _FRAGMENT.match(item)
        if match:
            provider = match["provider"]
        else:
            rest.append(item)
    target = base + (f"#{'&'.join(rest)}" if rest else "")
    return replace(ref, target=target), provider


def recipe(ref: Reference) -> str:
    return str(ref)


def _metadata(box: str, timeout: float = download.TIMEOUT) -> dict:
    """The box's metadata from the server: its versions and their providers."""
    metadata_url = f"{server()}/api/v2/box/{box}"
    plain_ok = insecure() or is_loopback(urllib.parse.urlsplit(metadata_url).netloc)
    shown_server = redact.url(server())  # RACKER_VAGRANT_SERVER may hold credentials: sent, never shown
    with progress.step(f"asking {shown_server} for {box}"):
        try:
            answer = download.fetch_small(metadata_url, plain_ok=plain_ok, timeout=timeout)
        except DownloadError as error:
            if getattr(error, "status", None) == 404:
                raise BadReference(
                    f"vagrant:{box}: {shown_server} has no such box", hint="RACKER_VAGRANT_SERVER names the server asked"
                ) from None
            raise
    try:
        return untrusted.load_json(answer or b"", name=f"{redact.url(metadata_url)}'s box metadata")
    except BadArchive as error:
        raise DownloadError(f"{error} (Vagrant box metadata is JSON)") from None


def _chosen(ref: Reference, timeout: float = download.TIMEOUT) -> tuple[str, dict, dict]:
    """(box, version, provider) a vagrant: reference names now: the newest released version if none is pinned."""
    ref, wanted = split_provider(ref)
    box, at = ref.target.partition("@")[::2]
    version = choose_version(_metadata(box, timeout), at or None, f"vagrant:{box}")
    return box, version, choose_provider(version, wanted, f"vagrant:{box}@{version['version']}")


def upstream_state(ref: Reference, entry: CatalogEntry | None = None, stored: dict | None = None) -> str | None:
    """The version a pull would take now (the newest released one unless pinned) and its box's checksum."""
    from racker.errors import UpstreamError, UpstreamUnreachable
    from racker.sources import upstream_timeout

    try:
        _box, version, provider = _chosen(ref, upstream_timeout())
    except DownloadError as error:
        raise (UpstreamUnreachable if download.unreachable(error) else UpstreamError)(str(error)) from None
    except BadReference as error:
        raise UpstreamError(str(error)) from None
    checksum = f"{provider.get('checksum_type') or 'none'}:{provider.get('checksum') or ''}"
    return f"{version['version']} {provider.get('name')} {checksum}"


def acquire(ref: Reference, entry: CatalogEntry | None, rootfs: Path) -> dict:
    box, version, provider = _chosen(ref)
    url = provider.get("download_url") or provider.get("url")
    if not url:
        raise DownloadError(f"vagrant:{box}@{version['version']}: the {provider['name']} box has no download URL")
    checksum_type = (provider.get("checksum_type") or "").lower()
    checksum = (provider.get("checksum") or "").lower()
    if insecure():  # the checksum came from a server --insecure let anyone change
        raise DownloadError(
            f"vagrant:{box}: with --insecure, the box metadata's checksum proves nothing",
            hint=f"pull the box's URL with its digest pinned (#sha256=…): {redact.url(url)}",
        )
    path, sha256 = download.fetch(
        url,
        sha256=checksum if checksum_type == "sha256" and checksum else None,
        plain_ok=insecure() or is_loopback(urllib.parse.urlsplit(url).netloc),
        title=f"downloading {box} {version['version']} ({provider['name']})",
    )
    try:
        verified = verify(path, checksum_type, checksum, redact.url(url))
        fields = unpack(path, rootfs, name=f"vagrant:{box}", provider=provider["name"])
    except RackerError:  # a box racker cannot use is not kept
        download.forget(sha256)
        raise
    box_fields = fields["box"]
    what = "none" if verified == "none" else f"integrity ({verified} from {redact.url(server())})"
    box_fields.update(box=box, version=version["version"], url=redact.url(url), sha256=sha256, verified_by=verified, verified=what)
    return fields


def choose_version(metadata: dict, wanted: str | None, name: str) -> dict:
    """The version asked for, else the newest active one; BadReference listing those that exist."""
    versions = [v for v in metadata.get("versions") or [] if isinstance(v, dict) and v.get("version")]
    active = [v for v in versions if v.get("status", "active") == "active"]
    if wanted is None:
        if not active:
            raise BadReference(f"{name} has no released version")
        return max(active, key=lambda v: _version_key(str(v["version"])))
    for version in active:
        if str(version["version"]) == wanted:
            return version
    known = ", ".join(sorted((str(v["version"]) for v in active), key=_version_key)) or "none"
    raise BadReference(f"{name} has no version {wanted} (versions: {known})")


def _version_key(text: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.+-]", text))


def choose_provider(version: dict, wanted: str | None, name: str) -> dict:
    """The provider asked for, else the first of PROVIDERS the version has, for this host's architecture."""
    providers = [p for p in version.get("providers") or [] if isinstance(p, dict) and (p.get("architecture") or "") in ARCHITECTURES]
    offered = {p.get("name"): p for p in providers}
    listed = ", ".join(sorted(str(n) for n in offered)) or "none"
    if wanted is not None:
        if wanted not in PROVIDERS:
            raise BadReference(f"{name}: racker reads {' and '.join(PROVIDERS)} boxes, not {wanted}")
        if wanted not in offered:
            raise BadReference(f"{name} has no {wanted} box (providers: {listed})")
        return offered[wanted]
    for provider in PROVIDERS:
        if provider in offered:
            return offered[provider]
    raise BadReference(f"{name} has no box racker reads ({' or '.join(PROVIDERS)}; providers: {listed})")


def verify(path: Path, checksum_type: str, checksum: str, url: str) -> str:
    """How the box was verified; DownloadError if it does not have the checksum its metadata gives."""
    if not checksum:
        progress.warn(f"{url}: the box metadata gives no checksum: the box is not verified")
        return "none"
    factory = CHECKSUMS.get(checksum_type)
    if factory is None:
        raise DownloadError(f"{url}: unknown checksum_type {checksum_type!r} (known: {', '.join(CHECKSUMS)})")
    if checksum_type != "sha256":  # a sha256 was checked as the file arrived
        hasher = factory()
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                hasher.update(chunk)
        if hasher.hexdigest() != checksum:
            raise DownloadError(f"{url} does not match its checksum: {checksum_type} {hasher.hexdigest()}, expected {checksum}")
    return f"metadata {checksum_type}"


def unpack(path: Path, rootfs: Path, *, name: str, provider: str | None) -> dict:
    """The box file at `path` into the new `rootfs`; `provider`, if given, must be the box's."""
    directory = rootfs.parent / "box"
    compressed = packaged.unpack(path, directory, name=name)
    fields = unpack_dir(directory, rootfs, name=name, provider=provider)
    fields["box"]["compression"] = compressed
    return fields


def unpack_dir(directory: Path, rootfs: Path, *, name: str, provider: str | None) -> dict:
    """The box unpacked in `directory` into the new `rootfs`; manifest fields."""
    metadata = untrusted.load_json(directory / "metadata.json", name=f"{name}: metadata.json", limit=METADATA_LIMIT)
    has = metadata.get("provider") if isinstance(metadata, dict) else None
    if provider is not None and has != provider:
        raise BadReference(f"{name} is a {has} box, not {provider} (providers: {has})")
    if has == "libvirt":
        disk_file = directory / _libvirt_disk(metadata, name)
        if disk_file.is_symlink() or not disk_file.is_file():
            raise BadArchive(f"{name}: the libvirt box holds no {disk_file.name}")
        found = disk.unpack(disk_file, rootfs, name=f"{name}: {disk_file.name}")["disk"]
    elif has == "virtualbox":
        found = ova.unpack_dir(directory, rootfs, name=name, besides=packaged.BOX_EXTRAS)["ova"]
    else:
        raise BadArchive(f"{name} is a box for {has or 'no named provider'}: racker reads {' and '.join(PROVIDERS)} boxes")
    return {"box": {"provider": has, **found}}


def _libvirt_disk(metadata: dict, name: str) -> str:
    """box.img, or the first of the disks a newer libvirt box lists: a plain name beside metadata.json."""
    disks = metadata.get("disks")
    file_name = disks[0].get("path", "") if isinstance(disks, list) and disks and isinstance(disks[0], dict) else "box.img"
    if not file_name or "/" in file_name or file_name in (".", ".."):
        raise BadArchive(f"{name}: metadata.json names a disk outside the box ({file_name!r}): refused")
    return file_name
