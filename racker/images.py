"""Pull: turn a reference into an image in the store, building it at most once."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from racker import catalog, distros, progress, store
from racker.catalog import CatalogEntry
from racker.errors import StoreError, UnknownImage
from racker.refs import Reference, parse
from racker.sources import source_for


def resolve(text: str) -> tuple[str, Reference, CatalogEntry | None]:
    """(store name, source reference, catalogue entry or None) for what a user typed."""
    ref = parse(text)
    if ref.scheme == "catalog":
        try:
            entry = catalog.get(ref.target)
        except UnknownImage:
            if store.lookup(ref.target) is not None:
                return ref.target, ref, None  # made here (prepared, imported), not from the catalogue
            raise
        return entry.name, parse(entry.source), entry
    return str(ref), ref, None


def find(text: str) -> store.StoredImage:
    """An image that is already in the store, without building anything."""
    name, _ref, _entry = resolve(text)
    image = store.lookup(name)
    if image is None:
        raise StoreError(f"image {name!r} is not in the store", hint=f"run: racker pull {name}")
    return image


def pull(text: str, *, force: bool = False) -> store.StoredImage:
    """The stored image for `text`, built first if missing, stale or forced.

    Any number of processes may pull the same image at once: the lock makes
    exactly one build it and the others find it done.
    """
    if not force:
        present = _present_catalog_image(text)
        if present is not None:
            return present
    name, ref, entry = resolve(text)
    if ref.scheme == "catalog":
        image = store.lookup(name)
        if image is None:
            raise StoreError(f"image {name!r} disappeared from the store")
        if force:
            raise StoreError(f"image {name!r} was made locally and cannot be rebuilt from a source")
        return image
    recipe = entry.recipe if entry else str(ref)
    image = store.lookup(name)
    if image is not None and image.recipe == recipe and not force:
        return image  # fast path: no lock, no network
    with store.locked(f"image-{name}"):
        image = store.lookup(name)
        if image is not None and image.recipe == recipe and not force:
            return image
        acquire = source_for(ref)
        with progress.step(f"pulling {name}"), store.workdir("pull") as work:
            rootfs = work / "rootfs"
            fields = acquire(ref, entry, rootfs)
            normalise(rootfs)
            distro = distros.detect(rootfs)
            manifest = dict(fields, name=name, distro=distro.as_json())
            with progress.step("storing"):
                return store.commit(name, rootfs, source=str(ref), recipe=recipe, manifest=manifest)


def _present_catalog_image(name: str) -> store.StoredImage | None:
    """A catalogue image already built from the current catalogue file: no parsing, no lock."""
    path = catalog.find_file(name)
    if path is None:
        return None
    image = store.lookup(name)
    if image is not None and image.recipe == catalog.recipe_of(path.read_bytes()):
        return image
    return None


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
