"""Image sources, one module per reference scheme, imported only when used.

Each module has `acquire(ref, entry, rootfs) -> dict`: it fills the empty
directory `rootfs` with the image's root filesystem and returns manifest fields.

What holds for one pull only (--insecure, --keyring) is set around its acquire
with `insecure_pull()`, never in the environment, so it cannot reach another pull.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path

from racker.catalog import CatalogEntry
from racker.errors import BadReference
from racker.refs import LOCAL_IMAGE_SCHEMES, Reference

SOURCES: dict[str, str] = {
    "bootstrap": "racker.sources.bootstrap",
    "docker": "racker.sources.oci",
    "docker-daemon": "racker.sources.daemon",
    "dockerfile": "racker.sources.dockerfile",
    **{scheme: "racker.sources.oci" for scheme in LOCAL_IMAGE_SCHEMES},
    "vagrant": "racker.sources.vagrant",
    # Root tarballs, disk images, Vagrant boxes and OVAs, told apart by content.
    "https": "racker.sources.fetched",
    "http": "racker.sources.fetched",
    "file": "racker.sources.fetched",
}

Acquire = Callable[[Reference, "CatalogEntry | None", Path], dict]


def source_for(ref: Reference) -> Acquire:
    module_name = SOURCES.get(ref.scheme)
    if module_name is None:
        supported = ", ".join(f"{s}:" for s in SOURCES)
        raise BadReference(f"{ref.scheme}: images are not supported yet (supported: {supported})")
    module = importlib.import_module(module_name)
    return module.acquire


def recipe_for(ref: Reference, entry: CatalogEntry | None = None) -> str:
    """What an image acquired from `ref` depends on: the reference (or the catalogue entry's
    file), and more where the source says: a local archive or a Dockerfile's build context
    as it is now, so that a changed file is acquired again."""
    base = entry.recipe if entry is not None else str(ref)
    module_name = SOURCES.get(ref.scheme)
    signature = getattr(importlib.import_module(module_name), "recipe", None) if module_name else None
    if signature is None:
        return base
    return signature(ref) if entry is None else f"{base} {signature(ref)}"


# --insecure: the registry of the pull in progress (and its configured mirrors) may answer plain
# HTTP or with a certificate nobody verified. Read by the sources that reach registries.
_INSECURE: ContextVar[bool] = ContextVar("racker_insecure_pull", default=False)
# --keyring: the OpenPGP keyring a download's SHA256SUMS must be signed with.
_KEYRING: ContextVar[Path | None] = ContextVar("racker_pull_keyring", default=None)


@contextlib.contextmanager
def insecure_pull(allowed: bool, keyring: Path | None = None) -> Iterator[None]:
    """Inside the block, the pull may skip TLS verification if `allowed`, and checks
    signatures against `keyring`; afterwards, as before."""
    token, keyring_token = _INSECURE.set(allowed), _KEYRING.set(keyring)
    try:
        yield
    finally:
        _INSECURE.reset(token)
        _KEYRING.reset(keyring_token)


def insecure() -> bool:
    """Whether the pull in progress was asked for with --insecure."""
    return _INSECURE.get()


def keyring() -> Path | None:
    """The keyring the pull in progress was given with --keyring, if any."""
    return _KEYRING.get()
