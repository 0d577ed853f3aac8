"""bootstrap:debian/SUITE — a root filesystem made by mmdebstrap from the archive."""

from __future__ import annotations

import os
from pathlib import Path

from racker import proc, progress
from racker.catalog import CatalogEntry
from racker.refs import Reference

MIRRORS = {
    "debian": os.environ.get("RACKER_DEBIAN_MIRROR", "http://deb.debian.org/debian"),
    "ubuntu": os.environ.get("RACKER_UBUNTU_MIRROR", "http://archive.ubuntu.com/ubuntu"),
}

# What a booted system needs to reach `running` with sshd answering.
DEFAULT_PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "iproute2", "procps")


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
    argv += [suite, str(rootfs), MIRRORS[distro]]
    with progress.step(f"bootstrapping {distro} {suite} with mmdebstrap"):
        proc.run(argv, timeout=1800)
    return {"bootstrap": {"distro": distro, "suite": suite, "packages": list(packages)}}
