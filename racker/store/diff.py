"""Where two stored images differ: their packages (from the manifests) and their files (from the trees).

    racker diff A B [--json]

Packages are told apart by manager, name and architecture: added, removed, or changed
version. Files by path: added, removed, or changed in type, mode, owner, link target
or content. Both trees are only read and never followed through their links; a file
whose size and metadata match is compared by content (the same inode is the same file:
two names of one store image, or images linked from another store, cost nothing).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from racker import store
from racker.store import sbom


@dataclass
class Difference:
    packages: dict[str, list] = field(default_factory=lambda: {"added": [], "removed": [], "changed": []})
    files: dict[str, list[str]] = field(default_factory=lambda: {"added": [], "removed": [], "changed": []})

    @property
    def same(self) -> bool:
        return not any(self.packages.values()) and not any(self.files.values())

    def as_json(self) -> dict:
        return {"packages": self.packages, "files": self.files}


def images(a: store.StoredImage, b: store.StoredImage) -> Difference:
    found = Difference()
    found.packages = packages(sbom.of(a), sbom.of(b))
    if a.digest != b.digest:  # the digest covers every file: equal digests, equal trees
        with store.reading(a) as root_a, store.reading(b) as root_b:
            found.files = files(root_a, root_b)
    return found


def packages(before: list[dict], after: list[dict]) -> dict[str, list]:
    key = lambda p: (p.get("manager", ""), p["name"], p.get("arch", ""))  # noqa: E731
    old, new = {key(p): p for p in before}, {key(p): p for p in after}
    return {
        "added": [_said(new[k]) for k in sorted(new.keys() - old.keys())],
        "removed": [_said(old[k]) for k in sorted(old.keys() - new.keys())],
        "changed": [
            {**_said(new[k]), "version": new[k]["version"], "was": old[k]["version"]}
            for k in sorted(old.keys() & new.keys())
            if old[k]["version"] != new[k]["version"]
        ],
    }


def _said(package: dict) -> dict:
    return {k: package.get(k, "") for k in ("manager", "name", "version", "arch")}


def _listing(root: Path) -> dict[str, os.stat_result]:
    """Every path under `root` (relative, with a leading /) and its lstat: links are never followed."""
    found = {}
    for top, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(top, name)
            found["/" + os.path.relpath(path, root)] = os.lstat(path)
    return found


def files(root_a: Path, root_b: Path) -> dict[str, list[str]]:
    a, b = _listing(root_a), _listing(root_b)
    changed = []
    for rel in sorted(a.keys() & b.keys()):
        why = _changed(root_a, root_b, rel, a[rel], b[rel])
        if why:
            changed.append(f"{rel} ({why})")
    return {"added": sorted(b.keys() - a.keys()), "removed": sorted(a.keys() - b.keys()), "changed": changed}


def _changed(root_a: Path, root_b: Path, rel: str, x: os.stat_result, y: os.stat_result) -> str:
    """What differs of one path in two trees ("" if nothing)."""
    if stat.S_IFMT(x.st_mode) != stat.S_IFMT(y.st_mode):
        return "type"
    reasons = []
    if stat.S_IMODE(x.st_mode) != stat.S_IMODE(y.st_mode):
        reasons.append(f"mode {stat.S_IMODE(x.st_mode):o} → {stat.S_IMODE(y.st_mode):o}")
    if (x.st_uid, x.st_gid) != (y.st_uid, y.st_gid):
        reasons.append(f"owner {x.st_uid}:{x.st_gid} → {y.st_uid}:{y.st_gid}")
    path_a, path_b = str(root_a) + rel, str(root_b) + rel
    if stat.S_ISLNK(x.st_mode) and os.readlink(path_a) != os.readlink(path_b):
        reasons.append("link target")
    elif stat.S_ISREG(x.st_mode) and (x.st_dev, x.st_ino) != (y.st_dev, y.st_ino):
        if x.st_size != y.st_size or _content(path_a) != _content(path_b):
            reasons.append("content")
    elif (stat.S_ISCHR(x.st_mode) or stat.S_ISBLK(x.st_mode)) and x.st_rdev != y.st_rdev:
        reasons.append("device")
    return ", ".join(reasons)


def _content(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").digest()


def lines(a: str, b: str, found: Difference) -> list[str]:
    """The difference as a person reads it."""
    if found.same:
        return [f"{a} and {b} hold the same files and packages"]
    p, f = found.packages, found.files
    out = [f"packages: {len(p['added'])} added, {len(p['removed'])} removed, {len(p['changed'])} changed"]
    out += [f"+ {x['name']} {x['version']} ({x['arch'] or '-'}, {x['manager']})" for x in p["added"]]
    out += [f"- {x['name']} {x['version']} ({x['arch'] or '-'}, {x['manager']})" for x in p["removed"]]
    out += [f"~ {x['name']} {x['was']} → {x['version']} ({x['arch'] or '-'}, {x['manager']})" for x in p["changed"]]
    out.append(f"files: {len(f['added'])} added, {len(f['removed'])} removed, {len(f['changed'])} changed")
    out += [f"+ {x}" for x in f["added"]] + [f"- {x}" for x in f["removed"]] + [f"~ {x}" for x in f["changed"]]
    return out
