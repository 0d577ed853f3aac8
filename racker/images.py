"""Pull: turn a reference into an image in the store, building it at most once."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from racker import progress, store
from racker.errors import BadReference, RackerError, StoreError, UnknownImage, UpstreamError
from racker.sources import acquiring_seen, insecure_pull, recipe_for, same_upstream, source_for, upstream_state
from racker.store import catalog, distros, reproducible
from racker.store.catalog import CatalogEntry
from racker.store.platforms import Platform
from racker.store.refs import PREPARED, Reference, parse


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
    if ref is None:
        raise BadReference(f"a platform can only be chosen for docker://, bootstrap: and catalogue images, not {resolved.name}")
    chosen = ref.for_platform(platform)
    if ref.platform is not None and ref.platform != chosen.platform:
        raise BadReference(f"{resolved.name} names the platform {ref.platform}, not {platform}")
    if resolved.entry is not None:
        return Resolved(_platform_name(resolved.entry.name, chosen), chosen, resolved.entry)
    return Resolved(str(chosen), chosen)


def _platform_name(name: str, source: Reference) -> str:
    """A catalogue image's store name for its source's platform: debian-bookworm@linux-arm64."""
    return f"{name}@{source.platform.tag}" if source.platform is not None else name


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
        source = parse(entry.source).for_platform(ref.platform)
        return Resolved(_platform_name(entry.name, source), source, entry)
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
    if ref.scheme == "bootstrap" and ref.platform is not None:
        from racker.cpu import emulation

        emulation.ensure(ref.platform)  # before the archive is asked: a platform that cannot run here is one line
    with store.locked(f"image-{name}"):
        image = store.lookup(name)
        if image is not None and image.recipe == recipe and not force:
            return image
        return _acquire(name, ref, entry, recipe, insecure=insecure, keyring=keyring)


def _acquire(
    name: str, ref: Reference, entry: CatalogEntry | None, recipe: str, *, insecure: bool, keyring: Path | None, seen: dict | None = None
) -> store.StoredImage:
    """Acquire `ref` into the store as `name`, recording its upstream state (`seen`, else asked now).
    The caller holds the lock for `name`."""
    acquire = source_for(ref)
    with progress.step(f"pulling {name}"), store.workdir("pull") as work, insecure_pull(insecure, keyring):
        if seen is None:
            seen = _ask_upstream(ref, entry)
        with acquiring_seen(seen.get("state") if seen else None):
            rootfs = work / "rootfs"
            fields = acquire(ref, entry, rootfs)
        normalise(rootfs)
        epoch = reproducible.of(fields)
        if epoch is not None:  # the source's clock: nothing in the tree is newer (reproducible.py)
            reproducible.clamp_mtimes(rootfs, epoch)
        distro = distros.detect(rootfs)
        manifest = dict(fields, name=name, distro=distro.as_json())
        if seen:
            manifest["upstream"] = seen
        with progress.step("storing"):
            return store.commit(name, rootfs, source=str(ref), recipe=recipe, manifest=manifest)


def _ask_upstream(ref: Reference, entry: CatalogEntry | None) -> dict:
    """The upstream state at a first pull, so that a later refresh acquires only if it moved.
    Not asked or not answered: nothing recorded (the acquire itself says what is wrong)."""
    try:
        state = upstream_state(ref, entry)
    except RackerError:  # not answered, or a tool missing: the acquire says what is wrong, if anything
        return {}
    now = store.now()
    return {"state": state, "checked": now, "reached": now} if state is not None else {}


@dataclass
class Refreshed:
    """What a refresh did: `moved` if the upstream moved (or was never recorded) and the image was
    acquired again; `error`: the upstream was not reached or did not hold, and the stored image stays."""

    name: str
    image: store.StoredImage | None
    moved: bool = False
    error: RackerError | None = None

    @property
    def stale(self) -> bool:
        return self.error is not None

    @property
    def last_reached(self) -> str:
        """When the upstream last answered (or the image was built, if that was never recorded)."""
        if self.image is None:
            return ""
        return (self.image.manifest.get("upstream") or {}).get("reached") or self.image.created


def _recorded_states(image: store.StoredImage) -> set[str]:
    """The upstream states the stored image was made from: the one recorded, or for an image stored
    before racker recorded them, what its manifest says it was (a single manifest's digest, a file's
    sha256), so that such an image is not acquired again for nothing. A bootstrap has none: built again once."""
    manifest = image.manifest
    recorded = (manifest.get("upstream") or {}).get("state")
    if recorded:
        return {recorded}
    found = {(manifest.get("oci") or {}).get("manifest_digest") or ""}
    found |= {"sha256:" + ((manifest.get(kind) or {}).get("sha256") or "") for kind in ("tarball", "disk", "box", "ova")}
    return {state for state in found if state and state != "sha256:"}


def refresh(text: str, *, platform: Platform | None = None, insecure: bool = False, keyring: Path | None = None) -> Refreshed:
    """Ask `text`'s upstream what it holds now and acquire it again only if that moved.

    An upstream that does not answer or whose answer does not hold leaves the stored
    image as it was: Refreshed.error says why, in one line naming the image and the upstream
    (raised instead when there is no stored image to keep).
    """
    resolved = resolve(text, platform)
    name, ref, entry = resolved.name, resolved.source, resolved.entry
    if ref is None:
        return Refreshed(name, _made_here(name, force=False))
    recipe = recipe_for(ref, entry)
    with store.locked(f"image-{name}"):
        image = store.lookup(name)
        try:
            with insecure_pull(insecure, keyring), progress.step(f"asking {ref} for {name}"):
                state = upstream_state(ref, entry, image.manifest if image is not None else None)
        except UpstreamError as error:
            failed = type(error)(f"{name}: upstream {ref}: {error}", hint=error.hint)
            if image is None:
                raise failed from None
            return Refreshed(name, image, error=failed)
        now = store.now()
        stored = (image.manifest.get("upstream") or {}) if image is not None else {}
        if (
            image is not None
            and image.recipe == recipe
            and (state is None or any(same_upstream(ref, old, state) for old in _recorded_states(image)))
        ):
            if state is not None:
                image = store.mark_checked(name, dict(stored, state=state, checked=now, reached=now))
            return Refreshed(name, image)
        seen = {"state": state, "checked": now, "reached": now} if state is not None else {}
        try:
            fresh = _acquire(name, ref, entry, recipe, insecure=insecure, keyring=keyring, seen=seen)
        except RackerError as error:
            if image is None:
                raise
            return Refreshed(name, image, moved=True, error=UpstreamError(f"{name}: acquiring again from {ref} failed: {error}"))
        return Refreshed(name, fresh, moved=True)


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
