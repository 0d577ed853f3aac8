"""Image sources, one module per reference scheme, imported only when used.

Each module has `acquire(ref, entry, rootfs) -> dict`: it fills the empty
directory `rootfs` with the image's root filesystem and returns manifest fields.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from racker.catalog import CatalogEntry
from racker.errors import BadReference
from racker.refs import Reference

SOURCES: dict[str, str] = {
    "bootstrap": "racker.sources.bootstrap",
    "docker": "racker.sources.oci",
    "docker-daemon": "racker.sources.daemon",
    "dockerfile": "racker.sources.dockerfile",
}

Acquire = Callable[[Reference, "CatalogEntry | None", Path], dict]


def source_for(ref: Reference) -> Acquire:
    module_name = SOURCES.get(ref.scheme)
    if module_name is None:
        supported = ", ".join(f"{s}:" for s in SOURCES)
        raise BadReference(f"{ref.scheme}: images are not supported yet (supported: {supported})")
    module = importlib.import_module(module_name)
    return module.acquire
