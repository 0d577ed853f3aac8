"""What a Debian-style archive holds now for an image: its upstream state, read from signed files only.

    deb URL SUITE COMPONENT…  ──GET dists/SUITE/InRelease──▶ gpgv with the archive keyring ──▶ the signed text
        ──SHA256:──▶ the hash of each COMPONENT/binary-ARCH/Packages index      (the state's first part)
        ──if an index moved since the stored state: GET its Packages.xz, checked against the signed hash──▶
          the versions the suites offer of the packages the image holds         (packages=HASH)

So an archive that did not move costs one InRelease per suite (a few hundred KiB) and
nothing else; one that moved costs its changed indexes, and moves the image only if a
package the image holds has a new version there. An image stored before racker kept its
package manifest has only the first part: any change of an index moves it (once).
Only what the archive key signed is ever read (gpgv's output, never the file's own text).
"""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import hashlib
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from racker import proc, store
from racker.errors import DownloadError, ToolFailed, UpstreamError, UpstreamUnreachable
from racker.sources import download

PACKAGES_MARK = " packages="
COMPRESSED = ((".xz", lzma.open), (".gz", gzip.open), ("", open))  # the index forms to fetch, in order of preference


@dataclass(frozen=True)
class Index:
    """One suite's Packages index for a component and architecture, as its signed InRelease lists it."""

    name: str  # SUITE/COMPONENT
    base: str  # URL of the index without its compression suffix
    sha256: str  # of the uncompressed index
    variants: dict[str, str]  # suffix ("", ".xz", ".gz") → the sha256 of that file


def state(lines: list[str], keys: Path, arch: str, stored: dict | None = None) -> str:
    """The upstream state of an image built from the one-line apt sources `lines`: `SUITE/COMPONENT=SHA256 …`,
    then ` packages=HASH` when the image's package set (its stored manifest) is known.
    UpstreamError for an InRelease whose signature does not verify or that lacks an index;
    UpstreamUnreachable for a mirror that does not answer."""
    from racker.sources import upstream_timeout

    indexes = signed_indexes(lines, keys, arch, upstream_timeout())
    first = " ".join(f"{index.name}={index.sha256}" for index in indexes)
    previous = ((stored or {}).get("upstream") or {}).get("state") or ""
    if previous.partition(PACKAGES_MARK)[0] == first:
        return previous  # no index moved: neither did any version in them
    names = {p["name"] for p in (stored or {}).get("packages") or [] if p.get("manager") == "dpkg"}
    if not names:
        return first
    return f"{first}{PACKAGES_MARK}{versions_hash(indexes, names)}"


def same_state(old: str, new: str) -> bool:
    """Whether two states say the image would be built the same: the versions of its packages where
    both know them, else every index."""
    old_indexes, _, old_packages = old.partition(PACKAGES_MARK)
    new_indexes, _, new_packages = new.partition(PACKAGES_MARK)
    if old_packages and new_packages:
        return old_packages == new_packages
    return old_indexes == new_indexes


def signed_indexes(lines: list[str], keys: Path, arch: str, timeout: float) -> list[Index]:
    found = []
    for signed in signed_releases(lines, keys, timeout):
        listed = sha256_section(signed.text)
        dists = signed.inrelease.removesuffix("/InRelease")
        for component in signed.components:
            path = f"{component}/binary-{arch}/Packages"
            if path not in listed:
                raise UpstreamError(f"{signed.inrelease} lists no {path}")
            variants = {suffix: listed[path + suffix] for suffix, _ in COMPRESSED if path + suffix in listed}
            found.append(Index(f"{signed.suite}/{component}", f"{dists}/{path}", listed[path], variants))
    return found


@dataclass(frozen=True)
class SignedRelease:
    """One source line's InRelease: where it is, what the archive key signed of it, and the file's own sha256."""

    inrelease: str
    suite: str
    components: tuple[str, ...]
    text: str  # gpgv's output: the signed text only
    sha256: str  # of the file as fetched (apt keeps the same bytes in its lists)

    @property
    def epoch(self) -> int:
        """Its Date: field, in seconds since the epoch."""
        return release_date(self.text)


def signed_releases(lines: list[str], keys: Path, timeout: float) -> list[SignedRelease]:
    """Each one-line apt source's InRelease, its signature verified with `keys`."""
    proc.require("gpgv")  # before anything is asked of the archive
    found = []
    with store.workdir("inrelease") as work:
        for number, line in enumerate(lines):
            _deb, url, suite, *components = line.split()
            inrelease = f"{url.rstrip('/')}/dists/{suite}/InRelease"
            try:
                # Plain HTTP is fine here: only what the archive key signed is read.
                signed = download.fetch_small(inrelease, plain_ok=True, timeout=timeout) or b""
            except DownloadError as error:
                raise (UpstreamUnreachable if download.unreachable(error) else UpstreamError)(str(error)) from None
            text = verified(inrelease, signed, keys, work / str(number))
            found.append(SignedRelease(inrelease, suite, tuple(components), text, hashlib.sha256(signed).hexdigest()))
    return found


def release_date(text: str) -> int:
    """The Date: field of a Release file's text, in seconds since the epoch (a build's SOURCE_DATE_EPOCH,
    as Debian's reproducible images take it)."""
    for line in text.splitlines():
        if line.startswith("Date:"):
            with contextlib.suppress(TypeError, ValueError):
                return int(email.utils.parsedate_to_datetime(line[5:].strip()).timestamp())
            break
    raise UpstreamError("the archive's Release file has no valid Date: field")


def verified(url: str, signed: bytes, keys: Path, directory: Path) -> str:
    """The text of a clearsigned file that a key in `keys` signed (gpgv's output, never the file's own
    text around the signature); UpstreamError naming why otherwise."""
    directory.mkdir(mode=0o700)
    (directory / "InRelease").write_bytes(signed)
    argv = ["gpgv", "--homedir", str(directory), "--keyring", str(keys.absolute()), "--output", "-", str(directory / "InRelease")]
    try:
        return proc.run(argv, timeout=60).stdout
    except ToolFailed as failed:
        said = [line for line in failed.stderr.splitlines() if "BAD signature" in line or "No public key" in line or "Can't check" in line]
        reason = said[-1].removeprefix("gpgv: ") if said else (failed.stderr.strip().splitlines() or ["gpgv refused it"])[-1]
        raise UpstreamError(f"{url}: its signature does not verify against {keys} ({reason})") from None


def sha256_section(text: str) -> dict[str, str]:
    """path → sha256 from a Release file's SHA256: field."""
    found: dict[str, str] = {}
    inside = False
    for line in text.splitlines():
        if not line.startswith(" "):
            inside = line.rstrip() == "SHA256:"
            continue
        words = line.split()
        if inside and len(words) == 3:
            found[words[2]] = words[0]
    return found


def versions_hash(indexes: list[Index], names: set[str]) -> str:
    """sha256 over `SUITE/COMPONENT NAME VERSION ARCH` of every entry the indexes have for `names`."""
    entries = sorted(f"{index.name} {entry}" for index in indexes for entry in _entries(index, names))
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _entries(index: Index, names: set[str]) -> Iterator[str]:
    suffix, opener = next((s, o) for s, o in COMPRESSED if s in index.variants)
    try:
        path, _digest = download.fetch(index.base + suffix, sha256=index.variants[suffix], plain_ok=True, title=f"reading {index.name}")
    except DownloadError as error:
        raise (UpstreamUnreachable if download.unreachable(error) else UpstreamError)(str(error)) from None
    try:
        with opener(path, "rb") as stream:
            yield from _versions(stream, names)  # type: ignore[arg-type]
    finally:
        download.forget(index.variants[suffix])  # read once a night at most: not kept


def _versions(stream: IO[bytes], names: set[str]) -> Iterator[str]:
    """`NAME VERSION ARCH` of each stanza of a Packages index whose package is in `names`."""
    name = version = arch = ""
    for raw in stream:
        if raw[:1] in (b" ", b"\t"):
            continue
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if not line:
            if name in names:
                yield f"{name} {version} {arch}"
            name = version = arch = ""
        elif line.startswith("Package:"):
            name = line[8:].strip()
        elif line.startswith("Version:"):
            version = line[8:].strip()
        elif line.startswith("Architecture:"):
            arch = line[13:].strip()
    if name in names:
        yield f"{name} {version} {arch}"
