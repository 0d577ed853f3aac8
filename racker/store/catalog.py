"""The image catalogue: one TOML file per image in images/.

# images/debian-bookworm.toml
description = "Debian 12 (bookworm)"
source = "bootstrap:debian/bookworm"
packages = ["systemd", "dbus", "openssh-server"]

Every key a file may hold is declared once, in KEYS; a file with an unknown
key, a missing `source`, a value of the wrong type or bad TOML is refused
with one line naming the file and the key, never read as a different image.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from racker import settings
from racker.errors import BadReference, RackerError, UnknownImage
from racker.store import refs


class BadCatalogEntry(RackerError):
    """A catalogue file racker cannot read as an image: bad TOML, an unknown key, a wrong type."""


@dataclass(frozen=True)
class Key:
    kind: type  # str; list: a list of strings; dict: a table of strings; bool
    example: str  # what a right value looks like, for the error message
    required: bool = False
    field: bool = True  # a CatalogEntry field; otherwise kept in CatalogEntry.options for the source to read

    def describe(self) -> str:
        return {str: "a string", list: "a list of strings", dict: "a table of strings", bool: "true or false"}[self.kind]


KEYS: dict[str, Key] = {
    "source": Key(str, '"bootstrap:debian/bookworm"', required=True),
    "description": Key(str, '"Debian 12 (bookworm)"'),
    "packages": Key(list, '["systemd", "dbus"]'),
    "apt_options": Key(list, """['Acquire::Check-Valid-Until "false"']"""),
    "variant": Key(str, '"minbase"', field=False),  # mmdebstrap --variant, read by sources/bootstrap.py
    # false: named only when asked for, not in the default image set (`racker nightly` without
    # names, `--racker-images all`), e.g. while an image is new and its cost in the nightly unknown.
    "default_set": Key(bool, "false", field=False),
    # Whether `racker nightly` without names takes it (default: as default_set). true puts an image in
    # the nightly's report that `--racker-images all` leaves out (the set users' own suites run on).
    "nightly": Key(bool, "true", field=False),
    # Read by sources/dockerfile.py: docker build's --build-arg and --target.
    "build_args": Key(dict, '{ GREETING = "hello" }', field=False),
    "target": Key(str, '"runtime"', field=False),
    # Also read by sources/dockerfile.py (sources/build_mounts.py checks them): what RUN steps see
    # and the image never keeps: buildah build's --volume and --secret, and the host's CA bundle.
    "volumes": Key(list, '["/srv/cache:/cache:ro"]', field=False),
    "secrets": Key(list, '["id=token,src=/etc/racker/token"]', field=False),
    "host_ca": Key(bool, "true", field=False),
}


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    source: str
    description: str = ""
    packages: tuple[str, ...] = ()
    apt_options: tuple[str, ...] = ()
    options: dict = field(default_factory=dict, hash=False, compare=False)
    recipe: str = ""  # hash of the file: a changed entry means a rebuild
    path: Path | None = field(default=None, compare=False)  # the file, for errors and paths relative to it


def catalog_dirs() -> list[Path]:
    """Where catalogue files live: $RACKER_CATALOG, the source tree, then the installed copy."""
    dirs = []
    if (configured := settings.CATALOG.get()) is not None:
        dirs.append(configured)
    dirs.append(Path(__file__).resolve().parents[2] / "images")
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


def _close(word: str, known: list[str], n: int = 3) -> list[str]:
    import difflib

    return difflib.get_close_matches(word, known, n=n, cutoff=0.5)


def _type_name(value: object) -> str:
    return {str: "a string", list: "a list", dict: "a table", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def validate(path: Path, data: dict) -> None:
    """Raise BadCatalogEntry, naming the file and the key, unless `data` is a valid entry."""
    for key in data:
        if key not in KEYS:
            near = _close(key, list(KEYS), n=1)
            advice = f"did you mean {near[0]!r}?" if near else f"known keys: {', '.join(KEYS)}"
            raise BadCatalogEntry(f"catalogue file {path}: unknown key {key!r}; {advice}")
    for key, spec in KEYS.items():
        if key not in data:
            if spec.required:
                raise BadCatalogEntry(f"catalogue file {path}: no {key!r}, which every entry needs, e.g. {key} = {spec.example}")
            continue
        value = data[key]
        if spec.kind in (str, bool):
            wrong = None if type(value) is spec.kind else _type_name(value)
        elif spec.kind is dict:
            items = value.values() if isinstance(value, dict) else ()
            wrong = (
                _type_name(value)
                if not isinstance(value, dict)
                else next(("a table holding " + _type_name(v) for v in items if not isinstance(v, str)), None)
            )
        elif not isinstance(value, list):
            wrong = _type_name(value)
        else:
            wrong = next(("a list holding " + _type_name(v) for v in value if not isinstance(v, str)), None)
        if wrong is not None:
            raise BadCatalogEntry(f"catalogue file {path}: {key} must be {spec.describe()}, not {wrong}, e.g. {key} = {spec.example}")
    try:
        source = refs.parse(data["source"])
    except BadReference as error:
        raise BadCatalogEntry(f"catalogue file {path}: source: {error}") from None
    if source.scheme == "catalog":
        raise BadCatalogEntry(
            f"catalogue file {path}: source {data['source']!r} is a catalogue name, not a source, e.g. source = {KEYS['source'].example}"
        )


def _load(path: Path) -> CatalogEntry:
    import tomllib  # only when an entry is really read: it costs every racker start ~15 ms

    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise BadCatalogEntry(f"catalogue file {path} is not valid TOML: {error}") from None
    validate(path, data)
    fields = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items() if KEYS[key].field}
    options = {key: value for key, value in data.items() if not KEYS[key].field}
    return CatalogEntry(name=path.stem, **fields, options=options, recipe=recipe_of(raw), path=path)


def entries() -> dict[str, CatalogEntry]:
    """Every catalogue image by name; an earlier directory wins over a later one."""
    found: dict[str, Path] = {}
    for directory in reversed(catalog_dirs()):
        if directory.is_dir():
            for path in sorted(directory.glob("*.toml")):
                found[path.stem] = path
    return {name: _load(path) for name, path in sorted(found.items())}


def default_set() -> list[str]:
    """The images a run takes when none are named: every entry but those with default_set = false."""
    return [name for name, entry in entries().items() if entry.options.get("default_set", True)]


def nightly_set() -> list[str]:
    """The images `racker nightly` takes when none are named: the default set, with the entries
    marked `nightly = true` and without those marked `nightly = false`."""
    return [name for name, entry in entries().items() if entry.options.get("nightly", entry.options.get("default_set", True))]


def get(name: str) -> CatalogEntry:
    path = find_file(name)
    if path is not None:
        return _load(path)
    known = entries()
    close = _close(name, list(known))
    suggestion = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
    raise UnknownImage(f"unknown image {name!r}{suggestion}")
