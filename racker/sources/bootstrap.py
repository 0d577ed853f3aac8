"""bootstrap:debian/SUITE — a root filesystem made by mmdebstrap from the archive.

Its upstream state is what the archive's signed InRelease files say of the image's
packages (sources/archive.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from racker import proc, progress, settings, store
from racker.errors import UpstreamError
from racker.sources import archive, upstream_timeout
from racker.store import reproducible
from racker.store.catalog import CatalogEntry
from racker.store.refs import Reference

# The archive each distribution is bootstrapped from, read when used.
MIRRORS = {"debian": settings.DEBIAN_MIRROR, "ubuntu": settings.UBUNTU_MIRROR}


def mirror(distro: str) -> str:
    return MIRRORS[distro].value()


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
    base = mirror(distro)
    lines = [f"deb {base} {suite} main"]
    if (distro, suite) in SECURITY_SUITES:
        archive, security = SECURITY_SUITES[distro, suite]
        parts = urlsplit(base)
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
    return settings.ARCHIVE_KEYRING.get() or Path(KEYRINGS[distro])


def architecture(ref: Reference | None = None) -> str:
    """The architecture the image is built for in Debian's words: the reference's platform's, else the host's."""
    from racker.store import platforms

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


# A customize hook prints the sha256 of each InRelease apt used, after this mark: the archive state
# the image was built from, compared with the one its SOURCE_DATE_EPOCH was read from.
USED_MARK = "racker-inrelease-used "


def acquire(ref: Reference, entry: CatalogEntry | None, rootfs: Path) -> dict:
    """mmdebstrap, reproducibly: SOURCE_DATE_EPOCH is the suites' newest Release date (or the user's
    SOURCE_DATE_EPOCH), and the InRelease files apt used must be those that date was read from: an
    archive that moved during the build builds again, once."""
    distro, suite = ref.target.split("/", 1)
    lines = sources(distro, suite)
    for attempt in range(2):
        releases = archive.signed_releases(lines, keyring(distro), upstream_timeout())
        epoch = reproducible.override() or max(release.epoch for release in releases)
        used = _mmdebstrap(ref, distro, suite, entry, rootfs, epoch)
        if used == {release.sha256 for release in releases}:
            break
        store.remove_tree(rootfs)
        if attempt:
            raise UpstreamError(f"the archive {lines[0].split()[1]} moved during two bootstraps of {suite}", hint="try again later")
        progress.warn(f"the archive moved during the bootstrap of {suite}: building again from its new state")
    _forget_host_resolvers(rootfs)
    _no_host_keys(rootfs)
    bootstrap = {"distro": distro, "suite": suite, "packages": list(_packages(entry)), "sources": lines}
    if ref.platform is not None:
        bootstrap["platform"] = str(ref.platform)
    return {"bootstrap": bootstrap, reproducible.FIELD: epoch}


def _packages(entry: CatalogEntry | None) -> tuple[str, ...]:
    return tuple(entry.packages) if entry else DEFAULT_PACKAGES


def _mmdebstrap(ref: Reference, distro: str, suite: str, entry: CatalogEntry | None, rootfs: Path, epoch: int) -> set[str]:
    """Bootstrap `rootfs` at SOURCE_DATE_EPOCH `epoch`: the sha256s of the InRelease files apt used."""
    packages = _packages(entry)
    argv = [
        "mmdebstrap",
        # unshare mode: mmdebstrap's own mounts live in a private namespace, so
        # nothing stays mounted on the host if we are killed.
        "--mode=unshare",
        "--variant=" + str(entry.options.get("variant", "minbase") if entry else "minbase"),
        # Before mmdebstrap's cleanup removes apt's lists: which archive state this build saw.
        f'--customize-hook=for f in "$1"/var/lib/apt/lists/*_InRelease; do echo {USED_MARK}$(sha256sum < "$f"); done',
    ]
    if packages:
        argv.append("--include=" + ",".join(packages))
    if ref.platform is not None:
        from racker.cpu import emulation

        # Another architecture's maintainer scripts run under qemu-user, through binfmt_misc.
        emulation.ensure(ref.platform)
        argv.append(f"--arch={architecture(ref)}")
    for option in entry.apt_options if entry else ():
        argv.append(f"--aptopt={option}")
    # mmdebstrap installs from these and writes them as the image's sources.list.
    if settings.ARCHIVE_KEYRING.get() is not None:
        argv.append(f"--keyring={keyring(distro)}")
    argv += [suite, str(rootfs), *sources(distro, suite)]
    with progress.step(f"bootstrapping {distro} {suite} ({architecture(ref)}) with mmdebstrap"):
        result = proc.run(argv, env=reproducible.environment(epoch), timeout=3600 if ref.platform is not None else 1800)
    said = (result.stdout + result.stderr).splitlines()
    # Only lines that start with the mark: mmdebstrap's own log quotes the hook, mark and all.
    return {line.removeprefix(USED_MARK).split()[0] for line in said if line.startswith(USED_MARK) and line.strip() != USED_MARK.strip()}


def _forget_host_resolvers(rootfs: Path) -> None:
    """mmdebstrap copies the build host's /etc/resolv.conf in (as debootstrap does): an empty one
    instead, the same on every host (the machine's own comes from nspawn, DHCP or resolved)."""
    resolv = rootfs / "etc/resolv.conf"
    if resolv.is_file() and not resolv.is_symlink():
        resolv.unlink()
        resolv.write_bytes(b"")
        os.chmod(resolv, 0o644)


# openssh-server's postinst makes host keys: random, so every build another image, and every machine
# of the image the same keys. Each boot makes its own instead, before the unit's own `sshd -t` (which
# fails without keys): the list is reset so that the key step comes first.
SSH_HOST_KEYS_DROPIN = "etc/systemd/system/ssh.service.d/racker-host-keys.conf"
SSH_HOST_KEYS = """\
# Written by racker: no host keys in the image; each machine makes its own at its first start.
[Service]
ExecStartPre=
ExecStartPre=-/bin/sh -c 'ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || ssh-keygen -A'
ExecStartPre=/usr/sbin/sshd -t
"""


# Where systemd is not the init (sysvinit-core, openrc, runit-init), sshd's /etc/init.d/ssh (which
# OpenRC runs too) sources /etc/default/ssh first: the same step there. Not in systemd images, whose
# ssh.service reads that file as an EnvironmentFile. (prepare writes the same for +vm images.)
SSH_DEFAULTS = "etc/default/ssh"
SSH_HOST_KEYS_RC = """\
# Written by racker: no host keys in the image; each machine makes its own before sshd -t needs them.
ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || ssh-keygen -A >/dev/null
"""
SYSTEMD = ("usr/lib/systemd/systemd", "lib/systemd/systemd")


def _no_host_keys(rootfs: Path) -> None:
    ssh = rootfs / "etc/ssh"
    if ssh.is_symlink() or not ssh.is_dir():
        return
    keys = [key for key in ssh.iterdir() if key.name.startswith("ssh_host_")]
    if not keys:
        return
    for key in keys:
        key.unlink()
    inside = rootfs.resolve()
    dropin = rootfs / SSH_HOST_KEYS_DROPIN
    if dropin.parent.resolve().is_relative_to(inside):  # else a link out of the image: nothing written there
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(SSH_HOST_KEYS)
    defaults = rootfs / SSH_DEFAULTS
    if any((rootfs / init).exists() for init in SYSTEMD) or not defaults.parent.resolve().is_relative_to(inside):
        return
    if defaults.is_symlink() or not defaults.parent.is_dir():
        return
    kept = defaults.read_text() if defaults.is_file() else ""
    defaults.write_text(kept + ("" if kept.endswith("\n") or not kept else "\n") + SSH_HOST_KEYS_RC)
