"""A dockerfile: image is built again when its Dockerfile or context changes, and only then."""

from __future__ import annotations

import os
from pathlib import Path

from racker.sources import recipe_for
from racker.store import refs


def _context(tmp_path: Path) -> Path:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "Dockerfile").write_text("FROM debian:bookworm\nCOPY site /srv\n")
    (tmp_path / "app" / "site").mkdir()
    (tmp_path / "app" / "site" / "index.html").write_text("v1\n")
    return tmp_path / "app"


def test_the_recipe_follows_the_dockerfile_and_the_context(tmp_path: Path) -> None:
    context = _context(tmp_path)
    ref = refs.parse(f"dockerfile:{context}")
    first = recipe_for(ref)
    assert recipe_for(ref) == first, "nothing changed, nothing to build"
    (context / "Dockerfile").write_text("FROM debian:bookworm\nCOPY site /srv\nRUN true\n")
    second = recipe_for(ref)
    assert second != first
    page = context / "site" / "index.html"
    page.write_text("v2\n")
    os.utime(page, ns=(1, 1))
    third = recipe_for(ref)
    assert third != second
    (context / "site" / "new.css").write_text("")
    assert recipe_for(ref) != third


def test_a_catalogue_entry_adds_its_context_to_its_file(tmp_path: Path) -> None:
    from racker.store.catalog import CatalogEntry

    context = _context(tmp_path)
    ref = refs.parse(f"dockerfile:{context}")
    entry = CatalogEntry(name="app", source=f"dockerfile:{context}", recipe="entry-file-hash")
    recipe = recipe_for(ref, entry)
    assert recipe.startswith("entry-file-hash ") and recipe.endswith(recipe_for(ref).split()[-1])
