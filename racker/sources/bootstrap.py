"""bootstrap:debian/SUITE — a root filesystem made by mmdebstrap from the archive.

Its upstream state is what the archive's signed InRelease files say of the image's
packages (sources/archive.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from racker import proc, progress
from racker.catalog import CatalogEntry
from racker.refs import Reference
from racker.sources import archive

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


def architecture(ref: Reference | None = None) -> str:
    """The architecture the image is built for in Debian's words: the reference's platform's, else the host's."""
    from racker import platforms

    arch = (ref.platform if ref is not None and ref.platform is not None else platforms.host()).architecture
    return {"386": "i386", "arm": "armhf"}.get(arch, arch)


def upstream_state(ref: Reference, entry: CatalogEntry | None = None, stored: dict | None = None) -> str | None:
    """What the archive's suites hold now for the image (sources/archive.py): the stored image's
    package set and its manifest's last state (`stored`) let an unmoved archive cost one InRelease a suite."""
    distro, _, suite = ref.target.partition("/")
    if distro not in MIRRORS:
        return None
    return archive.state(sources(distro, suite), keyring(distro), architecture(ref), stored)


def same_state(old: str, new: str) -> bool:
    return archive.same_state(old, new)


def recipe(ref: Reference) -> str:
    """A bootstrap depends on the sources it is built from (a new security suite builds again),
    and on the architecture when it is not the host's."""
    distro, _, suite = ref.target.partition("/")
    built = " | ".join(sources(distro, suite)) if distro in MIRRORS else str(ref)
    return built + (f" arch={architecture(ref)}" if ref.platform is not None else "")


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
    if ref.platform is not None:
        from racker import emulation

        # Another architecture's maintainer scripts run under qemu-user, through binfmt_misc.
        emulation.ensure(ref.platform)
        argv.append(f"--arch={architecture(ref)}")
    for option in entry.apt_options if entry else ():
        argv.append(f"--aptopt={option}")
    # mmdebstrap installs from these and writes them as the image's sources.list.
    if os.environ.get("RACKER_ARCHIVE_KEYRING"):
        argv.append(f"--keyring={keyring(distro)}")
    argv += [suite, str(rootfs), *sources(distro, suite)]
    with progress.step(f"bootstrapping {distro} {suite} ({architecture(ref)}) with mmdebstrap"):
        proc.run(argv, timeout=3600 if ref.platform is not None else 1800)
    fields = {"distro": distro, "suite": suite, "packages": list(packages), "sources": sources(distro, suite)}
    if ref.platform is not None:
        fields["platform"] = str(ref.platform)
    return {"bootstrap": fields}
