"""bootstrap:debian/SUITE — a root filesystem made by mmdebstrap from the archive.

Its upstream state (upstream_state) is what the archive's suites list now, read from
their signed InRelease files alone (a few hundred KiB, no package downloaded): each
InRelease is verified with the archive keyring (gpgv), and from the signed text only,
the sha256 of every component's Packages index for this architecture is taken.
A new version of any package of the suite moves it; a first cut: a new version of a
package the image does not hold moves it too (the image is then built again for nothing).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from racker import proc, progress
from racker.catalog import CatalogEntry
from racker.refs import Reference

MIRRORS = {
    "debian": os.environ.get("RACKER_DEBIAN_MIRROR", "http://deb.debian.org/debian"),
    "ubuntu": os.environ.get("RACKER_UBUNTU_MIRROR", "http://archive.ubuntu.com/ubuntu"),
}

# The security suite of each release that has one (sid and experimental have none),
# as the distribution's own cloud images list it. Its archive sits beside the
# main one on the same host (deb.debian.org/debian-security). Bullseye's ended with
# its LTS on 2026-08-31 (what follows is Freexian's ELTS, not debian-security), and
# mirrors drop its pool: the kernel listed there 404s on this host's mirror.
SECURITY_SUITES = {
    ("debian", "bookworm"): ("debian-security", "bookworm-security"),
    ("debian", "trixie"): ("debian-security", "trixie-security"),
}

# What a booted system needs to reach `running` with sshd answering.
DEFAULT_PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "iproute2", "procps")


def sources(distro: str, suite: str) -> list[str]:
    """The one-line apt sources the image is built from and keeps: the release, then its security suite."""
    mirror = MIRRORS[distro]
    lines = [f"deb {mirror} {suite} main"]
    if (distro, suite) in SECURITY_SUITES:
        archive, security = SECURITY_SUITES[distro, suite]
        parts = urlsplit(mirror)
        sibling = parts.path.rstrip("/").rpartition("/")[0] + "/" + archive
        lines.append(f"deb {urlunsplit(parts._replace(path=sibling))} {security} main")
    return lines


KEYRINGS = {
    "debian": "/usr/share/keyrings/debian-archive-keyring.gpg",
    "ubuntu": "/usr/share/keyrings/ubuntu-archive-keyring.gpg",
}


def keyring(distro: str) -> Path:
    """The keys the archive's InRelease must be signed with: RACKER_ARCHIVE_KEYRING (a mirror of one's
    own, signed with one's own key; mmdebstrap is given it too), else the distribution's keyring."""
    return Path(os.environ.get("RACKER_ARCHIVE_KEYRING") or KEYRINGS[distro])


def architecture() -> str:
    """The host's architecture in Debian's words (the image is built for it)."""
    from racker import platforms

    arch = platforms.host().architecture
    return {"386": "i386", "arm": "armhf"}.get(arch, arch)


def upstream_state(ref: Reference, entry: CatalogEntry | None = None) -> str | None:
    distro, _, suite = ref.target.partition("/")
    if distro not in MIRRORS:
        return None
    return archive_state(sources(distro, suite), keyring(distro), architecture())


def archive_state(lines: list[str], keys: Path, arch: str) -> str:
    """`SUITE/COMPONENT=SHA256` of each Packages index the one-line apt sources `lines` name, read
    from their InRelease files, verified with `keys`. UpstreamError for an InRelease whose
    signature does not verify or that lists no such index, UpstreamUnreachable for a mirror
    that does not answer."""
    from racker import download, store
    from racker.errors import DownloadError, UpstreamError, UpstreamUnreachable
    from racker.sources import upstream_timeout

    proc.require("gpgv")  # before anything is asked of the archive
    found = []
    with store.workdir("inrelease") as work:
        for number, line in enumerate(lines):
            _deb, url, suite, *components = line.split()
            inrelease = f"{url.rstrip('/')}/dists/{suite}/InRelease"
            try:
                # Plain HTTP is fine here: only what the archive key signed is read.
                signed = download.fetch_small(inrelease, plain_ok=True, timeout=upstream_timeout()) or b""
            except DownloadError as error:
                raise (UpstreamUnreachable if download.unreachable(error) else UpstreamError)(str(error)) from None
            text = _verified(inrelease, signed, keys, work / str(number))
            indexes = _sha256_section(text)
            for component in components:
                path = f"{component}/binary-{arch}/Packages"
                if path not in indexes:
                    raise UpstreamError(f"{inrelease} lists no {path}")
                found.append(f"{suite}/{component}={indexes[path]}")
    return " ".join(found)


def _verified(url: str, signed: bytes, keys: Path, directory: Path) -> str:
    """The text of a clearsigned file that a key in `keys` signed (gpgv's output, never the file's own
    text around the signature); UpstreamError naming why otherwise."""
    from racker.errors import ToolFailed, UpstreamError

    directory.mkdir(mode=0o700)
    (directory / "InRelease").write_bytes(signed)
    argv = ["gpgv", "--homedir", str(directory), "--keyring", str(keys.absolute()), "--output", "-", str(directory / "InRelease")]
    try:
        return proc.run(argv, timeout=60).stdout
    except ToolFailed as failed:
        said = [line for line in failed.stderr.splitlines() if "BAD signature" in line or "No public key" in line or "Can't check" in line]
        reason = said[-1].removeprefix("gpgv: ") if said else (failed.stderr.strip().splitlines() or ["gpgv refused it"])[-1]
        raise UpstreamError(f"{url}: its signature does not verify against {keys} ({reason})") from None


def _sha256_section(text: str) -> dict[str, str]:
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


def recipe(ref: Reference) -> str:
    """A bootstrap depends on the sources it is built from (a new security suite builds again)."""
    distro, _, suite = ref.target.partition("/")
    return " | ".join(sources(distro, suite)) if distro in MIRRORS else str(ref)


def acquire(ref: Reference, entry: CatalogEntry | None, rootfs: Path) -> dict:
    distro, suite = ref.target.split("/", 1)
    packages = entry.packages if entry else DEFAULT_PACKAGES
    argv = [
        "mmdebstrap",
        # unshare mode: mmdebstrap's own mounts live in a private namespace, so
        # nothing stays mounted on the host if we are killed.
        "--mode=unshare",
        "--variant=" + str(entry.options.get("variant", "minbase") if entry else "minbase"),
    ]
    if packages:
        argv.append("--include=" + ",".join(packages))
    for option in entry.apt_options if entry else ():
        argv.append(f"--aptopt={option}")
    # mmdebstrap installs from these and writes them as the image's sources.list.
    if os.environ.get("RACKER_ARCHIVE_KEYRING"):
        argv.append(f"--keyring={keyring(distro)}")
    argv += [suite, str(rootfs), *sources(distro, suite)]
    with progress.step(f"bootstrapping {distro} {suite} with mmdebstrap"):
        proc.run(argv, timeout=1800)
    return {"bootstrap": {"distro": distro, "suite": suite, "packages": list(packages), "sources": sources(distro, suite)}}
