"""Which distribution a root filesystem holds, and how to install packages in it.

No other module asks "is this Debian?": they ask detect(rootfs) for a Distro
and use its recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Recipe:
    """How one package manager does things, as argv lists run inside the image."""

    manager: str
    update: tuple[str, ...]
    install: tuple[str, ...]
    query: tuple[str, ...]  # + package: exit 0 when installed
    env: dict[str, str] = field(default_factory=dict)
    base_package: str = ""  # always installed; proves the package database works
    clean: tuple[str, ...] = ()


RECIPES: dict[str, Recipe] = {
    "apt": Recipe(
        "apt",
        update=("apt-get", "update", "-q"),
        install=("apt-get", "install", "-y", "-q", "--no-install-recommends"),
        query=("dpkg", "-s"),
        env={"DEBIAN_FRONTEND": "noninteractive"},
        base_package="base-files",
        clean=("apt-get", "clean"),
    ),
    "dnf": Recipe(
        "dnf",
        update=("dnf", "makecache", "-q"),
        install=("dnf", "install", "-y", "-q"),
        query=("rpm", "-q"),
        base_package="setup",
        clean=("dnf", "clean", "all"),
    ),
    "apk": Recipe(
        "apk",
        update=("apk", "update", "-q"),
        install=("apk", "add", "-q"),
        query=("apk", "info", "-e"),
        base_package="alpine-baselayout",
    ),
    "pacman": Recipe(
        "pacman",
        update=("pacman", "-Sy", "--noconfirm"),
        install=("pacman", "-S", "--noconfirm", "--needed"),
        query=("pacman", "-Q"),
        base_package="filesystem",
        clean=("pacman", "-Scc", "--noconfirm"),
    ),
}

# os-release ID (or an ID_LIKE word) -> package manager
FAMILIES = {
    "debian": "apt",
    "ubuntu": "apt",
    "fedora": "dnf",
    "rhel": "dnf",
    "centos": "dnf",
    "rocky": "dnf",
    "almalinux": "dnf",
    "alpine": "apk",
    "arch": "pacman",
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


def _inside(rootfs: Path, path: str) -> Path:
    """Resolve an absolute symlink the way it would resolve inside the image."""
    candidate = rootfs / path.lstrip("/")
    for _ in range(8):
        if not candidate.is_symlink():
            break
        target = candidate.readlink()
        candidate = rootfs / str(target).lstrip("/") if target.is_absolute() else candidate.parent / target
    return candidate


def detect(rootfs: Path) -> Distro:
    text = ""
    for path in ("etc/os-release", "usr/lib/os-release"):
        candidate = _inside(rootfs, path)
        if candidate.is_file():
            text = candidate.read_text(errors="replace")
            break
    info = parse_os_release(text)
    words = [info.get("ID", ""), *info.get("ID_LIKE", "").split()]
    manager = next((FAMILIES[w] for w in words if w in FAMILIES), None)
    init = _inside(rootfs, "sbin/init")
    has_systemd = (init.exists() and "systemd" in init.name) or any(
        _inside(rootfs, p).exists() for p in ("usr/lib/systemd/systemd", "lib/systemd/systemd")
    )
    return Distro(
        id=info.get("ID", "unknown"),
        version_id=info.get("VERSION_ID", info.get("VERSION_CODENAME", "")),
        pretty_name=info.get("PRETTY_NAME", info.get("ID", "unknown")),
        recipe=RECIPES[manager] if manager else None,
        has_systemd=has_systemd,
    )
