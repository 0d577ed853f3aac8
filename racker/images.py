"""Pull: turn a reference into an image in the store, building it at most once."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from racker import catalog, distros, progress, store
from racker.catalog import CatalogEntry
from racker.errors import BadReference, StoreError, UnknownImage
from racker.platforms import Platform
from racker.refs import PREPARED, Reference, parse
from racker.sources import insecure_pull, recipe_for, source_for


@dataclass(frozen=True)
class Resolved:
    """What a reference names: the store name, and where the image comes from."""

    name: str
    source: Reference | None  # None: made here (prepared, named locally), so only the store has it
    entry: CatalogEntry | None = None


def resolve(text: str, platform: Platform | None = None) -> Resolved:
    """The store name and source of what a user typed, for `platform` if given (--platform).

    Every name the store lists resolves to itself: catalogue names, NAME+vm,
    scheme names (bootstrap:debian/bookworm), docker names with their platform
    (docker://debian:bookworm@linux-arm64) and names made here. A platform other
    than the host's is part of the name, so that two platforms of one image are
    two stored images, never served for each other.
    """
    resolved = _resolve(text)
    if platform is None:
        return resolved
    ref = resolved.source
    if ref is None or resolved.entry is not None:
        raise BadReference(f"a platform can only be chosen for docker:// images, not {resolved.name}")
    chosen = ref.for_platform(platform)
    if ref.platform is not None and ref.platform != chosen.platform:
        raise BadReference(f"{ref} names the platform {ref.platform}, not {platform}")
    return Resolved(str(chosen), chosen)


def _resolve(text: str) -> Resolved:
    try:
        ref = parse(text)
    except BadReference:
        if store.lookup(text) is not None:
            return Resolved(text, None)  # a name the store holds is an image, whatever its shape
        raise
    if ref.prepared:
        return Resolved(str(ref), None)
    if ref.scheme == "catalog":
        try:
            entry = catalog.get(ref.target)
        except UnknownImage:
            if store.lookup(ref.target) is not None:
                return Resolved(ref.target, None)  # made here (imported, committed), not from the catalogue
            raise
        return Resolved(entry.name, parse(entry.source), entry)
    return Resolved(str(ref), ref)


def find(text: str) -> store.StoredImage:
    """An image that is already in the store, without building anything."""
    resolved = resolve(text)
    image = store.lookup(resolved.name)
    if image is None:
        if resolved.source is None:
            return _made_here(resolved.name, force=False)  # raises, with what makes it
        raise StoreError(f"image {resolved.name!r} is not in the store", hint=f"run: racker pull {resolved.name}")
    return image


def pull(
    text: str, *, force: bool = False, platform: Platform | None = None, insecure: bool = False, keyring: Path | None = None
) -> store.StoredImage:
    """The stored image for `text`, built first if missing, stale or forced.

    `platform`: which image of a multi-arch index (default: the host's).
    `insecure`: this pull's registry may answer plain HTTP or unverified TLS.
    `keyring`: a download's SHA256SUMS must carry a signature by a key in this file.
    Any number of processes may pull the same image at once: the lock makes
    exactly one build it and the others find it done.
    """
    if not force and platform is None:
        present = _present_catalog_image(text)
        if present is not None:
            return present
    resolved = resolve(text, platform)
    name, ref, entry = resolved.name, resolved.source, resolved.entry
    if ref is None:
        return _made_here(name, force=force)
    recipe = recipe_for(ref, entry)
    image = store.lookup(name)
    if image is not None and image.recipe == recipe and not force:
        return image  # fast path: no lock, no network
    with store.locked(f"image-{name}"):
        image = store.lookup(name)
        if image is not None and image.recipe == recipe and not force:
            return image
        acquire = source_for(ref)
        with progress.step(f"pulling {name}"), store.workdir("pull") as work, insecure_pull(insecure, keyring):
            rootfs = work / "rootfs"
            fields = acquire(ref, entry, rootfs)
            normalise(rootfs)
            distro = distros.detect(rootfs)
            manifest = dict(fields, name=name, distro=distro.as_json())
            with progress.step("storing"):
                return store.commit(name, rootfs, source=str(ref), recipe=recipe, manifest=manifest)


def _made_here(name: str, *, force: bool) -> store.StoredImage:
    """An image racker made (NAME+vm) or was given a name for: the store has it, or nothing does."""
    image = store.lookup(name)
    prepared_from = name.removesuffix(PREPARED) if name.endswith(PREPARED) else None
    if image is None:
        hint = f"it is prepared by: racker promote {prepared_from} (or racker vm start {prepared_from})" if prepared_from else None
        raise StoreError(f"image {name!r} is not in the store", hint=hint)
    if force:
        raise StoreError(f"image {name!r} was made locally and cannot be rebuilt from a source")
    return image


def _present_catalog_image(name: str) -> store.StoredImage | None:
    """A catalogue image already built from the current catalogue file and what its source
    depends on (a bootstrap's apt sources): no lock, no network."""
    if catalog.find_file(name) is None:
        return None
    image = store.lookup(name)
    if image is None:
        return None
    entry = catalog.get(name)
    return image if image.recipe == recipe_for(parse(entry.source), entry) else None


def normalise(rootfs: Path) -> None:
    """Make a fresh rootfs boot as itself, not as a copy of the build host.

    The hostname is the machine name nspawn (or cloud-init) gives, and the
    machine-id is empty so that every boot makes its own.
    """
    etc = rootfs / "etc"
    if not etc.is_dir() or etc.is_symlink():
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(etc / "hostname")  # unlink never follows a symlink
    machine_id = etc / "machine-id"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(machine_id)
    fd = os.open(machine_id, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
    os.close(fd)


def import_image(name: str, path: Path) -> store.StoredImage:
    """Store the root filesystem at `path` (a directory or a tarball) as the image `name`.

    Importing the same, unchanged file again does nothing; a changed one makes a new image.
    """
    from racker.sources import rootfs as local

    reference = parse(name)
    if reference.scheme != "catalog" or reference.prepared:
        raise BadReference(f"{name!r} cannot name an imported image: use a plain name such as my-image")
    if catalog.find_file(name) is not None:
        raise BadReference(f"{name!r} is a catalogue image; import under another name")
    path = path.absolute()
    if not path.exists():
        raise BadReference(f"nothing to import at {path}")
    recipe = local.signature(path)
    found = store.lookup(name)
    if found is not None and found.recipe == recipe:
        return found
    with store.locked(f"image-{name}"), progress.step(f"importing {path} as {name}"), store.workdir("import") as work:
        rootfs = work / "rootfs"
        local.unpack(path, rootfs)
        normalise(rootfs)
        manifest = {"name": name, "distro": distros.detect(rootfs).as_json(), "imported": {"path": str(path)}}
        return store.commit(name, rootfs, source=f"import:{path}", recipe=recipe, manifest=manifest)
