"""Root tarballs: `https://host/path/root.tar.xz[#sha256=HEX]`, `http://` (loopback, or with --insecure)
and `file:PATH`, as tar, gzip, xz, bzip2, zstd or lz4, told by their first bytes.

    URL ──checksums──▶ the sha256 it must have (pin, SHA256SUMS, its signature with --keyring)
        ──download──▶ the store's download cache (resumed, verified; a digest there is not fetched again)
        ──compression + extract──▶ the root filesystem, through the one safe extractor

A download whose content turns out unusable (no tar, truncated, a bomb) is
dropped from the cache, so that nothing of a failed pull stays but the
partial file a broken connection leaves to resume.
"""

from __future__ import annotations

import functools
import urllib.parse
from pathlib import Path

from racker import progress, redact, store
from racker.errors import BadArchive, BadReference, DownloadError
from racker.sources import checksums, download, extract, insecure, keyring
from racker.sources.compression import decompressed
from racker.sources.oci import is_loopback
from racker.store.catalog import CatalogEntry
from racker.store.refs import Reference


def url_of(ref: Reference) -> str:
    """The URL to fetch, with its credentials (download.py sends them as basic auth): never shown or stored."""
    return f"{ref.scheme}://{ref.fetch_target}"


def recipe(ref: Reference) -> str:
    """A URL is its own recipe (with its pinned digest, if any); a local file, the file as it is now."""
    if ref.scheme != "file":
        return str(ref)
    path = Path(ref.target)
    if not path.exists():
        return str(ref)
    info = path.stat()
    return f"{ref} {info.st_size} {info.st_mtime_ns} {info.st_ino}"


def upstream_state(ref: Reference, entry: CatalogEntry | None = None, stored: dict | None = None) -> str | None:
    """The sha256 the file has now: its pin, else its line in the SHA256SUMS beside it (signed, with
    --keyring). One small request; what a pull would trust, so a file the list lacks is refused here too."""
    if ref.scheme == "file":
        return None  # a local file: its recipe (the file as it is now) decides
    from racker.errors import DownloadError, UpstreamError, UpstreamUnreachable
    from racker.sources import upstream_timeout

    url, pin = checksums.split_pin(url_of(ref))
    if pin is not None and keyring() is None:
        return f"sha256:{pin}"
    plain_ok = insecure() or is_loopback(urllib.parse.urlsplit(url).netloc)
    fetch_small = functools.partial(download.fetch_small, plain_ok=plain_ok, timeout=upstream_timeout())
    try:
        with store.workdir("upstream") as work:
            return "sha256:" + checksums.expected(url, pin, fetch=fetch_small, keyring=keyring(), work=work).sha256
    except DownloadError as error:
        raise (UpstreamUnreachable if download.unreachable(error) else UpstreamError)(str(error)) from None


def acquire(ref: Reference, entry: CatalogEntry | None, rootfs: Path) -> dict:
    path, fields = obtain(ref, rootfs.parent)
    try:
        fields["compression"] = unpack(path, rootfs, name=fields.get("url") or str(path))
    except BadArchive:
        if "sha256" in fields:
            download.forget(fields["sha256"])
        raise
    return {"tarball": fields}


def obtain(ref: Reference, work: Path) -> tuple[Path, dict]:
    """The local file a reference names: a file as it is, a URL downloaded (or found in the
    download cache) and verified. Manifest fields say where it came from."""
    if ref.scheme == "file":
        path = Path(ref.target)
        if not path.is_file():
            raise BadReference(f"{ref}: no such file")
        return path, {"path": str(path)}
    url, pin = checksums.split_pin(url_of(ref))
    plain_ok = insecure() or is_loopback(urllib.parse.urlsplit(url).netloc)
    fetch_small = functools.partial(download.fetch_small, plain_ok=plain_ok)
    with progress.step("verifying the checksum list" if pin is None or keyring() else "checking the pin"):
        want = checksums.expected(url, pin, fetch=fetch_small, keyring=keyring(), work=work)
    if not want.authentic:
        if insecure():  # the list came over a connection --insecure let anyone change, with the file
            raise DownloadError(
                f"{redact.url(url)}: with --insecure, a {checksums.SUMS} from the same server proves nothing",
                hint="pin the file (append #sha256=<its digest>) or check a signature with --keyring FILE",
            )
        progress.warn(f"{redact.url(url)} is checked for integrity only ({checksums.SUMS} from the same server, not signed)")
    name = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1] or url
    path, digest = download.fetch(url, sha256=want.sha256, plain_ok=plain_ok, title=f"downloading {name}")
    return path, {"url": redact.url(url), "sha256": digest, "verified_by": want.verified_by, "verified": want.verified}


def unpack(path: Path, rootfs: Path, *, name: str) -> str:
    """The (compressed) tarball at `path` into the new directory `rootfs`; the compression it had."""
    rootfs.mkdir()
    with progress.step(f"unpacking {name}"), decompressed(path, name=name) as (kind, stream):
        extract.extract(stream, rootfs, name=name)
    return kind
