"""Which distribution a root filesystem holds, and how to install packages in it.

No other module asks "is this Debian?": they ask detect(rootfs) for a Distro
and use its recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from racker.store import imagetree


@dataclass(frozen=True)
class Recipe:
    """How one package manager does things, as argv lists run inside the image."""

    manager: str
    update: tuple[str, ...]
    install: tuple[str, ...]
    query: tuple[str, ...]  # + package: exit 0 when installed
    available: tuple[str, ...] = ()  # + package: exit 0 when the archive has it
    env: dict[str, str] = field(default_factory=dict)
    base_package: str = ""  # always installed; proves the package database works
    clean: tuple[str, ...] = ()
    binary: str = ""  # the program that must exist in the image for this recipe to apply
    # False until racker has prepared an image with it against a real mirror:
    # the rows are written from the distributions' documentation, not yet run here.
    verified: bool = False
    quirks: tuple[str, ...] = ()  # what differs from apt, for whoever verifies the row


RECIPES: dict[str, Recipe] = {
    "apt": Recipe(
        "apt",
        update=("apt-get", "update", "-q"),
        install=("apt-get", "install", "-y", "-q", "--no-install-recommends"),
        query=("dpkg", "-s"),
        available=("apt-cache", "show"),
        env={"DEBIAN_FRONTEND": "noninteractive"},
        base_package="base-files",
        clean=("apt-get", "clean"),
        binary="usr/bin/apt-get",
        verified=True,  # Debian bullseye to sid, and Debian's Docker images, in CI
        quirks=("Docker's Debian images ship /etc/apt/apt.conf.d/docker-clean and no apt lists: update first",),
    ),
    "dnf": Recipe(
        "dnf",
        update=("dnf", "makecache", "-q"),
        install=("dnf", "install", "-y", "-q", "--setopt=install_weak_deps=False"),
        query=("rpm", "-q"),
        available=("dnf", "info", "-q"),
        base_package="setup",
        clean=("dnf", "clean", "all"),
        binary="usr/bin/dnf",
        quirks=(
            "Fedora's container images set tsflags=nodocs in /etc/dnf/dnf.conf",
            "the sshd unit is sshd.service, not ssh.service",
        ),
    ),
    "microdnf": Recipe(
        "microdnf",
        update=("microdnf", "makecache"),
        install=("microdnf", "install", "-y", "--setopt=install_weak_deps=0", "--nodocs"),
        query=("rpm", "-q"),
        base_package="setup",
        clean=("microdnf", "clean", "all"),
        binary="usr/bin/microdnf",
        quirks=("UBI minimal images have microdnf only; UBI repositories lack some packages without a subscription",),
    ),
    "yum": Recipe(
        "yum",
        update=("yum", "makecache", "-q"),
        install=("yum", "install", "-y", "-q"),
        query=("rpm", "-q"),
        available=("yum", "info", "-q"),
        base_package="setup",
        clean=("yum", "clean", "all"),
        binary="usr/bin/yum",
        quirks=("CentOS 7 and older: the image's fakesystemd conflicts with systemd and must be swapped out",),
    ),
    "zypper": Recipe(
        "zypper",
        update=("zypper", "--non-interactive", "refresh"),
        install=("zypper", "--non-interactive", "install", "--no-recommends"),
        query=("rpm", "-q"),
        available=("zypper", "--non-interactive", "info"),
        base_package="filesystem",
        clean=("zypper", "clean", "--all"),
        binary="usr/bin/zypper",
        quirks=(
            "`zypper info` exits 0 for a missing package: read its output, not its status",
            "openSUSE's D-Bus package is dbus-1",
        ),
    ),
    "apk": Recipe(
        "apk",
        update=("apk", "update", "-q"),
        install=("apk", "add", "-q"),
        query=("apk", "info", "-e"),
        available=("apk", "search", "-e"),
        base_package="alpine-baselayout",
        binary="sbin/apk",
        quirks=(
            "Alpine's init is OpenRC, not systemd: the machine boots /sbin/init and never sends READY=1",
            'OpenRC in a container needs rc_sys="lxc" (or "docker") in /etc/rc.conf',
        ),
    ),
    "pacman": Recipe(
        "pacman",
        update=("pacman", "-Sy", "--noconfirm"),
        install=("pacman", "-S", "--noconfirm", "--needed"),
        query=("pacman", "-Q"),
        available=("pacman", "-Si"),
        base_package="filesystem",
        clean=("pacman", "-Scc", "--noconfirm"),
        binary="usr/bin/pacman",
        quirks=(
            "Arch's Docker image disables pacman's sandbox and has an empty keyring until pacman-key --init",
            "the sshd unit is sshd.service",
        ),
    ),
}

# os-release ID (or an ID_LIKE word) -> package managers to try, in order: the
# first whose program the image has (UBI minimal has microdnf, CentOS 7 yum).
FAMILIES: dict[str, tuple[str, ...]] = {
    "debian": ("apt",),
    "ubuntu": ("apt",),
    "fedora": ("dnf", "microdnf", "yum"),
    "rhel": ("dnf", "microdnf", "yum"),
    "centos": ("dnf", "yum", "microdnf"),
    "rocky": ("dnf", "microdnf"),
    "almalinux": ("dnf", "microdnf"),
    "amzn": ("dnf", "yum"),
    "opensuse": ("zypper",),
    "suse": ("zypper",),
    "sles": ("zypper",),
    "alpine": ("apk",),
    "arch": ("pacman",),
}


@dataclass(frozen=True)
class Distro:
    id: str
    version_id: str
    pretty_name: str
    recipe: Recipe | None
    has_systemd: bool

    def as_json(self) -> dict:
        return {
            "id": self.id,
            "version_id": self.version_id,
            "pretty_name": self.pretty_name,
            "package_manager": self.recipe.manager if self.recipe else None,
            "systemd": self.has_systemd,
        }


def parse_os_release(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            values[key.strip()] = value.strip().strip("\"'")
    return values


def detect(rootfs: Path) -> Distro:
    tree = imagetree.Tree(rootfs)  # links resolve as inside the image, never on the host
    text = ""
    for path in ("etc/os-release", "usr/lib/os-release"):
        if tree.is_file(path):
            text = tree.read_text(path, errors="replace")
            break
    info = parse_os_release(text)
    words = [info.get("ID", ""), *info.get("ID_LIKE", "").split()]
    managers = next((FAMILIES[w] for w in words if w in FAMILIES), ())
    # The family's first manager whose program is there; the first at all if none is (a broken image).
    manager = next((m for m in managers if tree.exists(RECIPES[m].binary)), managers[0] if managers else None)
    has_systemd = (tree.exists("sbin/init") and "systemd" in Path(tree.resolve("sbin/init")).name) or any(
        tree.exists(p) for p in ("usr/lib/systemd/systemd", "lib/systemd/systemd")
    )
    return Distro(
        id=info.get("ID", "unknown"),
        version_id=info.get("VERSION_ID", info.get("VERSION_CODENAME", "")),
        pretty_name=info.get("PRETTY_NAME", info.get("ID", "unknown")),
        recipe=RECIPES[manager] if manager else None,
        has_systemd=has_systemd,
    )
