"""Fixtures shared by racker's own tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
CATALOG_IMAGES = ["debian-bookworm", "debian-bullseye", "debian-sid", "debian-trixie"]

# A small image for tests of the store itself: Essential packages only, ~10 s to build.
TINY_ENTRY = """\
description = "Debian bookworm, Essential packages only (racker's store tests)"
source = "bootstrap:debian/bookworm"
variant = "essential"
packages = []
"""


def racker(
    *args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the racker command line for real, in a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "racker", *args],
        env={**os.environ, **(env or {})},
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


@pytest.fixture
def private_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A store of its own and a catalogue holding the `tiny` image, for tests that change the store."""
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "tiny.toml").write_text(TINY_ENTRY)
    env = {"RACKER_HOME": str(tmp_path / "store"), "RACKER_CATALOG": str(catalog)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env
