"""Image sources, one module per reference scheme, imported only when used.

Each module has `acquire(ref, entry, rootfs) -> dict`: it fills the empty
directory `rootfs` with the image's root filesystem and returns manifest fields.
A module whose images come from somewhere that moves (an archive, a registry's tag,
a download) also has `upstream_state(ref, entry, stored) -> str | None`: what that upstream
holds now, asked cheaply and building nothing (a manifest digest, a signed index's
hashes, a checksum list's line); None where the recipe alone decides (local files).

What holds for one pull only (--insecure, --keyring) is set around its acquire
with `insecure_pull()`, never in the environment, so it cannot reach another pull.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path

from racker import settings
from racker.errors import BadReference
from racker.store.catalog import CatalogEntry
from racker.store.refs import LOCAL_IMAGE_SCHEMES, Reference

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


def upstream_state(ref: Reference, entry: CatalogEntry | None = None, stored: dict | None = None) -> str | None:
    """What `ref`'s upstream holds now (sources' `upstream_state`), or None if it has none to ask.
    `stored`: the stored image's manifest, if there is one (its packages, its last state).

    Raises errors.UpstreamUnreachable when it does not answer, errors.UpstreamError when
    its answer does not hold (a bad signature, a checksum list without the file).
    """
    module_name = SOURCES.get(ref.scheme)
    if module_name is None:
        return None
    ask = getattr(importlib.import_module(module_name), "upstream_state", None)
    return ask(ref, entry, stored) if ask is not None else None


def same_upstream(ref: Reference, old: str, new: str) -> bool:
    """Whether the upstream states `old` and `new` build the same image (a source's `same_state`, else equality)."""
    module_name = SOURCES.get(ref.scheme)
    same = getattr(importlib.import_module(module_name), "same_state", None) if module_name else None
    return same(old, new) if same is not None else old == new


def upstream_timeout() -> float:
    """RACKER_UPSTREAM_TIMEOUT: seconds an upstream may take to answer a refresh's question (default 30)."""
    return settings.UPSTREAM_TIMEOUT.value()


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
# The upstream state a refresh saw: the acquire that follows takes exactly that (a registry's
# tag is copied by the digest seen, so a tag that moves again meanwhile is not mixed in).
_SEEN: ContextVar[str | None] = ContextVar("racker_upstream_seen", default=None)


@contextlib.contextmanager
def acquiring_seen(state: str | None) -> Iterator[None]:
    """Inside the block, the acquire takes the upstream state `state` a refresh saw."""
    token = _SEEN.set(state)
    try:
        yield
    finally:
        _SEEN.reset(token)


def seen_upstream() -> str | None:
    """The upstream state the refresh in progress saw, if any."""
    return _SEEN.get()


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
