"""files.write_atomic: the one atomic writer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from racker import files


def test_a_new_file_replaces_the_old_without_writing_through_its_links(tmp_path: Path) -> None:
    """The old file's other hard link (the store's copy, for promote's staged tree) keeps its content."""
    stored = tmp_path / "stored"
    stored.write_bytes(b"the store's")
    staged = tmp_path / "staged"
    os.link(stored, staged)
    files.write_atomic(staged, b"new", 0o644)
    assert stored.read_bytes() == b"the store's" and staged.read_bytes() == b"new"
    assert staged.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["staged", "stored"]


def test_private_unless_said_and_none_follows_the_umask(tmp_path: Path) -> None:
    files.write_atomic(tmp_path / "secret", "text")
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    old = os.umask(0o027)
    try:
        files.write_atomic(tmp_path / "shared", "text", mode=None)
    finally:
        os.umask(old)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "x"
    target.write_text("old")
    with pytest.raises(TypeError):
        files.write_atomic(target, 3)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]
