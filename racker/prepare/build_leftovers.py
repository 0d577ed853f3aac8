"""What building an image leaves in it, and what of the build host: the rules, in one table.

A distribution's own cloud image ships none of what its build left (Debian's
debian-cloud-images empties /run, /tmp, /var/tmp, /var/cache/apt and
/var/lib/apt/lists in its last FAI script), and nothing of the host it was
built on. RULES say what prepare removes from a prepared image; `found` says
what each rule finds in any tree: prepare's root filesystem, or a promoted
disk's files dumped by debugfs (the tests and bench/build_leftovers.py).
`host_traces` looks for the build host itself: its resolvers, its names, its
apt proxy, its own CA certificates.

Caches kept (KEPT) are those a package needs at run time and nothing rebuilds.
Every path is reached without following the image's links: a link where a
directory is expected (an image's /run -> /) stops the rule there.
"""

from __future__ import annotations

import fnmatch
import os
import re
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from racker import store


@dataclass(frozen=True)
class Rule:
    """Entries of one directory of the image (relative to its root; "" is the root) that a cloud image does not ship."""

    name: str
    directory: str
    patterns: tuple[str, ...] = ("*",)
    links_only: bool = False  # only symlinks match (a real file of that name is the image's own)


RULES: tuple[Rule, ...] = (
    # tmpfs at boot: what the image holds there is the build's (and hidden under the mount).
    Rule("/run", "run"),
    Rule("/tmp", "tmp"),
    Rule("/var/tmp", "var/tmp"),
    # apt's index, its partial downloads, auxfiles and lock: the first `apt update` makes them again.
    Rule("apt lists", "var/lib/apt/lists"),
    # apt's package caches and downloaded .debs (archives/partial, lock): apt makes them again.
    Rule("apt cache", "var/cache/apt"),
    # ldconfig's speed-up of its next run; the next ldconfig writes it again.
    Rule("ldconfig cache", "var/cache/ldconfig", ("aux-cache",)),
    # man-db's index, rebuilt by man-db.service / mandb.
    Rule("man-db cache", "var/cache/man"),
    # debconf's backups of its database (the database itself is KEPT).
    Rule("debconf backups", "var/cache/debconf", ("*-old",)),
    # systemd-resolved's postinst keeps the resolv.conf it replaced: the build host's, copied in by nspawn.
    Rule("resolv.conf backup", "etc", (".resolv.conf.systemd-resolved.bak",)),
    # The kernel package's links at / (Debian's kernel-img.conf default); a bootloader reads /boot.
    Rule("kernel links at /", "", ("vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"), links_only=True),
)

# Run-time caches that stay, and why: nothing rebuilds them.
KEPT: dict[str, str] = {
    "var/cache/debconf/config.dat": "debconf's answers: package upgrades and dpkg-reconfigure read them",
    "var/cache/debconf/templates.dat": "debconf's templates of the installed packages: their maintainer scripts ask through them",
    "var/cache/debconf/passwords.dat": "debconf's password answers (empty here), part of the same database",
}

KERNEL_LINKS = next(rule for rule in RULES if rule.name == "kernel links at /")

# apt configuration that makes it go through a proxy: the build host's, not the cloud's.
APT_PROXY = re.compile(r"^[ \t]*Acquire::[\w-]+::Proxy\b.*\n?", re.M | re.I)


def _directory(root: Path, rel: str) -> Path | None:
    """root/rel when every component of rel is a real directory (no link followed), else None."""
    path = root
    for part in PurePosixPath(rel).parts:
        path = path / part
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return None
        except FileNotFoundError:
            return None
    return path


def matches(root: Path, rule: Rule) -> list[str]:
    """The paths (relative to root) that `rule` finds in the tree."""
    directory = _directory(root, rule.directory)
    if directory is None:
        return []
    found = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if any(fnmatch.fnmatchcase(entry.name, p) for p in rule.patterns) and (entry.is_symlink() or not rule.links_only):
            found.append(str(PurePosixPath(rule.directory, entry.name)))
    return found


def found(root: Path) -> dict[str, list[str]]:
    """{rule name: the paths it finds}, for every rule."""
    return {rule.name: matches(root, rule) for rule in RULES}


def remove(root: Path, keep: frozenset[str] = frozenset()) -> list[str]:
    """Remove what the rules find, except the paths in `keep` (an image's own kernel links): what went."""
    removed = []
    for rule in RULES:
        for rel in matches(root, rule):
            if rel in keep:
                continue
            path = root / rel
            if path.is_dir() and not path.is_symlink():
                store.remove_tree(path)
            else:
                path.unlink()
            removed.append(rel)
    return removed


def kernel_links(root: Path) -> frozenset[str]:
    """The kernel links an image has at its root (before prepare: they stay)."""
    return frozenset(matches(root, KERNEL_LINKS))


# -- the build host's traces ----------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """What of the build host could land in an image."""

    resolvers: tuple[str, ...]  # nameserver addresses of its resolv.conf
    names: tuple[str, ...]  # its host name, FQDN, and the names its /etc/hosts gives its own addresses
    cas: tuple[bytes, ...] = ()  # the base64 bodies of the CA certificates it adds (/usr/local/share/ca-certificates)


# Names every system's hosts file has: not the build host's own.
GENERIC_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", "ip6-localnet",
                           "ip6-mcastprefix", "ip6-allnodes", "ip6-allrouters", "broadcasthost"})  # fmt: skip


def this_host(etc: Path = Path("/etc"), local_cas: Path = Path("/usr/local/share/ca-certificates")) -> Host:
    """The build host's resolvers, names and local CAs."""
    resolvers = []
    resolv = etc / "resolv.conf"
    if resolv.exists():
        resolvers = re.findall(r"^\s*nameserver\s+(\S+)", resolv.read_text(errors="replace"), re.M)
    names = {socket.gethostname(), socket.getfqdn()}
    hosts = etc / "hosts"
    if hosts.exists():
        for line in hosts.read_text(errors="replace").splitlines():
            fields = line.split("#", 1)[0].split()
            names.update(fields[1:])
    cas = []
    if local_cas.is_dir():
        for cert in sorted(local_cas.rglob("*.crt")):
            for body in re.findall(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", cert.read_bytes(), re.S):
                cas.append(b"".join(body.split()))
    return Host(tuple(dict.fromkeys(resolvers)), tuple(sorted(n for n in names - GENERIC_NAMES if n)), tuple(cas))


# Where a build would record the host's names: configuration and state, not documentation or code.
NAME_DIRECTORIES = ("etc", "var/lib", "var/log", "root", "home")
_TEXT_MAX = 1 << 20


def _files(root: Path, under: str = "") -> Iterator[tuple[str, Path]]:
    """(relative path, path) of every regular file under root/under, never through a link."""
    start = _directory(root, under)
    if start is None:
        return
    for directory, dirs, files in os.walk(start):  # os.walk does not descend into linked directories
        dirs.sort()
        for name in sorted(files):
            path = Path(directory, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                yield str(path.relative_to(root)), path


def _name_pattern(name: str) -> re.Pattern[bytes]:
    # A whole host name: not part of a longer name, a dotted key (vm.swappiness) or base64.
    return re.compile(rb"(?<![\w.+/-])" + re.escape(name.encode()) + rb"(?![\w.+/-])")


def host_traces(root: Path, host: Host) -> dict[str, list[str]]:
    """{what: files of the tree holding it}: the host's resolvers (anywhere), its names (in
    NAME_DIRECTORIES), apt proxy settings, the host's own CA certificates, a resolv.conf that is a file."""
    traces: dict[str, list[str]] = {"host resolver": [], "host name": [], "apt proxy": [], "host CA": []}
    resolvers = [(a.encode(), re.compile(rb"(?<![\d.])" + re.escape(a.encode()) + rb"(?![\d.])")) for a in host.resolvers]
    names = [_name_pattern(n) for n in host.names]
    for rel, path in _files(root):
        data = path.read_bytes()
        if any(a in data and p.search(data) for a, p in resolvers):  # `in` first: much faster than a regex
            traces["host resolver"].append(rel)
        if any(ca[:64] in data for ca in host.cas):  # a PEM's first line of base64: 64 characters in one piece
            traces["host CA"].append(rel)
        if len(data) <= _TEXT_MAX and any(rel.startswith(d + "/") for d in NAME_DIRECTORIES) and any(p.search(data) for p in names):
            traces["host name"].append(rel)
    traces["apt proxy"] = host_traces_apt_proxy(root)
    return traces


def host_traces_apt_proxy(root: Path) -> list[str]:
    """apt's configuration files (apt.conf, apt.conf.d) that send apt through a proxy."""
    return [
        rel
        for rel, path in _files(root, "etc/apt")
        if (rel == "etc/apt/apt.conf" or rel.startswith("etc/apt/apt.conf.d/")) and APT_PROXY.search(path.read_text(errors="replace"))
    ]
