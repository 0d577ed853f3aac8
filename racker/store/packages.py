"""The packages an image holds, read from its own package databases: dpkg, rpm, apk and pacman.

Each is a list of {"name", "version", "arch", "source", "manager"}, sorted, stored in the
image's manifest at commit (store.commit), so that two images can be told apart by
their packages and `racker sbom` can write a standard SBOM without booting anything.

The databases are read from the host, inside a stranger's tree: every path goes through
read_inside() and list_inside(), which never follow a link of the image (a database
reached through a link is not read). They are the two functions to reroute once the
one helper that resolves paths inside an image tree (imagetree) is in.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from racker import proc
from racker.errors import RackerError

Package = dict[str, str]

DPKG_STATUS = "var/lib/dpkg/status"
APK_INSTALLED = "lib/apk/db/installed"
PACMAN_LOCAL = "var/lib/pacman/local"
RPM_DATABASES = ("var/lib/rpm", "usr/lib/sysimage/rpm")
LIMIT = 256 << 20  # a package database larger than this is no package database


@contextlib.contextmanager
def _opened(root: Path, rel: str, final: int) -> Iterator[int]:
    """An fd of `rel` under `root`, opened component by component without following a link."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parts = [p for p in rel.split("/") if p and p != "."]
        for number, part in enumerate(parts):
            if part == "..":
                raise FileNotFoundError(rel)
            flags = final if number == len(parts) - 1 else os.O_RDONLY | os.O_DIRECTORY
            child = os.open(part, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def read_inside(root: Path, rel: str) -> bytes | None:
    """The regular file `rel` of the tree `root`, or None if it is missing, not a file, or behind a link."""
    try:
        with _opened(root, rel, os.O_RDONLY | os.O_NONBLOCK) as fd:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > LIMIT:
                return None
            with os.fdopen(os.dup(fd), "rb") as handle:
                return handle.read(LIMIT + 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, OSError):
        return None


def list_inside(root: Path, rel: str) -> list[str]:
    """The names in the directory `rel` of the tree `root` ([] if missing or behind a link)."""
    try:
        with _opened(root, rel, os.O_RDONLY | os.O_DIRECTORY) as fd:
            return sorted(os.listdir(fd))
    except OSError:
        return []


def _stanzas(text: str) -> Iterator[dict[str, str]]:
    """RFC 822-like stanzas (dpkg's status): continuation lines belong to the field before."""
    fields: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
            fields, key = {}, ""
        elif line[0] in " \t":
            if key:
                fields[key] += "\n" + line
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    if fields:
        yield fields


def dpkg(root: Path) -> list[Package]:
    """Installed packages from dpkg's status file (the state dpkg-query reports)."""
    data = read_inside(root, DPKG_STATUS)
    if data is None:
        return []
    found = []
    for fields in _stanzas(data.decode("utf-8", "replace")):
        if fields.get("Status", "").split()[-1:] != ["installed"] or "Package" not in fields:
            continue
        source = fields.get("Source", "").split(" (")[0] or fields["Package"]
        found.append(_package("dpkg", fields["Package"], fields.get("Version", ""), fields.get("Architecture", ""), source))
    return found


def apk(root: Path) -> list[Package]:
    """Alpine's installed database: P: name, V: version, A: arch, o: origin (its source package)."""
    data = read_inside(root, APK_INSTALLED)
    if data is None:
        return []
    found = []
    for block in data.decode("utf-8", "replace").split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if len(line) > 1 and line[1] == ":")
        if "P" in fields:
            found.append(_package("apk", fields["P"], fields.get("V", ""), fields.get("A", ""), fields.get("o") or fields["P"]))
    return found


def pacman(root: Path) -> list[Package]:
    """Arch's local database: one directory per package, its desc holding %NAME%, %VERSION%, %ARCH%, %BASE%."""
    found = []
    for entry in list_inside(root, PACMAN_LOCAL):
        data = read_inside(root, f"{PACMAN_LOCAL}/{entry}/desc")
        if data is None:
            continue
        fields: dict[str, str] = {}
        for section in data.decode("utf-8", "replace").split("\n\n"):
            lines = section.strip().splitlines()
            if len(lines) >= 2 and lines[0].startswith("%") and lines[0].endswith("%"):
                fields[lines[0].strip("%")] = lines[1]
        if "NAME" in fields:
            found.append(
                _package("pacman", fields["NAME"], fields.get("VERSION", ""), fields.get("ARCH", ""), fields.get("BASE") or fields["NAME"])
            )
    return found


RPM_FORMAT = "%{NAME}\\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\\t%{ARCH}\\t%{SOURCERPM}\\n"


def rpm(root: Path) -> list[Package]:
    """rpm's database, queried by the host's rpm with --root (rpm has no format to read by hand).
    Not read where the database is behind a link, or where the host has no rpm."""
    if not any(list_inside(root, path) for path in RPM_DATABASES):
        return []
    try:
        result = proc.run(["rpm", "--root", str(root), "-qa", "--queryformat", RPM_FORMAT], timeout=300)
    except RackerError:
        return []
    found = []
    for line in result.stdout.splitlines():
        words = line.split("\t")
        if len(words) == 4:
            name, version, arch, source_rpm = words
            found.append(_package("rpm", name, version, arch, _source_name(source_rpm) or name))
    return found


def _source_name(source_rpm: str) -> str:
    """NAME of NAME-VERSION-RELEASE.src.rpm."""
    if not source_rpm.endswith(".src.rpm"):
        return ""
    parts = source_rpm.removesuffix(".src.rpm").rsplit("-", 2)
    return parts[0] if len(parts) == 3 else ""


def _package(manager: str, name: str, version: str, arch: str, source: str) -> Package:
    return {"name": name, "version": version, "arch": arch, "source": source, "manager": manager}


READERS: dict[str, Callable[[Path], list[Package]]] = {"dpkg": dpkg, "rpm": rpm, "apk": apk, "pacman": pacman}


def read(root: Path) -> list[Package]:
    """Every package the image's databases list, sorted by manager, name and architecture."""
    found = [package for reader in READERS.values() for package in reader(root)]
    return sorted(found, key=lambda p: (p["manager"], p["name"], p["arch"], p["version"]))
