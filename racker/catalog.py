"""The image catalogue: one TOML file per image in images/.

# images/debian-bookworm.toml
description = "Debian 12 (bookworm)"
source = "bootstrap:debian/bookworm"
packages = ["systemd", "dbus", "openssh-server"]
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from racker.errors import UnknownImage


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    source: str
    description: str = ""
    packages: tuple[str, ...] = ()
    apt_options: tuple[str, ...] = ()
    options: dict = field(default_factory=dict, hash=False, compare=False)
    recipe: str = ""  # hash of the file: a changed entry means a rebuild


def catalog_dirs() -> list[Path]:
    """Where catalogue files live: $RACKER_CATALOG, the source tree, then the installed copy."""
    dirs = []
    if os.environ.get("RACKER_CATALOG"):
        dirs.append(Path(os.environ["RACKER_CATALOG"]))
    dirs.append(Path(__file__).resolve().parent.parent / "images")
    dirs.append(Path(sys.prefix) / "share" / "racker" / "images")
    return dirs


def recipe_of(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def find_file(name: str) -> Path | None:
    """The catalogue file for `name`, without reading the others."""
    for directory in catalog_dirs():
        path = directory / f"{name}.toml"
        if path.is_file():
            return path
    return None


def _load(path: Path) -> CatalogEntry:
    import tomllib  # only when an entry is really read: it costs every racker start ~15 ms

    raw = path.read_bytes()
    data = tomllib.loads(raw.decode())
    return CatalogEntry(
        name=path.stem,
        source=data["source"],
        description=data.get("description", ""),
        packages=tuple(data.get("packages", ())),
        apt_options=tuple(data.get("apt_options", ())),
        options={k: v for k, v in data.items() if k not in {"source", "description", "packages", "apt_options"}},
        recipe=recipe_of(raw),
    )


def entries() -> dict[str, CatalogEntry]:
    """Every catalogue image by name; an earlier directory wins over a later one."""
    found: dict[str, CatalogEntry] = {}
    for directory in reversed(catalog_dirs()):
        if directory.is_dir():
            for path in sorted(directory.glob("*.toml")):
                found[path.stem] = _load(path)
    return dict(sorted(found.items()))


def get(name: str) -> CatalogEntry:
    path = find_file(name)
    if path is not None:
        return _load(path)
    import difflib

    known = entries()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    suggestion = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
    raise UnknownImage(f"unknown image {name!r}{suggestion}")
